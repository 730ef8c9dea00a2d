#!/usr/bin/env python3
"""CPU of the delivery side alone: queue runner + SMTP client -> smtp-sink.

  python3 bench/delivery_micro.py [--messages 3000] [--size 4096] [--rounds 3]

Fills a fresh queue with --messages committed messages (no SMTP server
involved), starts the queue runner on it with the smarthost set to a
Postfix ``smtp-sink`` on loopback, and measures this process's CPU time
(user + system, all threads) from the runner's start until the queue is
empty, the log lines written to a file as the daemon writes them.  Prints the CPU milliseconds per message of each round and their
median.  Unlike the end-to-end benchmark (bench/run.sh) nothing else
competes for the two cores but the sink, so the figure moves little from run
to run (about +-5 % here): it is meant for comparing two versions of the
delivery code.  It includes what the daemon does not do per message: the
runner's start-up scan reads every envelope, and each first pass reads it
again (in the daemon a new message's envelope comes from the SMTP session).
The queue is fsynced as in production (queue_sync = "fsync").
"""

from __future__ import annotations

import argparse
import cProfile
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402
from twisted.logger import FileLogObserver, globalLogBeginner  # noqa: E402

from mta.config import config_from_dict  # noqa: E402
from mta.daemon.logs import classic_formatter  # noqa: E402
from mta.delivery.wiring import build_runner  # noqa: E402
from mta.queue.envelope import Envelope, Recipient, RecipientKind  # noqa: E402
from mta.queue.store import QueueStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fill(store: QueueStore, count: int, size: int) -> None:
    line = b"X" * 78 + b"\r\n"
    body = b"Received: from bench\r\nSubject: delivery micro\r\n\r\n" + line * (size // len(line))
    for _ in range(count):  # bounded by --messages
        writer = store.new_message(buffered=True)
        writer.write(body)
        rcpt = Recipient("bench@bench.test", RecipientKind.REMOTE, "bench@bench.test")
        writer.commit(Envelope(writer.id, "bench@src.test", [rcpt], time.time()))


async def one_round(work: Path, sink_port: int, count: int, size: int,
                    profile: str | None = None) -> float:
    raw = {
        "hostname": "bench-mta.test", "local_domains": [], "data_dir": str(work / "data"),
        "domains_dir": str(work / "domains"), "queue_dir": str(work / "queue"),
        "listeners": {"mx": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "mx"}},
        "dns": {"servers": ["127.0.0.1:9"], "timeout": 1.0},
        "delivery": {"smarthosts": [f"127.0.0.1:{sink_port}"], "smarthost_tls": "none",
                     "max_connections": 100, "max_connections_per_destination": 20},
    }
    (work / "domains").mkdir(parents=True, exist_ok=True)
    config = config_from_dict(raw, work)
    fill(QueueStore(config.queue_dir, fsync=False, reactor=reactor), count, size)
    store = QueueStore(config.queue_dir, fsync=True, reactor=reactor)
    runner = build_runner(config, store, reactor)
    profiler = cProfile.Profile() if profile else None
    start = cpu_seconds()
    if profiler is not None:
        profiler.enable()
    runner.start()
    deadline = time.monotonic() + 300
    # Polled a few times a second: cheap next to the work measured.  store.ids(),
    # not a bare listdir of msg/: the store's spare files stay in msg/.
    while store.ids() and time.monotonic() < deadline:  # bounded: 300 s at most
        await deferLater(reactor, 0.2, lambda: None)
    used = cpu_seconds() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    left = len(store.ids())
    await runner.stop()
    store.committer.stop()
    if left:
        raise SystemExit(f"delivery_micro: {left} messages still queued after 300 s")
    return 1000 * used / count


async def main(a: argparse.Namespace) -> None:
    sink_port = free_port()
    binary = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if binary is None:
        raise SystemExit("smtp-sink not found (Debian package postfix)")
    argv = [binary, f"127.0.0.1:{sink_port}", "1000"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]  # smtp-sink refuses to run as root
    sink = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # bounded: up to 10 s for the sink to listen
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", sink_port)) == 0:
                    break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            raise SystemExit("delivery_micro: smtp-sink did not start")
        per_message = []
        for i in range(a.rounds):
            work = Path(tempfile.mkdtemp(prefix="delivery-micro-", dir=a.dir))
            try:
                per_message.append(await one_round(work, sink_port, a.messages, a.size,
                                                   a.profile if i == a.rounds - 1 else None))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"round {i + 1}: {per_message[-1]:.3f} CPU ms/message", flush=True)
        print(f"median: {statistics.median(per_message):.3f} CPU ms/message "
              f"({a.messages} x {a.size} B, smarthost smtp-sink)")
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        reactor.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the queues go (default: $TMPDIR)")
    ap.add_argument("--profile", default=None,
                    help="cProfile the reactor thread in the last round; stats to this file "
                         "(the profiler slows the code down: CPU figures of that round are off)")
    args = ap.parse_args()
    # The log lines are written as the daemon writes them (to a file, formatted).
    log_file = tempfile.NamedTemporaryFile("w", prefix="delivery-micro-", suffix=".log",  # noqa: SIM115
                                           dir=args.dir, delete=True)
    globalLogBeginner.beginLoggingTo([FileLogObserver(log_file, classic_formatter())],
                                     redirectStandardIO=False)
    reactor.callWhenRunning(lambda: ensureDeferred(main(args)))
    reactor.run()
