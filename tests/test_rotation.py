"""Rotations of the rank dimension: real Hadamard matrices for any rank, never a silent substitute."""

from __future__ import annotations

import pytest
import torch

from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.rotation import (
    get_rotation,
    hadamard_blocks,
    hadamard_matrix,
    is_hadamard_order,
    random_orthogonal,
    randomized_hadamard,
)

EQUAL_MEMORY_RANKS = (62, 80, 81, 120)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _paley_reference(q: int) -> torch.Tensor:
    """Paley I, written out from its definition (Legendre symbol by Euler's criterion)."""
    def chi(a: int) -> int:
        a %= q
        return 0 if a == 0 else (1 if pow(a, (q - 1) // 2, q) == 1 else -1)

    h = [[1] * (q + 1)] + [[-1] + [chi(j - i) + (i == j) for j in range(q)] for i in range(q)]
    return torch.tensor(h, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 44, 60, 64, 80, 120, 128])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, _eye(n), rtol=0, atol=1e-14)
    assert torch.equal((h * n**0.5).round().abs(), torch.ones(n, n, dtype=torch.float64))
    assert (h * n**0.5 - (h * n**0.5).round()).abs().max() < 1e-12


def test_paley_matches_its_definition_and_orders_are_known():
    for q in (3, 11, 19, 43, 59):
        assert torch.allclose(hadamard_matrix(q + 1) * (q + 1) ** 0.5, _paley_reference(q), rtol=0, atol=1e-12)
    known = [n for n in range(1, 130) if is_hadamard_order(n)]
    assert known == [1, 2, 4, 8, 12, 16, 20, 24, 32, 40, 44, 48, 60, 64, 68, 72, 80, 84, 88, 96, 104, 108, 120, 128]
    with pytest.raises(ValueError, match="no Sylvester x Paley"):
        hadamard_matrix(62)


def test_block_structure_of_the_equal_memory_ranks():
    assert [hadamard_blocks(n) for n in EQUAL_MEMORY_RANKS] == [(60, 2), (80,), (80, 1), (120,)]
    assert hadamard_blocks(28) == (24, 4) and hadamard_blocks(7) == (4, 2, 1)
    for n in range(1, 130):
        assert sum(hadamard_blocks(n)) == n


@pytest.mark.parametrize("n", (*EQUAL_MEMORY_RANKS, 7, 64))
def test_randomized_hadamard_for_any_rank(n):
    rot = get_rotation("hadamard", n, seed=5)
    m = rot.matrix
    assert rot.kind == "hadamard" and m.dtype == torch.float64
    assert torch.allclose(m @ m.T, _eye(n), rtol=0, atol=1e-14)
    assert torch.allclose(m.T @ m, _eye(n), rtol=0, atol=1e-14)
    lo = 0
    for b in rot.blocks:  # each block: entries +-1/sqrt(b); zeros off the diagonal blocks
        block = m[lo:lo + b, lo:lo + b]
        assert torch.allclose(block.abs(), torch.full((b, b), b**-0.5, dtype=torch.float64), rtol=0, atol=1e-15)
        assert torch.count_nonzero(m[lo:lo + b]) == b * b
        lo += b
    assert torch.equal(m, randomized_hadamard(n, 5)) and not torch.equal(m, randomized_hadamard(n, 6))
    unsigned = torch.block_diag(*(hadamard_matrix(b) for b in rot.blocks))
    row_signs = torch.sign((m * unsigned).sum(1))
    assert torch.equal(m, row_signs[:, None] * unsigned)  # diag(signs) H: the signs come first


def test_signs_act_before_the_mixing():
    """Signs after the mixing would be a no-op for a symmetric quantizer: Q(A D) = Q(A) D."""
    fmt = get_format("mxfp4")
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    d = torch.where(torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    assert torch.equal(fmt.quantize(a * d), fmt.quantize(a) * d)  # why diag(signs) goes first
    h0, h1 = (get_rotation("hadamard", 64, seed).matrix.float() for seed in (0, 1))
    assert not torch.equal(fmt.quantize(a @ h0).abs(), fmt.quantize(a @ h1).abs())


def test_labels_say_what_was_built_and_nothing_is_substituted():
    assert get_rotation("hadamard", 64).label == "hadamard" and get_rotation("hadamard", 64).blocks == (64,)
    assert get_rotation("hadamard", 120).label == "hadamard"
    at62 = get_rotation("hadamard", 62, seed=5)
    assert at62.label == "hadamard[60+2]" and at62.blocks == (60, 2)
    assert not torch.allclose(at62.matrix, random_orthogonal(62, 5))
    assert get_rotation("hadamard", 81).label == "hadamard[80+1]"
    r = get_rotation("random", 62, seed=5)
    assert r.label == "random" and torch.equal(r.matrix, random_orthogonal(62, 5))
    assert torch.allclose(r.matrix @ r.matrix.T, _eye(62), rtol=0, atol=1e-13)
    assert torch.equal(get_rotation("identity", 5).matrix, _eye(5))
    assert get_rotation("hadamard", 0).matrix.shape == (0, 0)
    with pytest.raises(UserError, match="valid: hadamard, random, identity"):
        get_rotation("cayley", 4)
