"""``workers = 2``: a second process adopts the listening socket; all mail is delivered once."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.task import Clock

from mta.daemon.workers import WorkerPool, WorkerSpares, _WorkerProtocol
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, write_domain

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
workers = 2

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
connection_rate_per_ip = 0
""" + QUIET_TAIL


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"mta.daemon.worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def start_with_a_worker(tmp_path: Path, top: str = "") -> tuple[Daemon, int]:
    """A daemon with ``workers = 2`` (alice@example.test local) and its worker's pid;
    ``top``: more top-level settings."""
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG.replace("workers = 2\n", "workers = 2\n" + top).format(
        port=port, dead_port=free_port()))
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    deadline = time.monotonic() + 15
    while not children_of(daemon.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children_of(daemon.proc.pid)
    if len(workers) != 1:
        daemon.kill()
        raise AssertionError(f"expected one worker process, found {workers}")
    return daemon, workers[0]


def test_two_workers_share_the_port_and_deliver_everything_once(tmp_path):
    daemon, worker = start_with_a_worker(tmp_path)
    port = daemon.port
    try:
        # The worker needs a moment to import and adopt the socket.
        deadline = time.monotonic() + 15
        while "SMTPFactory starting" not in daemon.read_log().split("started worker 1", 1)[-1] \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        for i in range(30):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("s@remote.test", ["alice@example.test"], f"Subject: {i}\r\n\r\nn{i}\r\n".encode())
        new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
        deadline = time.monotonic() + 20
        while (not new.exists() or len(list(new.iterdir())) < 30) and time.monotonic() < deadline:
            time.sleep(0.1)
        bodies = sorted(f.read_bytes().rsplit(b"\n\n", 1)[1] for f in new.iterdir())
        assert bodies == sorted(f"n{i}\n".encode() for i in range(30))  # each exactly once
        log = daemon.read_log()
        assert "started worker 1" in log
        # Both processes took connections (the kernel spreads accepts over them).
        # The worker's lines reach the main log as they are, marked with the worker.
        assert re.search(r"^\S+ \[worker1 mta\.smtp\.server#info\] queued \w+ from=s@remote\.test",
                         log, re.M)
        # workers_deliver off (the default): the main process delivers them all.
        assert not re.search(r"^\S+ \[worker1 mta\.queue\.runner", log, re.M)
        assert re.search(r"^\S+ \[mta\.queue\.runner#info\] delivery ", log, re.M)
        code = daemon.terminate()
        assert code in (0, -signal.SIGTERM)
        assert not Path(f"/proc/{worker}").exists() or b"zombie" in Path(f"/proc/{worker}/status").read_bytes()
        # Every process stopped gracefully (the worker's stopService ran to its
        # end): no spare queue file is left behind, and nothing failed.
        assert list((tmp_path / "var" / "queue" / "msg").iterdir()) == []
        log = daemon.read_log()
        assert "Unhandled error" not in log and "Traceback" not in log, log[-2000:]
    finally:
        daemon.kill()


def test_both_processes_deliver_and_a_worker_hands_over_what_it_could_not(tmp_path):
    """Each process delivers the messages it accepted (both cores deliver); one
    a worker could not deliver at once is handed to the main process, which
    keeps it for its retries: tried once, still queued, never twice."""
    daemon, worker = start_with_a_worker(tmp_path, 'relay_networks = ["127.0.0.0/8"]\n'
                                                   "workers_deliver = true\n")
    try:
        deadline = time.monotonic() + 15
        while "SMTPFactory starting" not in daemon.read_log().split("started worker 1", 1)[-1] \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        for i in range(40):
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
                s.sendmail("s@remote.test", ["alice@example.test"], f"Subject: {i}\r\n\r\nn{i}\r\n".encode())
        new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
        deadline = time.monotonic() + 20
        while (not new.exists() or len(list(new.iterdir())) < 40) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(new.iterdir())) == 40
        log = daemon.read_log()
        delivered = re.compile(r"^\S+ \[(worker1 )?mta\.queue\.runner#info\] delivery \w+ to "
                               r"alice@example\.test via \S+: delivered", re.M)
        by = {m.group(1) or "main" for m in delivered.finditer(log)}
        assert by == {"worker1 ", "main"}, log[-3000:]
        # Remote mail (its smarthost is dead: deferred) until the worker took one.
        handed = None
        for i in range(40):
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
                s.sendmail("s@remote.test", ["bob@far.test"], f"Subject: r{i}\r\n\r\nr{i}\r\n".encode())
            time.sleep(0.2)
            m = re.search(r"\[worker1 mta\.queue\.runner#info\] delivery (\w+) to bob@far\.test "
                          r"via \S+: deferred", daemon.read_log())
            if m:
                handed = m.group(1)
                break
        assert handed is not None, daemon.read_log()[-3000:]
        code = daemon.terminate()
        assert code in (0, -signal.SIGTERM)
        # Still queued, deferred once (by the worker; the main process, which
        # took it over, waits for its retry time), nothing delivered twice.
        log = daemon.read_log()
        assert len(re.findall(rf"delivery {handed} to bob@far\.test", log)) == 1
        assert re.search(rf"^\S+ \[mta\.daemon\.workers#info\] message {handed} still queued after "
                         "worker 1's first pass: the main process keeps it", log, re.M), log[-3000:]
        assert any(f.startswith(handed) for f in os.listdir(tmp_path / "var" / "queue" / "msg"))
        assert len(list(new.iterdir())) == 40
        assert "Unhandled error" not in log and "Traceback" not in log, log[-2000:]
    finally:
        daemon.kill()


