"""The ``ptqbench`` command line.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs, so
``ptqbench list formats`` stays fast. Bad input (:class:`UserError`) prints one line on stderr
and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ptqbench.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ptqbench.runner", "run a suite of cells (or --dry-run to print the grid)"),
    "score": ("ptqbench.scoring", "score finished cells from their saved images (a suite, or --run RUN_ID)"),
    "report": ("ptqbench.report", "tables, plots and an HTML page from the tracked runs"),
    "list": ("ptqbench.listing", "list methods, formats, models or metrics, or the layers of a model"),
    "layers": ("ptqbench.layerstudy", "per-layer error study of methods at equal memory"),
    "bench": ("ptqbench.bench", "forward-time benchmark of quantized transformers (GPU)"),
    "train-default": ("ptqbench.models.fmnist_train", "train the embedded Fashion-MNIST DiT and classifier"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqbench", description=__doc__.splitlines()[0])
    from ptqbench import __version__

    parser.add_argument("--version", action="version", version=f"ptqbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the module of the subcommand being run is imported.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # MLflow's usage telemetry writes an id into ~/.config and calls home; off unless the user chose.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except UserError as exc:
        print(f"ptqbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
