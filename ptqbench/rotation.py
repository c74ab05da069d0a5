"""Orthogonal rotations of a low-rank branch's rank dimension (LoRaQ's Omega).

A rotation ``Omega`` [r, r] sits between the factors: ``L Omega Omega^T R = L R`` exactly, but
``Q2(L Omega) Q2(Omega^T R)`` spreads outliers across the rank dimension before quantization.
Kinds: ``identity``; ``hadamard`` (a randomized Hadamard ``H diag(signs) / sqrt(r)``, which
exists only for power-of-two ``r``: any other rank falls back to ``random`` and says so);
``random`` (a seeded Haar-random orthogonal matrix). Matrices are built in float64 on the CPU
from a seeded generator, so a seed gives the same rotation on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.errors import UserError

ROTATIONS = ("hadamard", "random", "identity")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_matrix(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), scaled to be orthogonal."""
    if not is_power_of_two(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``H diag(signs)`` with seeded random signs (orthogonal, float64)."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed; float64)."""
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_generator(seed), dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


@dataclass(frozen=True)
class Rotation:
    """A rotation matrix and the kind actually used (``note`` explains a fallback)."""

    matrix: torch.Tensor
    kind: str
    note: str = ""

    @property
    def label(self) -> str:
        """What a branch records: the kind used, plus why when it differs from the request."""
        return f"{self.kind} ({self.note})" if self.note else self.kind


def get_rotation(kind: str, n: int, seed: int = 0) -> Rotation:
    """The ``n x n`` rotation of ``kind`` (float64, CPU); ``hadamard`` falls back to ``random``
    for ranks that are not powers of two, and the returned :class:`Rotation` records it."""
    if kind not in ROTATIONS:
        raise UserError(f"rotation: unknown kind {kind!r} (valid: {', '.join(ROTATIONS)})")
    if kind == "identity" or n == 0:
        return Rotation(torch.eye(n, dtype=torch.float64), "identity")
    if kind == "hadamard":
        if is_power_of_two(n):
            return Rotation(randomized_hadamard(n, seed), "hadamard")
        return Rotation(
            random_orthogonal(n, seed), "random", f"hadamard requested; rank {n} is not a power of two"
        )
    return Rotation(random_orthogonal(n, seed), "random")
