"""A worker process (``python -m mta.daemon.worker SPEC``), started by
:class:`mta.daemon.workers.WorkerPool`: it adopts the main process's listening
sockets and runs an MTAService: the SMTP side, and a first delivery pass of
each message it committed; a message still queued after it is announced on
its stdout, for the main process's runner; spare queue files come on its stdin.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet.main import CONNECTION_DONE

from mta.daemon.logs import worker_log_observer
from mta.daemon.workers import tell_main


def run_worker(spec: dict[str, Any]) -> None:
    """The worker process: the SMTP listeners of the main process, and a runner
    for the first pass of its own messages (see :mod:`mta.daemon.workers`)."""
    # A worker never outlives the main process (even after a SIGKILL of it):
    # Linux delivers SIGTERM to us when the parent dies (prctl PR_SET_PDEATHSIG).
    import ctypes

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mta.config import load_config
    from mta.daemon.service import MTAService

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != spec.get("parent"):
        raise SystemExit("mta worker: the main process is gone")
    globalLogBeginner.beginLoggingTo([worker_log_observer(spec.get("index", 0), reactor=reactor)],
                                     redirectStandardIO=False)
    config_path = Path(spec["config"]) if spec.get("config") else None
    config = load_config(config_path, spec.get("overrides") or {})
    service = MTAService(config, reactor, worker_fds=[tuple(x) for x in spec["fds"]],
                         config_path=config_path, overrides=spec.get("overrides") or {},
                         install_signals=True)

    if config.log_json is not None:  # the worker's own JSON log (mta.daemon.logs)
        from mta.daemon.logs import json_log_service, worker_json_path

        json_log = json_log_service(worker_json_path(config.log_json, spec.get("index", 0)))
        json_log.setName("json-log")
        json_log.setServiceParent(service)

    def hand_over(envelope: Any) -> None:
        # The first pass (ours) left this message queued: the main process's
        # runner keeps its retries from here, with the envelope as the pass
        # saved it (no read back from disk).
        tell_main(b"queued %s %s" % (envelope.id.encode("ascii"), envelope.to_line()))

    announcements: list[bytes] = []

    def announce(envelope: Any) -> None:
        # No runner here (workers_deliver off): every committed message goes
        # to the main process.  Called once the client's 250 has gone out;
        # the messages of one reactor turn go in one write when the turn ends
        # (one wake-up of the main process for all of them).
        if not announcements:
            reactor.callLater(0, send_announcements)
        announcements.append(b"queued %s %s\n" % (envelope.id.encode("ascii"), envelope.to_line()))

    def send_announcements() -> None:
        if announcements:
            data = b"".join(announcements)
            announcements.clear()
            tell_main(data[:-1])

    if service.runner is not None:
        service.runner.hand_over = hand_over
    else:
        service.context.store.subscribe(announce)
        # A message acknowledged in the reactor's last turn is still announced.
        reactor.addSystemEventTrigger("after", "shutdown", send_announcements)
    reactor.addReader(_SpareReader(service.context.store))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # Ignore SIGINT from a terminal's Ctrl-C: the main process stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor.run()


_SPARE_ID = re.compile(rb"[0-9a-f]{20}")


class _SpareReader:
    """The worker's stdin: lines ``spares ID ID ...`` from the main process, each
    ID a spare queue file it made of a finished message for us (see
    WorkerPool.owe_spare).  They join our store's pool."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._buffer = b""
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:  # noqa: N802
        return "spares"

    def doRead(self) -> Any:  # noqa: N802
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            return e
        if not data:
            return CONNECTION_DONE  # the main process is gone; we get SIGTERM
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 65536:  # no line is that long: not from the main process
            self._buffer = b""
        for line in lines:
            verb, _, rest = line.partition(b" ")
            if verb == b"spares":
                ids = [i.decode("ascii") for i in rest.split() if _SPARE_ID.fullmatch(i)]
                self.store.add_spares(ids)
        return None

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        pass


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
