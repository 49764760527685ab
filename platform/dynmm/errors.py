"""The user-error types. A ``UserError`` is a mistake the user can fix (a bad pipeline field, a missing
file); the CLI prints its message without a traceback and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user gave us; the message says what was wrong and what was expected."""


class SpecError(UserError):
    """A pipeline YAML (or a ``--set`` override) that does not validate."""


class DatasetError(UserError):
    """A dataset file, split, key or row that is missing or not what the task expects."""
