"""The spare-file pool: empty queue files made ahead of time.

A message held in memory (most mail) is committed into a *spare*: an empty
file the store made in ``msg/`` ahead of time, under a fresh queue id, in
mode ``RECEIVING`` (:mod:`mta.queue.layout`), in batches whose directory
entries one directory fsync made durable (on the removals' group-commit
thread, so that making them never delays a commit).  Writing into it needs
no new directory entry between the client's final dot and our 250
(:mod:`mta.queue.writer`).  Without a spare (the first message after
start-up, a burst that emptied the pool) a message goes through ``tmp/``.

While spares are wanted, the data file of a finished message is not unlinked
but recycled into the next spare (made ``RECEIVING``, then renamed to a fresh
id): the blocks and the inode are reused, and a commit into it cuts it to the
new message's length.  A worker process gets the main process's recycled
files (``spare_outlet``, :meth:`SparePool.add_spares`).

:class:`SparePool` is the pool's half of :class:`mta.queue.store.QueueStore`
(which it is mixed into: the pool uses the store's ``clock``, ``remover``
and paths).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.queue.layout import RECEIVING, is_ready, message_files, new_queue_id, unlink_quietly

log = Logger()

# Spares: made SPARE_BATCH at a time (one directory fsync for the batch) when
# fewer than SPARE_LOW are left; one older than SPARE_MAX_AGE seconds is
# dropped rather than used, so a queue id's time stays within a minute of
# the message's arrival.
SPARE_BATCH = 32
SPARE_LOW = 16
SPARE_MAX_AGE = 60.0
# A finished message's file becomes a spare (see QueueStore.remove_async) while
# a process keeps fewer than SPARE_KEEP of them.
SPARE_KEEP = 2 * SPARE_BATCH


class SpareOutlet(Protocol):
    """Who else takes the files of finished messages as spares (given to
    :class:`~mta.queue.store.QueueStore` at construction): the main process's
    worker pool, :class:`mta.daemon.workers.WorkerSpares`."""

    def spare_taker(self, keep: Callable[[list[str]], None]) -> Callable[[str | None], None] | None:
        """A taker for the next recycled spare, called once with its id (or None if
        the file could not be recycled), or None: nobody here wants one.  ``keep``
        (:meth:`SparePool.add_spares`) takes back spares that could not go after all."""


class SparePool:
    """The spares of one process (mixed into QueueStore; see the module docstring)."""

    # Provided by the store: its clock, its removals' group committer, and
    # data_path(queue_id) and _remove_files(queue_id).
    clock: Callable[[], float]
    remover: Any
    data_path: Callable[[str], Path]
    _remove_files: Callable[[str], None]

    def _init_spares(self, spares: bool, spare_outlet: SpareOutlet | None = None) -> None:
        self.spares = spares
        self._spares: deque[tuple[str, float]] = deque()  # (queue id, when made), oldest first
        self._refilling = False
        self._making: set[str] = set()  # ids of a batch of spares being made
        self._closed = False  # discard_spares() was called: no more spares
        self._recycling = 0  # finished messages' files on their way into our pool
        self._recycled_pending: set[str] = set()  # ids of spares being recycled, any taker
        # Where a recycled spare goes before our own pool: in the main process
        # with workers, the worker pool's spares (a worker that needs them).
        self.spare_outlet = spare_outlet

    def prepare_spares(self) -> None:
        """Start making spares now (at start-up, after :meth:`recover`)."""
        self._closed = False
        if self.spares:
            self._refill()

    def spare_count(self) -> int:
        return len(self._spares)

    def making_spares(self) -> bool:
        """Whether a batch of spares is being made (on the ``remover``'s thread)."""
        return self._refilling

    def _take_spare(self) -> tuple[str, float] | None:
        now = self.clock()
        stale = []
        spare = None
        while self._spares:  # bounded: each pass takes one out
            queue_id, made = self._spares.popleft()
            if now - made <= SPARE_MAX_AGE:
                spare = (queue_id, made)
                break
            stale.append(queue_id)
        if stale:
            # No fsync: a removed spare that a crash brings back is removed by recovery.
            self.remover.submit(lambda: self._unlink_all(stale), sync_directory=False)
        self._refill()
        return spare

    def _give_back_spare(self, queue_id: str, made: float) -> None:
        self._spares.appendleft((queue_id, made))

    def _refill(self) -> None:
        """Make SPARE_BATCH spares, on the ``remover``'s thread with one directory
        fsync for all, when fewer than SPARE_LOW are left."""
        if self._refilling or self._closed or len(self._spares) >= SPARE_LOW:
            return
        self._refilling = True
        made_at = self.clock()
        ids = [new_queue_id(made_at) for _ in range(SPARE_BATCH)]
        self._making.update(ids)
        made: list[str] = []

        def make() -> None:
            for queue_id in ids:
                fd = os.open(self.data_path(queue_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, RECEIVING)
                os.close(fd)
                made.append(queue_id)

        def done(_: None) -> None:
            self._refilling = False
            self._making.difference_update(ids)
            if self._closed:
                self._unlink_all(made)
            else:
                self._spares.extend((queue_id, made_at) for queue_id in made)

        def failed(failure: Failure) -> None:
            self._refilling = False
            self._making.difference_update(ids)
            log.warn("could not make spare queue files: {err}", err=failure.getErrorMessage())
            self._unlink_all(made)

        self.remover.submit(make).addCallbacks(done, failed)

    def sweep_unfinished(self, older_than: float) -> int:
        """Remove files in msg/ still in mode ``RECEIVING`` whose last change is more
        than ``older_than`` seconds ago: spares of a process that died (its own
        are removed at shutdown, everyone's at the next start).  Past
        SPARE_MAX_AGE no process uses its spare any more, and one taken by a
        session is written or given up within the session's lifetime, so with
        ``older_than`` above both nothing live goes (a commit that still found
        its file gone would fail with 451, never lose a message).  Returns how
        many were removed."""
        limit = self.clock() - older_than
        removed = 0
        for _, path, st in message_files(self.msg_dir):
            if not is_ready(st.st_mode) and st.st_mtime < limit:
                unlink_quietly(Path(path))
                removed += 1
        return removed

    def _unlink_all(self, ids: list[str]) -> None:
        for queue_id in ids:
            unlink_quietly(self.data_path(queue_id))

    def discard_spares(self) -> None:
        """At shutdown: make no more spares and remove the unused ones, also those
        of a batch still being made and the finished messages' files being
        recycled (waits for the group-commit threads to finish what they were
        given).  No fsync: recovery removes any a crash brought back."""
        self._closed = True
        self.committer.stop()
        self.remover.stop()
        spares, self._spares = list(self._spares), deque()
        self._unlink_all([queue_id for queue_id, _ in spares] + sorted(self._making)
                         + sorted(self._recycled_pending))
        self._making.clear()
        self._recycled_pending.clear()

    def _recycle_file(self, queue_id: str, spare_id: str) -> bool:
        """Make ``queue_id``'s data file the spare ``spare_id`` (on the remover's
        thread); whether it did.  If it cannot, the message is removed."""
        path = self.data_path(queue_id)
        try:
            os.chmod(path, RECEIVING)  # no message any more, to any reader
            os.rename(path, self.data_path(spare_id))
            os.utime(self.data_path(spare_id))  # a spare's age counts from now (sweep_unfinished)
        except OSError:
            self._remove_files(queue_id)
            unlink_quietly(self.data_path(spare_id))
            return False
        unlink_quietly(self.envelope_path(queue_id))
        return True

    def _spare_taker(self) -> Callable[[str | None], None] | None:
        """Where the spare a finished message's file would become goes: a worker
        process that needs spares (``spare_outlet``), else our own pool while it
        holds fewer than SPARE_KEEP; None: nobody wants one (then the file is
        removed).  The taker is called once, with the spare's id, or with None
        if the file could not be recycled."""
        if not self.spares or self._closed:
            return None
        if self.spare_outlet is not None:
            outlet = self.spare_outlet.spare_taker(self.add_spares)
            if outlet is not None:
                return outlet
        if len(self._spares) + self._recycling >= SPARE_KEEP:
            return None
        self._recycling += 1
        return self._take_recycled

    def _take_recycled(self, spare_id: str | None) -> None:
        self._recycling -= 1
        if spare_id is not None:
            self.add_spares([spare_id])

    def add_spares(self, ids: list[str]) -> None:
        """Spares made elsewhere (a recycled file, here or in the main process)
        join the pool as made now; those that would take it past SPARE_KEEP +
        SPARE_BATCH, or come after :meth:`discard_spares`, are removed instead."""
        now = self.clock()
        extra = []
        for spare_id in ids:
            if self._closed or len(self._spares) >= SPARE_KEEP + SPARE_BATCH:
                extra.append(spare_id)
            else:
                self._spares.append((spare_id, now))
        if extra and self._closed:  # shutting down: the remover's thread is stopped
            self._unlink_all(extra)
        elif extra:
            # No fsync: a removed spare that a crash brings back is removed by recovery.
            self.remover.submit(lambda: self._unlink_all(extra), sync_directory=False)
