"""Worker processes sharing the listening sockets (``workers = N`` in the configuration).

The Python reactor runs on one core; with ``workers`` > 1 the main process
(the one twistd starts) binds the listeners, then starts N-1 worker processes
that adopt the same listening sockets (``IReactorSocket.adoptStreamPort``), so
the kernel spreads new connections over all of them.  Every process runs the
full SMTP session and commits to the same queue directory (queue ids are
unique per message); only the main process runs the queue runner, the control
socket and the metrics.  A worker tells the main process about each message it
committed by writing ``queued <id> <envelope as one line of JSON>`` on its
stdout, right after the client's 250 has gone out (so the main process need
not read the envelope back from disk, and waking it does not delay the 250); if
that line is lost (the worker died), the message is still on disk, and the
main process looks for such messages when it learns that a worker ended.  A worker's
log lines (``[worker1 mta.smtp.server#info] ...``) come on its stderr and are
appended to the main log as they are.

This module is the main process's side (:class:`WorkerPool`); the worker process
itself is :mod:`mta.daemon.worker`, which builds an MTAService (this module does
not import the service: the service creates the pool and hands itself in).

Limits kept per process (connections per IP, rates) are per worker: with N
workers an address may hold up to N times ``max_connections_per_ip``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from mta.daemon.logs import write_log_text
from mta.queue.envelope import Envelope
from mta.queue.spares import SPARE_KEEP, SPARE_MAX_AGE

log = Logger()


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self._out = b""
        self._err = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            verb, _, rest = line.partition(b" ")
            queue_id, _, envelope = rest.partition(b" ")
            if verb == b"queued" and queue_id:
                self.pool.owe_spare(self.index)
                self.pool.queued(queue_id.decode("ascii", "replace"), envelope)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        # The worker's log lines arrive formatted ("<time> [workerN namespace#level] text");
        # they go to the main log file as they are, in one write, when that is a file.
        self._err += data
        end = self._err.rfind(b"\n")
        if end < 0:
            return
        chunk, self._err = self._err[: end + 1], self._err[end + 1 :]
        text = chunk.decode("utf-8", "replace")
        if not write_log_text(text):
            for line in text.splitlines():
                log.info("worker {index}: {line}", index=self.index, line=line)

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.pool.ended(self)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts, restarts, reloads and stops the worker processes of the main MTA process."""

    def __init__(self, mta_service: Any, count: int, spec: dict[str, Any]) -> None:
        self.mta = mta_service
        self.count = count
        self.spec = spec
        self.workers: dict[int, Any] = {}  # index -> process transport
        self.protocols: dict[int, _WorkerProtocol] = {}
        self.stopping = False
        self._sweep: Any = None  # the delayed removal of an ended worker's spares
        self.fds: list[tuple[str, int, int]] = []
        # Spares each worker used (one per message it announced) and has not had
        # back yet; the files of finished messages go back to it (see owe_spare).
        self.spares_owed: dict[int, int] = {}
        self._spares_out: dict[int, list[str]] = {}  # to send at the end of this turn
        mta_service.context.store.spare_outlet = self._spare_outlet

    def spawn_all(self, ports: list[Any]) -> None:
        self.fds = [(listener.name, port.fileno(), port.addressFamily)
                    for listener, port in zip(self.mta.config.listeners, ports, strict=True)]
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        spec = dict(self.spec, fds=self.fds, index=index, parent=os.getpid())
        protocol = _WorkerProtocol(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for _, fd, _ in self.fds:
            child_fds[fd] = fd
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        transport = self.mta.reactor.spawnProcess(
            protocol, sys.executable, [sys.executable, "-m", "mta.daemon.worker", json.dumps(spec)],
            env=env, childFDs=child_fds)
        self.workers[index] = transport
        self.protocols[index] = protocol
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def queued(self, queue_id: str, envelope_json: bytes = b"") -> None:
        """A worker committed ``queue_id``: hand it to the runner, with the envelope
        the worker sent (read from disk instead if that is missing or unreadable)."""
        runner = self.mta.runner
        if runner is None:
            return
        try:
            envelope = Envelope.from_bytes(envelope_json)
        except (ValueError, KeyError, TypeError):
            envelope = None
        if envelope is not None and envelope.id == queue_id:
            runner.committed(envelope)
        else:
            runner.flush(queue_id)

    # --- spares: a finished message's file goes back to a worker as its next spare ---

    def owe_spare(self, index: int) -> None:
        """Worker ``index`` announced a message: it used up a spare, and the queue
        store's next recycled file goes to it (mta.queue.store.remove_async), so
        the worker need not make spares of its own (a new file costs ext4 an
        inode and blocks; a recycled one has both).  Bounded by SPARE_KEEP."""
        self.spares_owed[index] = min(self.spares_owed.get(index, 0) + 1, SPARE_KEEP)

    def _spare_outlet(self) -> Callable[[str | None], None] | None:
        """Where the store's next recycled spare goes: the live worker owed the
        most, or None (the store keeps it, or removes the file)."""
        owed = [(n, index) for index, n in self.spares_owed.items() if n > 0 and index in self.workers]
        if not owed or self.stopping:
            return None
        _, index = max(owed)
        self.spares_owed[index] -= 1
        return lambda spare_id: self._send_spare(index, spare_id)

    def _send_spare(self, index: int, spare_id: str | None) -> None:
        """Queue ``spare_id`` for worker ``index``: the spares of one reactor turn
        go in one line on its stdin (``spares ID ID ...``).  None: the file
        could not be recycled, so the worker is still owed one."""
        if spare_id is None:
            if index in self.workers:
                self.owe_spare(index)
            return
        if index not in self.workers or self.stopping:  # ours instead (or removed, if we stop)
            self.mta.context.store.add_spares([spare_id])
            return
        if not self._spares_out:
            self.mta.reactor.callLater(0, self._flush_spares)
        self._spares_out.setdefault(index, []).append(spare_id)

    def _flush_spares(self) -> None:
        out, self._spares_out = self._spares_out, {}
        for index, ids in out.items():
            transport = self.workers.get(index)
            if transport is None or self.stopping:
                self.mta.context.store.add_spares(ids)
                continue
            try:
                transport.writeToChild(0, b"spares " + " ".join(ids).encode("ascii") + b"\n")
            except Exception:  # its pipe is gone: the files are swept (see ended) or recovered
                log.failure("could not hand spares to worker {index}", index=index)

    def ended(self, protocol: _WorkerProtocol) -> None:
        self.workers.pop(protocol.index, None)
        self.spares_owed.pop(protocol.index, None)
        if not self.stopping:
            log.error("worker {index} ended; starting it again", index=protocol.index)
            self.mta.reactor.callLater(1.0, self._respawn, protocol.index)
            # Everything it wrote on its stdout has been read by now: a message
            # it committed but never announced is found on disk.
            if self.mta.runner is not None:
                self.mta.runner.adopt_unknown()
            # Its spare queue files outlive it; once none of them can be in use
            # (past the session lifetime), they are removed.
            self._sweep_after(self.mta.config.limits.session_timeout + SPARE_MAX_AGE + 60)

    def _sweep_after(self, delay: float) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = self.mta.reactor.callLater(delay, self._sweep_now, delay)

    def _sweep_now(self, older_than: float) -> None:
        self._sweep = None
        removed = self.mta.context.store.sweep_unfinished(older_than)
        if removed:
            log.info("removed {count} spare queue files left by an ended worker", count=removed)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    def signal_all(self, name: str) -> None:
        for transport in list(self.workers.values()):
            try:
                transport.signalProcess(name)
            except Exception:
                pass

    def stop(self) -> Deferred[Any]:
        """SIGTERM to every worker; they finish like the main process does."""
        self.stopping = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()  # the next start's recovery removes those files
        self._sweep = None
        waits = [p.ended for i, p in self.protocols.items() if i in self.workers]
        self.signal_all("TERM")
        if not waits:
            return succeed(None)
        from twisted.internet.defer import DeferredList

        return DeferredList(waits)
