"""The ``dynmm`` command: thin sub-commands over the library; parsing, printing and exit codes only.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets ``handler``.
A ``UserError`` is printed as one line (no traceback) and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from dynmm.errors import UserError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from dynmm.cli import data, evaluate, jobs, models, submit, train, tune

    parser = argparse.ArgumentParser(prog="dynmm", description="Train, tune and register DynMM models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (train, tune, data, models, submit, jobs, evaluate):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
