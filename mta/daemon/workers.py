"""Worker processes sharing the listening sockets (``workers = N`` in the configuration).

The Python reactor runs on one core; with ``workers`` > 1 the main process
(the one twistd starts) binds the listeners, then starts N-1 worker processes
that adopt the same listening sockets (``IReactorSocket.adoptStreamPort``), so
the kernel spreads new connections over all of them.  Every process runs the
full SMTP session and commits to the same queue directory (queue ids are
unique per message); only the main process runs the control socket and the
metrics.  By default the main process delivers everything: a worker writes
``queued <id> <envelope>`` for each message it committed.  With
``workers_deliver = true`` every process delivers: a worker makes the first
delivery pass of each message it committed itself (so delivery, most of the
CPU per message, runs on every core, not only on the main process's); a
message still queued after that pass (deferred, a notice owed) is handed to
the main process, whose runner keeps the retries: the worker writes ``queued <id> <envelope as one
line of JSON>`` on its stdout (so the main process need not read the envelope
back from disk).  If a worker dies, what it had committed and not handed over
is still on disk, and the main process looks for such messages when it learns
that a worker ended.  A worker's
log lines (``[worker1 mta.smtp.server#info] ...``) come on its stderr and are
appended to the main log as they are.

This module is the main process's side: :class:`WorkerPool` (the processes) and
:class:`WorkerSpares` (the spare queue files owed to them); the worker process
itself is :mod:`mta.daemon.worker`.  Neither class sees the service: the
composition root (:mod:`mta.daemon.service`) hands each exactly what it uses,
typed by the small protocols below.

Limits kept per process (connections per IP, rates, delivery connections) are
per worker: with N workers an address may hold up to N times
``max_connections_per_ip``, and up to N times ``delivery.max_connections``
connections go out.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from mta.daemon.logs import write_log_text
from mta.queue.envelope import Envelope
from mta.queue.spares import SPARE_KEEP, SPARE_MAX_AGE
from mta.system.fsutil import write_all

log = Logger()


class TurnClock(Protocol):
    """``IReactorTime.callLater``: the spares of one reactor turn go out together."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,  # noqa: N802
                  **kw: Any) -> Any: ...


class ProcessReactor(TurnClock, Protocol):
    """What the pool needs of the reactor: starting processes
    (``IReactorProcess.spawnProcess``) and timers."""

    def spawnProcess(self, processProtocol: Any, executable: str, args: Sequence[str],  # noqa: N802, N803
                     env: dict[str, str] | None = None, path: str | None = None,
                     uid: int | None = None, gid: int | None = None, usePTY: bool = False,  # noqa: N803
                     childFDs: dict[int, Any] | None = None) -> Any: ...  # noqa: N803


class Announced(Protocol):
    """What the pool needs of the queue runner (:class:`mta.queue.runner.QueueRunner`):
    a worker's messages handed over, and a look for those it never announced."""

    def committed(self, envelope: Envelope) -> None:
        """A worker committed this message and sent its envelope."""

    def flush(self, queue_id: str | None = None) -> int:
        """A worker committed ``queue_id``; read its envelope from disk."""

    def adopt_unknown(self) -> int:
        """Schedule every queued message nobody announced (a worker ended)."""


class TLSCounts(Protocol):
    """What the pool needs of the TLS reporter (mta.delivery.tlsrpt.TLSReporter):
    the sessions a worker counted (mta.delivery.tlsrpt.record_line)."""

    def record(self, domain: str, policy_type: str, result: str, mx: str = "",
               details: dict[str, str] | str | None = None, *,
               policy_string: Sequence[str] = (), mx_patterns: Sequence[str] = ()) -> None: ...


class LeftFiles(Protocol):
    """What the pool needs of the queue store: removing an ended worker's spare files."""

    def sweep_unfinished(self, older_than: float) -> int:
        """Remove spare and unfinished files older than ``older_than`` seconds; how many."""


class WorkerChannel(Protocol):
    """A worker process's transport, as far as its spares go: its stdin."""

    def writeToChild(self, childFD: int, data: bytes) -> None: ...  # noqa: N802, N803


SpareTaker = Callable[[str | None], None]


def tell_main(line: bytes) -> None:
    """In a worker process: one line to the main process (the worker's stdout,
    read by _WorkerProtocol): ``queued ID ENVELOPE`` (a message it keeps from
    now on) or ``tlsrpt COUNT`` (a TLS session for its reporter,
    mta.delivery.tlsrpt.ForwardedCounts)."""
    try:
        write_all(1, line + b"\n")
    except OSError:
        pass  # the main process is gone (a message is on disk for the next start)


