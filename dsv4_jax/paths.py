"""`user_path(p)`: a path as a user typed it -> absolute, `~` expanded.

Every public function and command that takes a folder or file calls it first: Orbax refuses relative paths
("Checkpoint path should be absolute"), and nothing but a shell expands `~` (a path given in Python or quoted on the
command line keeps it)."""

from __future__ import annotations

import os

__all__ = ["user_path"]


def user_path(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
