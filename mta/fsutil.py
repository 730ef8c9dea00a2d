"""Small durable-file helpers shared by the queue, Maildir delivery and the admin edits."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (Linux syncfs(2)): one journal
    commit for every file written since, instead of one fsync per file.

    Since Linux 5.8 it reports write-back errors of the filesystem, so a failure
    to persist any of our files is seen here (as PostgreSQL's
    recovery_init_sync_method=syncfs relies on).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
