"""``ptqbench list methods|formats|models|metrics``: one entry a line, its name first."""

from __future__ import annotations

import argparse

from ptqbench.registry import describe

KINDS = ("methods", "formats", "models", "metrics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which registry to list")


def rows(kind: str) -> list[tuple[str, str]]:
    """(name, description) pairs of one registry."""
    if kind == "formats":
        from ptqbench.formats import list_formats

        return list_formats()
    if kind == "methods":
        from ptqbench.method import METHODS

        return [(name, describe(cls)) for name, cls in METHODS.items()]
    if kind == "models":
        from ptqbench.models import MODELS

        return [(name, spec.description) for name, spec in MODELS.items()]
    from ptqbench.metrics import METRICS
    from ptqbench.metrics.weights import availability

    return [
        (name, f"{'higher' if cls.higher_is_better else 'lower'} is better; {describe(cls)}"
               + (f" [{availability(cls.weight_files)}]" if cls.weight_files else ""))
        for name, cls in METRICS.items()
    ]


def main(args: argparse.Namespace) -> int:
    entries = rows(args.kind)
    width = max((len(n) for n, _ in entries), default=0)
    for name, text in entries:
        print(f"{name:<{width}}  {text}".rstrip())
    return 0