def test_worker_dies_with_a_killed_main_process(tmp_path):
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    config = tmp_path / "mta.toml"
    config.write_text(CONFIG.format(port=port, dead_port=free_port()))
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    workers = []
    try:
        deadline = time.monotonic() + 15
        while not workers and time.monotonic() < deadline:
            workers = children_of(daemon.proc.pid)
            time.sleep(0.1)
        assert workers
        daemon.kill()  # SIGKILL: no chance to stop the workers itself
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        daemon.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pool_of(spares: WorkerSpares, store: object = None, runner: object = None,
            session_timeout: float = 1800.0) -> WorkerPool:
    """A pool as the composition root builds it, around a clock (no process is started)."""
    return WorkerPool(spares.clock, 2, {}, listeners=(), spares=spares, runner=runner,  # type: ignore[arg-type]
                      files=store, session_timeout=lambda: session_timeout)  # type: ignore[arg-type]


class _Runner:
    def __init__(self) -> None:
        self.committed: list[Envelope] = []
        self.flushed: list[str] = []


def test_the_main_process_takes_the_envelope_from_the_workers_line(tmp_path):
    """``queued <id> <envelope JSON>`` in pieces, as a pipe delivers them: the runner
    gets the envelope itself; a line without a usable one falls back to the disk."""
    runner = _Runner()
    spares = WorkerSpares(Clock())
    pool = pool_of(spares, runner=SimpleNamespace(committed=runner.committed.append,
                                                  flush=runner.flushed.append))
    proto = _WorkerProtocol(pool, 1)
    env = Envelope("6b09c8822d5b28ff9734", "s@x.test",
                   [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")], 1.5e9, size=42)
    line = b"queued %s %s\n" % (env.id.encode(), env.to_line())
    assert b"\n" not in line[:-1]
    data = line + b"queued 6b09c8822d5b28ff9735\nqueued 6b09c8822d5b28ff9736 {bad\n"
    for i in range(0, len(data), 7):
        proto.outReceived(data[i:i + 7])
    assert [e.to_bytes() for e in runner.committed] == [env.to_bytes()]
    assert runner.flushed == ["6b09c8822d5b28ff9735", "6b09c8822d5b28ff9736"]
    assert spares.spares_owed == {1: 3}  # each announced message used up one of its spares


def test_a_message_a_dead_worker_never_announced_is_delivered(tmp_path):
    """A worker that dies between its 250 and its ``queued`` line: the main process,
    told that the worker ended, finds the message on disk and delivers it."""
    from mta.queue.store import QueueStore

    daemon, worker = start_with_a_worker(tmp_path)
    try:
        # What the worker had committed: on disk, announced to nobody.
        store = QueueStore(tmp_path / "var" / "queue", fsync=True, spares=False)
        writer = store.new_message()
        writer.write(b"Subject: orphan\r\n\r\nnever announced\r\n")
        rcpt = Recipient("alice@example.test", RecipientKind.LOCAL, "alice@example.test",
                         mailbox="alice@example.test")
        writer.commit(Envelope(writer.id, "s@remote.test", [rcpt], time.time()))
        store.committer.stop()
        os.kill(worker, signal.SIGKILL)
        new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
        deadline = time.monotonic() + 15
        while (not new.exists() or not list(new.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        (delivered,) = new.iterdir()
        assert delivered.read_bytes().endswith(b"\n\nnever announced\n")
        assert "found that no process had announced" in daemon.read_log()
    finally:
        daemon.kill()


def test_an_ended_workers_spares_are_swept_after_the_session_lifetime(tmp_path):
    """Its spare queue files outlive a worker that died; once none can be in use
    they are removed, and a stop cancels the pending sweep."""
    from mta.queue.layout import RECEIVING
    from mta.queue.spares import SPARE_MAX_AGE
    from mta.queue.store import QueueStore

    store = QueueStore(tmp_path / "queue", fsync=False)
    spare = store.data_path("6b09c8822d5b28ff9737")
    spare.touch(mode=RECEIVING)
    old = time.time() - 4000
    os.utime(spare, (old, old))
    clock = Clock()
    pool = pool_of(WorkerSpares(clock), store)
    respawned: list[int] = []
    pool._respawn = respawned.append  # no process is started here
    pool.ended(_WorkerProtocol(pool, 1))
    clock.advance(1800 + SPARE_MAX_AGE + 59)
    assert spare.exists()
    clock.advance(2)
    assert not spare.exists()
    # A second death schedules another sweep; stopping the pool cancels it.
    pool.ended(_WorkerProtocol(pool, 1))
    assert [c.func.__name__ for c in clock.getDelayedCalls()].count("_sweep_now") == 1
    pool.stop()
    assert [c.func.__name__ for c in clock.getDelayedCalls()].count("_sweep_now") == 0
    assert respawned == [1]
    for call in clock.getDelayedCalls():  # the second respawn
        call.cancel()


def test_finished_messages_files_go_back_to_the_worker_that_used_spares(tmp_path):
    """Each message a worker announced used up one of its spares: the store's
    next recycled files go to that worker, in one ``spares`` line per reactor
    turn on its stdin, while the worker is owed any; then the store keeps them."""
    from mta.queue.layout import RECEIVING
    from mta.queue.store import QueueStore

    clock = Clock()
    sent = []
    transport = SimpleNamespace(writeToChild=lambda fd, data: sent.append((fd, data)))
    pool = WorkerSpares(clock)
    store = QueueStore(tmp_path / "queue", fsync=False, spare_outlet=pool)
    pool.started(1, transport)
    pool.owe_spare(1)
    pool.owe_spare(1)
    ids = []
    for n in range(3):
        writer = store.new_message()
        writer.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
        writer.commit(Envelope(writer.id, "s@x.test", [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")],
                               time.time()))
        ids.append(writer.id)
    inodes = [store.data_path(queue_id).stat().st_ino for queue_id in ids]
    for queue_id in ids:
        store.remove_async(queue_id)
    assert sent == [] and store.spare_count() == 1  # the third: the worker is owed no more
    clock.advance(0)  # the end of the turn
    [(fd, line)] = sent
    verb, *spares = line.decode().split()
    assert fd == 0 and verb == "spares" and len(spares) == 2 and line.endswith(b"\n")
    for spare_id, inode in zip(spares, inodes, strict=False):
        st = store.data_path(spare_id).stat()
        assert (st.st_ino, st.st_mode & 0o777) == (inode, RECEIVING)
    assert pool.spares_owed == {1: 0} and store.ids() == []


def test_the_worker_takes_the_spares_its_stdin_brings(tmp_path):
    """``spares`` lines in pieces, as a pipe delivers them; ids that are not queue
    ids (a path, anything odd) are ignored."""
    from mta.daemon.worker import _SpareReader
    from mta.queue.layout import RECEIVING
    from mta.queue.store import QueueStore

    store = QueueStore(tmp_path / "queue", fsync=False)
    good = ["6b0a3e032267e810cec1", "6b0a3e032267e810cec2"]
    for spare_id in good:
        store.data_path(spare_id).touch(mode=RECEIVING)
    reader, writer = os.pipe()
    saved = os.dup(0)
    os.dup2(reader, 0)
    try:
        spares = _SpareReader(store)
        data = f"spares {good[0]} ../../etc/passwd\nspares {good[1]} 6B0A3E032267E810CEC3\n".encode()
        for i in range(0, len(data), 9):
            os.write(writer, data[i:i + 9])
            assert spares.doRead() is None
        assert spares.doRead() is None  # nothing to read: no harm
        os.close(writer)
        writer = -1
        assert spares.doRead() is not None  # the main process is gone
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(reader)
        if writer >= 0:
            os.close(writer)
    assert [spare_id for spare_id, _ in store._spares] == good


def test_a_worker_is_still_owed_a_spare_whose_file_could_not_be_recycled(tmp_path):
    from mta.queue.store import QueueStore

    pool = WorkerSpares(Clock())
    store = QueueStore(tmp_path / "queue", fsync=False, spare_outlet=pool)
    pool.started(1, SimpleNamespace())
    pool.owe_spare(1)
    taker = pool.spare_taker(store.add_spares)
    assert pool.spares_owed == {1: 0} and pool.spare_taker(store.add_spares) is None
    taker(None)
    assert pool.spares_owed == {1: 1}
