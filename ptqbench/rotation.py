"""Orthogonal rotations of a low-rank branch's rank dimension (LoRaQ's Omega).

A rotation ``Omega`` [r, r] sits between the factors: ``L Omega Omega^T R = L R`` exactly, but
``Q2(L Omega) Q2(Omega^T R)`` spreads outliers across the rank dimension before quantization.
Kinds: ``identity``; ``hadamard``, a randomized block-diagonal Hadamard for any ``r``;
``random`` (a seeded Haar-random orthogonal matrix). Matrices are built in float64 on the CPU
from a seeded generator, so a seed gives the same rotation on every device.

``hadamard`` for any rank: ``r`` is split greedily into the largest Hadamard orders we can build
(Sylvester ``2^k`` times a Paley-I order ``q + 1``, ``q`` a prime ``= 3 mod 4``: 1, 2, 4, 8, 12, 16,
20, 24, 32, 40, 44, ...; 28 is 24 + 4), so 64, 80 (4 x 20) and 120 (2 x 60) are one block, 62 is
60 + 2 and 81 is 80 + 1 (a 1 x 1 block is a sign). ``Omega = diag(signs) blockdiag(H_i)``, each
block scaled to be orthogonal, so every nonzero entry of block ``i`` is ``+-1/sqrt(b_i)``; blocks
follow the rank order, so the SVD init's weakest components fall in the smallest block. The block
structure is in :attr:`Rotation.label` (``hadamard[60+2]``); nothing is substituted silently.

Measured (``benchmarks/loraq_convergence.py --rotations``: two real MiniLM layers, LoRaQ weight
objective, 100 Adam steps; mean relative weight error), identity / random / hadamard / power-of-two
blocks only: MXFP4 r62 (MXFP8 branch) 0.0496 / 0.0496 / 0.0495 / 0.0497; r81 (MXFP6) 0.0441 / 0.0438 /
0.0439 / 0.0440; r120 (W4A8) 0.0494 / 0.0488 / 0.0487 / 0.0491; INT4 g64 r62 0.0502 / 0.0500 / 0.0500 /
0.0500; r81 0.0518 / 0.0506 / 0.0506 / 0.0509; r120 0.0533 / 0.0528 / 0.0527 / 0.0530. Hadamard
matches a random orthogonal rotation (within 0.2%), beats identity by up to 2.3% and beats blocks of
powers of two only at 81 and 120, where the Paley orders give one large block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ptqbench.errors import UserError

ROTATIONS = ("hadamard", "random", "identity")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley_order(m: int) -> bool:
    """Whether ``m = q + 1`` with ``q`` a prime ``= 3 mod 4`` (a Paley-I Hadamard order)."""
    return m % 4 == 0 and _is_prime(m - 1)


def _odd_part(n: int) -> tuple[int, int]:
    """``(k, m)`` with ``n = 2^k m`` and ``m`` one of 1, 2 or a Paley-I order, or ``(-1, n)``."""
    k = 0
    while True:
        if n in (1, 2) or _paley_order(n):
            return k, n
        if n % 2:
            return -1, n
        n, k = n // 2, k + 1


def is_hadamard_order(n: int) -> bool:
    """Whether :func:`hadamard_matrix` builds order ``n`` (Sylvester x Paley I)."""
    return n > 0 and _odd_part(n)[0] >= 0


def _paley(q: int) -> torch.Tensor:
    """The +-1 Paley-I Hadamard matrix of order ``q + 1`` (``q`` prime, ``= 3 mod 4``)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


@lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order ``n``: Sylvester doublings of 1 or of a Paley-I matrix."""
    k, m = _odd_part(n)
    if k < 0:
        raise ValueError(f"no Sylvester x Paley Hadamard matrix of order {n} (see is_hadamard_order)")
    h = _paley(m - 1) if m > 2 else torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k + (m == 2)):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (Sylvester ``2^k`` times 1, 2 or a Paley-I order), scaled
    to be orthogonal (float64); ``ValueError`` for orders it cannot build (see :func:`is_hadamard_order`)."""
    return _hadamard_pm1(n) / n**0.5


def hadamard_blocks(n: int) -> tuple[int, ...]:
    """Greedy split of ``n`` into the largest buildable Hadamard orders, largest first."""
    blocks = []
    while n > 0:
        b = next(b for b in range(n, 0, -1) if is_hadamard_order(b))
        blocks.append(b)
        n -= b
    return tuple(blocks)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _signs(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``diag(signs) blockdiag(H_b for b in hadamard_blocks(n))`` with seeded signs (orthogonal,
    float64). The signs act before the mixing (``L Omega = (L D) H``): signs after it would only
    flip the signs of quantized values, which a symmetric quantizer maps exactly, and change nothing."""
    return _signs(n, seed)[:, None] * torch.block_diag(*(hadamard_matrix(b) for b in hadamard_blocks(n)))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed; float64)."""
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_generator(seed), dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


@dataclass(frozen=True)
class Rotation:
    """A rotation matrix, its kind and, for ``hadamard``, the block orders on its diagonal."""

    matrix: torch.Tensor
    kind: str
    blocks: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """What a branch records: ``hadamard`` (one block) or ``hadamard[60+2]``, else the kind."""
        if len(self.blocks) > 1:
            return f"{self.kind}[{'+'.join(map(str, self.blocks))}]"
        return self.kind


def get_rotation(kind: str, n: int, seed: int = 0) -> Rotation:
    """The ``n x n`` rotation of ``kind`` (float64, CPU); ``hadamard`` is block-diagonal where
    ``n`` is not itself a buildable Hadamard order, and the returned :class:`Rotation` says so."""
    if kind not in ROTATIONS:
        raise UserError(f"rotation: unknown kind {kind!r} (valid: {', '.join(ROTATIONS)})")
    if kind == "identity" or n == 0:
        return Rotation(torch.eye(n, dtype=torch.float64), "identity")
    if kind == "hadamard":
        return Rotation(randomized_hadamard(n, seed), "hadamard", hadamard_blocks(n))
    return Rotation(random_orthogonal(n, seed), "random")
