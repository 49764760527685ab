"""The ``dynmm`` command: thin sub-commands over the library; parsing, printing and exit codes only.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets ``handler``.
A ``UserError`` is printed as one line (no traceback) and exits with code 2, a ``RunFailed`` as one line with code 1;
Ctrl-C prints "interrupted" and exits
130; any other exception prints its traceback with credentials in URIs masked and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from dynmm.errors import RunFailed, UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    from dynmm.cli import data, evaluate, jobs, models, profile, serve, submit, train, tune

    parser = argparse.ArgumentParser(prog="dynmm", description="Train, tune and register DynMM models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (train, tune, data, models, submit, jobs, evaluate, profile, serve):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"error: {_redacted(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFailed as error:
        print(f"error: {_redacted(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug or a library failure: the traceback helps, a password in it must not show
        print(_redacted(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _redacted(text: str) -> str:
    if "://" not in text or "@" not in text:  # nothing to mask: spare the MLflow import
        return text
    from dynmm.track.runs import redact_credentials

    return redact_credentials(text)


if __name__ == "__main__":
    sys.exit(main())
