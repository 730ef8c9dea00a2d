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

With ``fsync`` off (tests), operations run at once on the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.fsutil import fsync_dir, syncfs

log = Logger()

Operation = Callable[[], None]
_STOP = object()


class GroupCommitter:
    def __init__(self, reactor: Any, directory: Path, fsync: bool = True,
                 whole_filesystem: bool = False) -> None:
        self.reactor = reactor
        self.directory = directory
        self.fsync = fsync
        # syncfs mode: operations skip their per-file fsyncs and the batch ends
        # with one syncfs(2) of the queue's filesystem instead of a directory fsync.
        self.whole_filesystem = whole_filesystem
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # for tests and metrics: how many directory fsyncs
        self.operations = 0

    def submit(self, operation: Operation) -> Deferred[None]:
        """Run ``operation`` durably; the Deferred fires once it and the directory are synced."""
        if not self.fsync:
            try:
                operation()
            except Exception:
                return fail(Failure())
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ensure_thread()
        self._jobs.put((operation, d))
        return d

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="queue-commit", daemon=True)
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
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[Operation, Deferred[None]]]) -> None:
        outcomes: list[tuple[Deferred[None], BaseException | None]] = []
        for operation, d in batch:
            try:
                operation()
                outcomes.append((d, None))
            except BaseException as e:  # reported to the waiting Deferred
                outcomes.append((d, e))
        if any(error is None for _, error in outcomes):
            try:
                if self.whole_filesystem:
                    syncfs(self.directory)
                else:
                    fsync_dir(self.directory)
            except OSError as e:
                outcomes = [(d, error or e) for d, error in outcomes]
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
