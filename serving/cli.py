"""`tenantlora` command line. Each package contributes its subcommands through a
`register(subparsers)` function, so the packages stay importable on their own."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that contribute subcommands, each with `register(subparsers) -> None`.
SUBCOMMAND_MODULES = (
    "serving.cli_serve",
    "serving.cli_client",
    "serving.cli_ray",
    "training.cli",
    "benchmarks.cli",
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantlora", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,
        help="Log level of every subcommand (default: TENANTLORA_LOG_LEVEL, else info).",
    )
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


def default_log_level() -> str:
    """TENANTLORA_LOG_LEVEL, else the settings' default (read without validating every other
    setting, so client commands work beside a half-configured server environment)."""
    from serving.settings import Settings

    return (
        os.environ.get("TENANTLORA_LOG_LEVEL") or Settings.model_fields["log_level"].default
    ).lower()


def configure_logging(level: str) -> None:
    """The one logging set-up of the process: root handler on stderr at ``level``."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_level = args.log_level or default_log_level()
    configure_logging(args.log_level)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
