"""How a method configuration reads: one home for labels, format summaries and rank texts.

:func:`describe` is a method's label (its own :meth:`~ptqbench.method.Method.label`, at its
solved rank) plus the non-default fields the label does not show; suite cells and
``ptqbench layers`` use it. :func:`config_text` lays out ``name W:.. A:.. rN B:..`` from plain
values (the report's rows); :func:`formats_text` and :func:`rank_text` are the short columns of
dry runs and run tags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ptqbench.errors import UserError
from ptqbench.method import LowRankMethod, Method

# The fields every label already shows (formats and rank); the others are shown when not default.
LABEL_FIELDS = ("weight_format", "act_format", "rank", "branch_format", "branch_act_format")
REFERENCE = "16-bit reference"


def _defaults(method: Method) -> Method | None:
    """The method with every field but the labelled ones at its default (defaults that derive
    from the formats, like loraq's ``mid_format``, follow them), or None if it cannot be built."""
    try:
        return type(method)(**{k: getattr(method, k) for k in LABEL_FIELDS if hasattr(method, k)})
    except (TypeError, ValueError, UserError):
        return None


def _shown(method: Method, name: str, default: Any) -> bool:
    """Whether the method's own label already shows field ``name`` (it changes with the field)."""
    try:
        return dataclasses.replace(method, **{name: default}).label() != method.label()
    except (TypeError, ValueError, UserError):
        return False


def extra_fields(method: Method, besides_label: bool = False) -> list[str]:
    """``field=value`` for every non-default field other than formats and rank (``besides_label``:
    only those the method's :meth:`~ptqbench.method.Method.label` does not show)."""
    default = _defaults(method)
    if default is None:
        return []
    out = []
    for f in dataclasses.fields(method):
        value, base = getattr(method, f.name), getattr(default, f.name)
        if f.name in LABEL_FIELDS or value == base or (besides_label and _shown(method, f.name, base)):
            continue
        out.append(f"{f.name}={value}")
    return out


def describe(method: Method | None, ranks: Mapping[str, int] | None = None) -> str:
    """The label of a configured method: its own label at its rank (with per-layer ``ranks``, at
    their maximum, the range noted), then the non-default fields the label does not show."""
    if method is None:
        return REFERENCE
    note = ""
    if ranks:
        low, high = min(ranks.values()), max(ranks.values())
        method = dataclasses.replace(method, rank=high)
        note = f"(equal-memory ranks {low}-{high})" if low != high else ""
    return " ".join(filter(None, [method.label(), *extra_fields(method, besides_label=True), note]))


def config_text(name: str, weight: str, act: str, rank: str | int | None = None, branch: str = "") -> str:
    """``name W:weight A:act`` and, for a low-rank branch, `` r{rank} B:{branch}``."""
    text = f"{name} W:{weight} A:{act}".lstrip()
    return f"{text} r{rank} B:{branch}" if rank is not None else text


def formats_text(method: Method | None) -> str:
    """The formats of a method: ``W:.. A:..`` plus ``B:branch/branch_act``; ``16-bit`` for none."""
    if method is None:
        return "16-bit"
    text = config_text("", method.weight_format, method.act_format)
    if isinstance(method, LowRankMethod):
        text += f" B:{method.branch_format}/{method.branch_act_format}"
    return text


def rank_text(rank: int | None, ranks: Mapping[str, int] | None = None) -> str:
    """``per-layer lo..hi`` for per-layer ranks, the rank, or ``-`` for a method without one."""
    if ranks:
        values = list(ranks.values())
        return f"per-layer {min(values)}..{max(values)}"
    return "-" if rank is None else str(rank)
