"""Writing files so that a reader never sees half of one: write beside the target, then rename over it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; it replaces ``path`` when the block ends without an
    error, and is removed when it raises (the old file, if any, is left as it was)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the target's suffix stays last: writers such as matplotlib's savefig choose the format by it
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp{target.suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