def tell_tls_count(line: bytes) -> None:
    """In a worker process: a TLS count (mta.delivery.tlsrpt.ForwardedCounts) to
    the main process's reporter."""
    tell_main(b"tlsrpt " + line)


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
            if verb == b"tlsrpt":
                self.pool.tls_counted(self.index, rest)
                continue
            if verb == b"queued" and queue_id:
                self.pool.spares.owe_spare(self.index)
                qid = queue_id.decode("ascii", "replace")
                if self.pool.deliver:
                    log.info("message {queue_id} still queued after worker {worker}'s first "
                             "pass: the main process keeps it", queue_id=qid, worker=self.index,
                             event="handed_over")
                self.pool.queued(qid, envelope)

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


class WorkerSpares:
    """The spare queue files owed to worker processes, and their way there.

    Each message a worker announced used up one of its spares; the main
    process's queue store recycles the files of finished messages and, before
    keeping one itself, asks this outlet (it is the store's ``spare_outlet``,
    given at the store's construction: :class:`mta.queue.store.SpareOutlet`)
    whether a worker is owed one.  The spares of one reactor turn go to a
    worker in one line on its stdin (``spares ID ID ...``).  A spare that
    cannot go (the worker ended, or the pool stops) goes back to the store
    through the ``keep`` it gave with the request.

    The pool tells this outlet which workers run (:meth:`started`,
    :meth:`ended`) and when it stops (:meth:`stop`).
    """

    def __init__(self, clock: TurnClock) -> None:
        self.clock = clock
        self.workers: dict[int, WorkerChannel] = {}  # the live workers' transports
        self.stopping = False
        # Spares each worker used (one per message it announced) and has not had
        # back yet; the files of finished messages go back to it (see owe_spare).
        self.spares_owed: dict[int, int] = {}
        self._spares_out: dict[int, list[str]] = {}  # to send at the end of this turn
        self._keep: Callable[[list[str]], None] | None = None  # the store's, for this turn's

    def started(self, index: int, channel: WorkerChannel) -> None:
        self.workers[index] = channel

    def ended(self, index: int) -> None:
        self.workers.pop(index, None)
        self.spares_owed.pop(index, None)

    def stop(self) -> None:
        self.stopping = True

    def owe_spare(self, index: int) -> None:
        """Worker ``index`` announced a message: it used up a spare, and the queue
        store's next recycled file goes to it (mta.queue.store.remove_async), so
        the worker need not make spares of its own (a new file costs ext4 an
        inode and blocks; a recycled one has both).  Bounded by SPARE_KEEP."""
        self.spares_owed[index] = min(self.spares_owed.get(index, 0) + 1, SPARE_KEEP)

    def spare_taker(self, keep: Callable[[list[str]], None]) -> SpareTaker | None:
        """Where the store's next recycled spare goes: the live worker owed the
        most, or None (the store keeps it, or removes the file).  ``keep`` is the
        store's way to take back spares that could not go after all."""
        owed = [(n, index) for index, n in self.spares_owed.items() if n > 0 and index in self.workers]
        if not owed or self.stopping:
            return None
        _, index = max(owed)
        self.spares_owed[index] -= 1
        return lambda spare_id: self._send_spare(index, spare_id, keep)

    def _send_spare(self, index: int, spare_id: str | None,
                    keep: Callable[[list[str]], None]) -> None:
        """Queue ``spare_id`` for worker ``index``: the spares of one reactor turn
        go in one line on its stdin (``spares ID ID ...``).  None: the file
        could not be recycled, so the worker is still owed one."""
        if spare_id is None:
            if index in self.workers:
                self.owe_spare(index)
            return
        if index not in self.workers or self.stopping:  # the store's instead (or removed, if we stop)
            keep([spare_id])
            return
        if not self._spares_out:
            self.clock.callLater(0, self._flush_spares)
        self._keep = keep
        self._spares_out.setdefault(index, []).append(spare_id)

    def _flush_spares(self) -> None:
        out, self._spares_out = self._spares_out, {}
        keep, self._keep = self._keep, None
        for index, ids in out.items():
            channel = self.workers.get(index)
            if channel is None or self.stopping:
                if keep is not None:
                    keep(ids)
                continue
            try:
                channel.writeToChild(0, b"spares " + " ".join(ids).encode("ascii") + b"\n")
            except Exception:  # its pipe is gone: the files are swept (see ended) or recovered
                log.failure("could not hand spares to worker {index}", index=index)


