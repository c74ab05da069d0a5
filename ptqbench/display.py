"""What ``ptqbench run --dry-run`` prints: one aligned line per cell."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ptqbench.labels import extra_fields, formats_text, rank_text

if TYPE_CHECKING:
    from ptqbench.suite import Cell

HEADER = ("cell_hash", "model", "method", "formats", "rank", "bits/weight", "model bytes", "note")


def _budget_note(cell: Cell) -> str:
    if "budget" not in cell.config:
        return ""
    ref = cell.config["budget"]["reference"]
    return f"rank solved: equal memory to {ref['method']} r{ref.get('rank')} B:{ref.get('branch_format')}"


def dry_run_lines(cells: Sequence[Cell]) -> list[str]:
    """One aligned line per cell: hash, model, method, formats, rank, exact bits per weight, model bytes."""
    rows = [HEADER]
    for c in cells:
        method = " ".join([c.method_name, *(extra_fields(c.method) if c.method else [])])
        rows.append(
            (c.hash, c.model.name, method, formats_text(c.method), rank_text(c.rank, c.ranks),
             f"{c.bits_per_weight:.6f}", f"{c.model_bytes:,}", _budget_note(c))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
