"""Group commit: queue file operations on one worker thread, one directory fsync per batch.

The SMTP session and the queue runner hand over small operations (fsync and
rename a new message, rewrite an envelope, delete a finished message).  A
single worker thread runs them in the order given, then fsyncs the queue
directory once for everything it ran, and only then fires each operation's
Deferred on the reactor thread.  So:

* the reactor never waits for the disk, and other sessions are served meanwhile;
* operations that arrive while the disk is busy are made durable together,
  which is how Postfix-like durability (fsync before 250) stays cheap under load;
* a Deferred fires only after its operation *and* the directory entry are on
  disk, so the 250 reply (or the next delivery step) still waits for durability.

An operation may come in *parts* (``submit(finish, parts=[...])``): the
independent steps of it that wait for the disk, such as writing and fsyncing
a message's data file and its envelope.  A part is a generator function that
yields wherever it would wait for the disk: after it has written its file and
started the write-out (it yields None), and where it needs an fsync (it
yields the file descriptor).  The committer runs the parts of every operation
in the batch a step at a time, all first steps, then all second steps, and so
on, so the disk works on all the batch's files at once.  The fsyncs asked for
in one step are submitted together (Linux AIO, :mod:`mta.system.aiofsync`), so that
the kernel merges their disk flushes (see ``_fsync_all``); a failed fsync is
raised inside its part.  A part that is a plain function runs in one step.
Only when all parts of an operation succeeded does its ``finish`` (the
renames) run, in submission order.  Parts of different operations must be
independent of each other (they are: each message has its own files).

The parts are stepped on this one thread, not handed to helper threads:
every hand-over to a helper is a thread wake-up, and they cost more CPU and
time (the figures are in bench/README.rst).

With ``fsync`` off (tests), operations run at once on the calling thread.

Python's GIL switch interval stays at its default (5 ms): a shorter one
makes the reactor thread hand the GIL over more often, for fewer messages
per second and more CPU per message (bench/README.rst), while an idle
reactor waits in epoll without the GIL anyway.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.system.aiofsync import AioFsync
from mta.system.fsutil import fsync_dir, syncfs

log = Logger()

Operation = Callable[[], None]
# A part: a generator function that yields where it would wait for the disk (None,
# or a file descriptor that the committer is to fsync before the next step), or a
# plain function (one step).
Steps = Generator[int | None, None, None]
Part = Callable[[], Steps | None]
# A submitted operation, its parts, its Deferred, whether it needs the directory
# fsync, and whether it may wait for others (see GroupCommitter.linger).
Job = tuple[Operation, tuple[Part, ...], Deferred[None], bool, bool]
_STOP = object()
MAX_BATCH = 1024  # operations in one batch at most


def _steps(part: Part) -> Steps:
    """A part's steps, from its call on: a generator function's own steps, a
    plain function's one."""
    steps = part()
    if steps is not None:
        yield from steps


_DONE = -2  # what _advance returns for a part that has ended


def _advance(steps: Steps, error: BaseException | None) -> int | None:
    """Take a part one step further, raising ``error`` (its last fsync's) inside
    it if given: what it asks for next (None, or a descriptor to fsync), or
    _DONE.  Raises what the part raises."""
    try:
        return steps.throw(error) if error is not None else next(steps)
    except StopIteration:
        return _DONE


def run_to_end(steps: Steps | None) -> None:
    """Run a part's steps one after the other, with the fsyncs it asks for (a
    plain function's None: nothing left).  A failed fsync is raised inside the
    part, where its step would have raised it."""
    if steps is None:
        return
    error: BaseException | None = None
    while (fd := _advance(steps, error)) != _DONE:  # ends: a part yields a few times
        error = None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                error = e


