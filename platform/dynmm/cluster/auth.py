"""The cluster's auth token, found where Ray itself looks, and the HTTP header that carries it.

Ray (>= 2.52) authenticates every request to a cluster started with ``RAY_AUTH_MODE=token`` against one
shared token. Ray reads it from, in order: the ``RAY_AUTH_TOKEN`` variable, the file named by
``RAY_AUTH_TOKEN_PATH``, and ``~/.ray/auth_token`` (``ray get-auth-token --generate`` writes that file).
The job server takes it as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dynmm.cluster.errors import ClusterAuthError

TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class AuthToken:
    """A token and where it came from (for messages); the value never appears in a repr."""

    value: str = field(repr=False)
    source: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_token() -> AuthToken | None:
    """The token Ray would use on this machine, or None when there is none."""
    if os.environ.get(TOKEN_VARIABLE, "").strip():
        return AuthToken(os.environ[TOKEN_VARIABLE].strip(), TOKEN_VARIABLE)
    if os.environ.get(TOKEN_PATH_VARIABLE):
        path = Path(os.environ[TOKEN_PATH_VARIABLE]).expanduser()
        value = _read_token(path)
        if value is None:
            # Ray aborts on this too rather than fall back to another token.
            raise ClusterAuthError(f"{TOKEN_PATH_VARIABLE}={path}: the token file is missing or empty")
        return AuthToken(value, f"{path} ({TOKEN_PATH_VARIABLE})")
    value = _read_token(default_token_path())
    return AuthToken(value, str(default_token_path())) if value is not None else None


def _read_token(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value or None
