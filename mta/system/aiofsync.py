"""fsync many files with one system call: Linux native AIO (``io_submit`` of
``IOCB_CMD_FSYNC`` requests).

The group committer (:mod:`mta.queue.commit`) needs the files of a batch
fsynced side by side, so that the kernel merges their disk flushes.  Python
threads making one ``fsync`` each would cost a hand-over through a queue, a
thread wake-up and the GIL on the way back for every file; with AIO the
committer thread submits them all in one call and waits for their results in
another (less CPU of ours: bench/README.rst).  The kernel runs each request's
``vfs_fsync`` on its own worker (``aio_fsync_work``), the same call and the
same durability as ``fsync(2)`` on that descriptor, write-back errors
included; the fsyncs' own kernel work runs in kernel workers, outside our
process.

Linux has had ``IOCB_CMD_FSYNC`` since 4.18.  The system calls are made
through ``syscall(2)`` (libc has no wrappers for them), so only the
architectures whose numbers are listed below use it; anywhere else, or where
``io_setup`` fails (``aio-max-nr`` reached, a sandbox that forbids it),
:meth:`AioFsync.open` returns None and the caller fsyncs one file after the
other.  A request the kernel refuses at submission (a descriptor without an
fsync, such as a pipe) is fsynced with a plain ``os.fsync`` instead, which
reports its own error.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections.abc import Sequence
from typing import Any

from mta.system.fsutil import _libc

# io_setup, io_destroy, io_getevents, io_submit (asm/unistd_64.h; the generic
# table for arm64 and riscv64).
_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "arm64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
}
_IOCB_CMD_FSYNC = 2


class _IOCB(ctypes.Structure):
    """struct iocb (linux/aio_abi.h), little-endian field order."""
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    """struct io_event: ``data`` is the request's aio_data, ``res`` its result (-errno)."""
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class AioFsync:
    """A kernel AIO context for fsyncing up to ``capacity`` files at once (more
    go in rounds).  Used by one thread at a time; :meth:`close` frees it."""

    def __init__(self, numbers: tuple[int, int, int, int], context: ctypes.c_ulong,
                 capacity: int) -> None:
        _, self._destroy, self._getevents, self._submit = numbers
        self._context: ctypes.c_ulong | None = context
        self.capacity = capacity
        self._iocbs = (_IOCB * capacity)()
        self._pointers = (ctypes.POINTER(_IOCB) * capacity)(
            *(ctypes.pointer(iocb) for iocb in self._iocbs))
        self._events = (_Event * capacity)()

    @classmethod
    def open(cls, capacity: int = 128) -> AioFsync | None:
        """A new context, or None where Linux AIO fsync cannot be used here."""
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or _syscall_call() is None:
            return None
        context = ctypes.c_ulong(0)
        if _syscall(numbers[0], ctypes.c_long(capacity), ctypes.byref(context)) != 0:
            return None
        return cls(numbers, context, capacity)

    def close(self) -> None:
        if self._context is not None:
            _syscall(self._destroy, self._context)
            self._context = None

    def fsync_all(self, fds: Sequence[int]) -> list[int]:
        """fsync every descriptor in ``fds``, side by side; returns their errno
        values in order (0: done)."""
        results = [0] * len(fds)
        for start in range(0, len(fds), self.capacity):  # ends: finite slices
            self._round(fds[start:start + self.capacity], start, results)
        return results

    def _round(self, fds: Sequence[int], offset: int, results: list[int]) -> None:
        assert self._context is not None, "AioFsync used after close()"
        for n, fd in enumerate(fds):
            iocb = self._iocbs[n]
            ctypes.memset(ctypes.byref(iocb), 0, ctypes.sizeof(_IOCB))
            iocb.aio_data = n
            iocb.aio_lio_opcode = _IOCB_CMD_FSYNC
            iocb.aio_fildes = fd
        in_flight = 0
        n = 0
        while n < len(fds):  # ends: every pass submits at least one request or handles one
            pointers = ctypes.byref(self._pointers, n * ctypes.sizeof(ctypes.c_void_p))
            took = _syscall(self._submit, self._context, ctypes.c_long(len(fds) - n), pointers)
            if took > 0:
                in_flight += took
                n += took
                continue
            # The kernel refused request n (took == -1; 0 is not returned for a
            # non-empty submission): a plain fsync does it, or says why not.
            results[offset + n] = _plain_fsync(fds[n])
            n += 1
        self._wait(in_flight, offset, results)

    def _wait(self, count: int, offset: int, results: list[int]) -> None:
        """Collect ``count`` completions into ``results``."""
        interrupted = 0
        while count > 0:  # ends: each pass collects at least one, or was interrupted
            got = _syscall(self._getevents, self._context, ctypes.c_long(1),
                           ctypes.c_long(count), self._events, None)
            if got < 0:
                err = ctypes.get_errno()
                interrupted += 1
                if err == errno.EINTR and interrupted < 1000:
                    continue
                raise OSError(err, f"io_getevents: {os.strerror(err)}")
            for event in self._events[:got]:
                results[offset + event.data] = -event.res if event.res < 0 else 0
            count -= got


def _plain_fsync(fd: int) -> int:
    try:
        os.fsync(fd)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


@functools.cache
def _syscall_call() -> Any:
    """libc's syscall(2) with its result type set (once), or None."""
    try:
        call = _libc().syscall
    except AttributeError:
        return None
    call.restype = ctypes.c_long
    return call


def _syscall(number: int, *args: object) -> int:
    """syscall(2); the GIL is released while it runs (a ctypes CDLL call)."""
    return int(_syscall_call()(ctypes.c_long(number), *args))
