"""Small durable-file helpers shared by the queue, Maildir delivery and the admin edits."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (a pipe or file may take less per call)."""
    view = memoryview(data)
    while view:  # ends: each write takes at least one octet or raises
        view = view[os.write(fd, view):]


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


# sync_file_range(2) flags: wait for earlier write-out, start it, wait for it.
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4


def start_write_out(fd: int) -> None:
    """Start writing a file's data to the disk without waiting for it (Linux
    sync_file_range(2) with SYNC_FILE_RANGE_WRITE); :func:`write_out` or an
    fsync later waits for it.  Does nothing where that call is missing."""
    _sync_file_range(fd, _SYNC_FILE_RANGE_WRITE)


def write_out(fd: int) -> None:
    """Write a file's data to the disk and wait for it, without a journal commit
    (Linux sync_file_range(2) over the whole file); fdatasync where that call is
    missing.  Then a metadata change made next (a chmod that marks the file
    complete) cannot reach the disk before the data it vouches for: any journal
    commit that carries it also carries the data's block allocation, made here,
    and flushes the disk's cache first."""
    if not _sync_file_range(fd, _SYNC_FILE_RANGE_ALL):
        os.fdatasync(fd)


def _sync_file_range(fd: int, flags: int) -> bool:
    """sync_file_range(2) over the whole file; False where libc lacks it."""
    call = _sync_file_range_call()
    if call is None:
        return False
    if call(fd, 0, 0, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


@functools.cache
def _sync_file_range_call() -> Any:
    """libc's sync_file_range with its argument types set (once), or None."""
    try:
        call = _libc().sync_file_range
    except AttributeError:
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return call


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
