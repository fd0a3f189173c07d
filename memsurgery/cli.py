"""The ``memsurgery`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EPILOG = """examples:
  memsurgery run recipes/quickstart.yaml          train twin SimCLR ResNet9s on the embedded
                                                  digits and print where they memorize
  memsurgery run recipes/quickstart.yaml --output runs/try2 --no-progress
  memsurgery run recipes/cifar10_simclr.yaml --resume   continue an interrupted run
  memsurgery --version
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="memsurgery",
        description="Locate where a vision encoder memorizes its training data (LayerMem, UnitMem) and act on it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"memsurgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a YAML recipe", description="Run a YAML recipe (see recipes/).")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("--output", help="output folder (overrides the recipe's 'output')")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint under <output>/checkpoints (needs train.checkpoint_every)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "run":
        import dataclasses

        from .config import ConfigError
        from .recipe import format_summary, load_recipe, run_recipe

        try:
            cfg = load_recipe(args.recipe)
        except (ConfigError, FileNotFoundError) as e:
            print(f"memsurgery: error: {e}", file=sys.stderr)
            return 2
        if args.output:
            cfg = dataclasses.replace(cfg, output=args.output)
        summary = run_recipe(cfg, progress=not args.no_progress, resume=args.resume)
        print(format_summary(summary))
        print(f"results written to {cfg.output}/summary.json and summary.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