def _batch_scheduling() -> None:
    """Put the calling thread in SCHED_BATCH (Linux; elsewhere nothing changes).

    The committer, woken by the disk, would otherwise preempt the reactor
    thread on its CPU, only to wait for the GIL that thread holds: two
    context switches for nothing.  In SCHED_BATCH a woken thread does not
    preempt; it runs on an idle CPU, or when the reactor thread next waits.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class GroupCommitter:
    def __init__(self, reactor: Any, directory: Path, fsync: bool = True,
                 whole_filesystem: bool = False, name: str = "queue-commit",
                 linger: float = 0.0) -> None:
        self.reactor = reactor
        # A batch that begins with an operation submitted with may_wait=True
        # (nobody waits for it: a removal) collects more for up to ``linger``
        # seconds, so more of them share one directory sync; an operation
        # submitted without it ends the wait at once.
        self.linger = linger
        self.name = name  # of the thread
        self.directory = directory
        self.fsync = fsync
        # syncfs mode: operations skip their per-file fsyncs and the batch ends
        # with one syncfs(2) of the queue's filesystem instead of a directory fsync.
        self.whole_filesystem = whole_filesystem
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._aio: AioFsync | None = None  # the committer thread's (see _fsync_all)
        self._aio_usable = True
        self.batches = 0  # for tests and metrics: how many batches
        self.syncs = 0  # how many directory fsyncs (or syncfs calls)
        self.operations = 0

    def submit(self, operation: Operation, parts: Sequence[Part] = (),
               sync_directory: bool = True, may_wait: bool = False) -> Deferred[None]:
        """Run ``parts`` (stepped together), then ``operation``, durably; the Deferred fires
        once they and the directory are synced.  A failed part skips ``operation``.

        ``sync_directory=False``: the operation changes no directory entry that
        must be durable (its parts fsync what they wrote), so it needs no
        directory fsync of its own; it still fires with its batch."""
        if not self.fsync:
            try:
                for part in parts:
                    run_to_end(part())
                operation()
            except Exception:
                return fail(Failure())
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ensure_thread()
        self._jobs.put((operation, tuple(parts), d, sync_directory, may_wait))
        return d

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Finish what was submitted, then end the worker thread (bounded wait)."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join(timeout=30)

    def _work(self) -> None:
        _batch_scheduling()
        try:
            self._serve()
        finally:
            self._close_aio()

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            deadline = time.monotonic() + self.linger if first[4] and self.linger else 0.0
            while len(batch) < MAX_BATCH:
                wait = deadline - time.monotonic() if deadline else 0.0
                try:
                    job = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
                if not job[4]:
                    deadline = 0.0  # someone waits for this one: no more lingering
            self._run_batch(batch)
            if stop:
                return

    def _run_parts(self, batch: list[Job]) -> list[BaseException | None]:
        """Every part of every job, stepped together (see the module docstring);
        per job the first error of its parts, or None."""
        errors: list[BaseException | None] = [None] * len(batch)
        running: list[tuple[int, Steps, BaseException | None]] = [
            (i, _steps(part), None) for i, (_, parts, _, _, _) in enumerate(batch) for part in parts]
        while running:  # ends: each pass takes every part one step further, and parts end
            still: list[tuple[int, Steps, BaseException | None]] = []
            fds: list[int | None] = []
            for i, steps, error in running:
                try:
                    fd = _advance(steps, error)
                except BaseException as e:
                    errors[i] = errors[i] or e
                    continue
                if fd != _DONE:
                    still.append((i, steps, None))
                    fds.append(fd)
            failed = self._fsync_all(fds)
            running = [(i, steps, failed.get(n)) for n, (i, steps, _) in enumerate(still)]
        return errors

    def _fsync_all(self, fds: list[int | None]) -> dict[int, BaseException]:
        """fsync the descriptors the parts asked for (None: none), at the same time
        when there are several; the errors by position.

        Each fsync is a disk flush, which under load waits for everything the
        disk has in flight, so fsyncs one after the other add up (figures in
        bench/README.rst).  Flushes asked for at the same time are merged by
        the kernel's block layer, so several are submitted in one Linux AIO
        call (:mod:`mta.system.aiofsync`), on this thread, without helper
        threads.  Where AIO cannot be used they are made one after the other.
        """
        wanted = [(n, fd) for n, fd in enumerate(fds) if fd is not None]
        if len(wanted) > 1 and self._aio_usable:
            codes = self._aio_fsync([fd for _, fd in wanted])
            if codes is not None:
                return {n: OSError(code, os.strerror(code)) for (n, _), code in zip(wanted, codes, strict=True)
                        if code}
        failed: dict[int, BaseException] = {}
        for n, fd in wanted:
            try:
                os.fsync(fd)
            except OSError as e:
                failed[n] = e
        return failed

    def _aio_fsync(self, fds: list[int]) -> list[int] | None:
        """The errno of each fsync made through AIO, or None where AIO cannot be
        used (then it is not tried again)."""
        if self._aio is None:
            self._aio = AioFsync.open()
            if self._aio is None:
                self._aio_usable = False
                self.reactor.callFromThread(
                    log.info, "{name}: Linux AIO fsync is not available here; files are fsynced "
                    "one after the other", name=self.name)
                return None
        try:
            return self._aio.fsync_all(fds)
        except OSError as e:  # the context is in doubt: its fsyncs are made again, plainly
            self._close_aio()
            self._aio_usable = False
            self.reactor.callFromThread(
                log.warn, "{name}: Linux AIO fsync failed ({err}); files are fsynced one after "
                "the other from now on", name=self.name, err=e)
            return None

    def _close_aio(self) -> None:
        aio, self._aio = self._aio, None
        if aio is not None:
            aio.close()

    def _run_batch(self, batch: list[Job]) -> None:
        outcomes: list[tuple[Deferred[None], BaseException | None]] = []
        part_errors = self._run_parts(batch)
        sync_directory = False
        for (operation, _, d, directory, _), error in zip(batch, part_errors, strict=True):
            if error is None:
                try:
                    operation()
                except BaseException as e:  # reported to the waiting Deferred
                    error = e
                else:
                    sync_directory = sync_directory or directory
            outcomes.append((d, error))
        # syncfs mode: the parts fsynced nothing, so any success needs the syncfs.
        if sync_directory or (self.whole_filesystem and any(e is None for _, e in outcomes)):
            try:
                if self.whole_filesystem:
                    syncfs(self.directory)
                else:
                    fsync_dir(self.directory)
            except OSError as e:
                outcomes = [(d, error or e) for d, error in outcomes]
            self.syncs += 1
        self.batches += 1
        self.operations += len(batch)
        self.reactor.callFromThread(self._fire, outcomes)

    @staticmethod
    def _fire(outcomes: list[tuple[Deferred[None], BaseException | None]]) -> None:
        for d, error in outcomes:
            if error is None:
                d.callback(None)
            else:
                d.errback(Failure(error))