class WorkerPool(Service):
    """Starts, restarts, reloads and stops the worker processes of the main MTA process.

    Built by the composition root with exactly what it uses: the ``reactor``
    (processes and timers), the listener names in the order of the ``ports``
    given to :meth:`spawn_all`, the ``spares`` outlet, the ``runner`` that
    takes the workers' messages (None: nobody delivers here), the queue's
    ``files`` (an ended worker's spares are swept) and ``session_timeout``,
    read when a worker ends (so a reload is seen): its spares are removed
    once no session can still be writing one.
    """

    def __init__(self, reactor: ProcessReactor, count: int, spec: dict[str, Any], *,
                 listeners: Sequence[str], spares: WorkerSpares, runner: Announced | None,
                 files: LeftFiles, session_timeout: Callable[[], float],
                 tls_reports: TLSCounts | None = None, deliver: bool = False) -> None:
        self.reactor = reactor
        self.count = count
        # workers_deliver: a worker's "queued" line is a message left after its
        # first pass (logged as handed over), else every message it accepted.
        self.deliver = deliver
        self.spec = spec
        self.listeners = tuple(listeners)
        self.spares = spares
        self.runner = runner
        self.files = files
        self.session_timeout = session_timeout
        # The main process's TLS reporter: the workers' TLS counts go there
        # (RFC 8460 reports from one process, one state file); None: not configured.
        self.tls_reports = tls_reports
        self.workers: dict[int, Any] = {}  # index -> process transport
        self.protocols: dict[int, _WorkerProtocol] = {}
        self.stopping = False
        self._sweep: Any = None  # the delayed removal of an ended worker's spares
        self.fds: list[tuple[str, int, int]] = []

    def spawn_all(self, ports: list[Any]) -> None:
        self.fds = [(name, port.fileno(), port.addressFamily)
                    for name, port in zip(self.listeners, ports, strict=True)]
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        spec = dict(self.spec, fds=self.fds, index=index, parent=os.getpid())
        protocol = _WorkerProtocol(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for _, fd, _ in self.fds:
            child_fds[fd] = fd
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        transport = self.reactor.spawnProcess(
            protocol, sys.executable, [sys.executable, "-m", "mta.daemon.worker", json.dumps(spec)],
            env=env, childFDs=child_fds)
        self.workers[index] = transport
        self.spares.started(index, transport)
        self.protocols[index] = protocol
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def queued(self, queue_id: str, envelope_json: bytes = b"") -> None:
        """A worker committed ``queue_id``: hand it to the runner, with the envelope
        the worker sent (read from disk instead if that is missing or unreadable)."""
        runner = self.runner
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

    def tls_counted(self, index: int, line: bytes) -> None:
        """Worker ``index`` counted a TLS session (mta.delivery.tlsrpt.ForwardedCounts)."""
        if self.tls_reports is None:
            return
        from mta.delivery.tlsrpt import record_line

        try:
            record_line(self.tls_reports, line)
        except ValueError as e:
            log.error("worker {index} sent a TLS count that is not one: {err}", index=index,
                      err=e)

    def ended(self, protocol: _WorkerProtocol) -> None:
        self.workers.pop(protocol.index, None)
        self.spares.ended(protocol.index)
        if not self.stopping:
            log.error("worker {index} ended; starting it again", index=protocol.index)
            self.reactor.callLater(1.0, self._respawn, protocol.index)
            # Everything it wrote on its stdout has been read by now: a message
            # it committed but never announced is found on disk.
            if self.runner is not None:
                self.runner.adopt_unknown()
            # Its spare queue files outlive it; once none of them can be in use
            # (past the session lifetime), they are removed.
            self._sweep_after(self.session_timeout() + SPARE_MAX_AGE + 60)

    def _sweep_after(self, delay: float) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = self.reactor.callLater(delay, self._sweep_now, delay)

    def _sweep_now(self, older_than: float) -> None:
        self._sweep = None
        removed = self.files.sweep_unfinished(older_than)
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
        self.spares.stop()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()  # the next start's recovery removes those files
        self._sweep = None
        waits = [p.ended for i, p in self.protocols.items() if i in self.workers]
        self.signal_all("TERM")
        if not waits:
            return succeed(None)
        from twisted.internet.defer import DeferredList

        return DeferredList(waits)
