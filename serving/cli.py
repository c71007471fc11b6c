"""`tenantlora` command line. Each package contributes its subcommands through a
`register(subparsers)` function, so the packages stay importable on their own."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, each with `register(subparsers) -> None`.
SUBCOMMAND_MODULES = (
    "serving.cli_serve",
    "serving.cli_client",
    "training.cli",
    "benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantlora", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
