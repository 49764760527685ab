"""The error types the CLI prints as one line. A ``UserError`` is a mistake the user can fix (a bad pipeline field,
a missing file): exit code 2. A ``RunFailed`` is a run that cannot go on for a reason found only while it runs
(every trial of a study failing the same way): exit code 1. Neither prints a traceback."""


class UserError(Exception):
    """A mistake in what the user gave us; the message says what was wrong and what was expected."""


class SpecError(UserError):
    """A pipeline YAML (or a ``--set`` override) that does not validate."""


class DatasetError(UserError):
    """A dataset file, split, key or row that is missing or not what the task expects."""


class RunFailed(Exception):
    """A run stopped because going on could not succeed; the message names the cause."""
