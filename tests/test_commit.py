"""The group-commit thread: order, batching, durability calls, failures, syncfs mode."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater

from mta.config import ConfigError, config_from_dict
from mta.queue import commit as commit_module
from mta.queue.commit import GroupCommitter
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.layout import QueueError, envelope_header, open_message
from mta.queue.store import QueueStore
from mta.system.aiofsync import AioFsync


class Hold:
    """Keeps a committer's thread busy in an operation of its own batch, so that
    the jobs submitted meanwhile all wait, and form the next batch together."""

    def __init__(self) -> None:
        self._entered, self._release = threading.Event(), threading.Event()

    def hold(self, committer: GroupCommitter):
        def held():
            self._entered.set()
            self._release.wait(10)

        d = committer.submit(held)
        assert self._entered.wait(10)  # the thread is in it: its batch is closed
        return d

    def release(self) -> None:
        self._release.set()


@pytest_twisted.ensureDeferred
async def test_operations_run_in_order_and_share_directory_syncs(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: synced.append(path))
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    order = []

    def slow_first():
        time.sleep(0.05)  # while this runs, the others queue up behind it
        order.append(0)

    try:
        ds = [committer.submit(slow_first)]
        ds += [committer.submit(lambda i=i: order.append(i)) for i in range(1, 20)]
        results = await DeferredList(ds, consumeErrors=True)
    finally:
        committer.stop()
    assert all(ok for ok, _ in results)
    assert order == list(range(20))
    assert committer.operations == 20
    assert committer.batches < 20 and len(synced) == committer.batches  # one sync per batch


@pytest_twisted.ensureDeferred
async def test_operations_that_may_wait_linger_to_share_one_directory_sync(tmp_path, monkeypatch):
    """Removals (may_wait) submitted a little apart still share a sync: their batch
    waits up to ``linger`` for more.  An operation someone waits for (a batch of
    spares) ends the wait at once."""
    synced = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: synced.append(time.monotonic()))
    committer = GroupCommitter(reactor, tmp_path, fsync=True, linger=0.5)
    done = []
    try:
        start = time.monotonic()
        first = committer.submit(lambda: done.append("r1"), may_wait=True)
        await deferLater(reactor, 0.05, lambda: None)  # the thread already has r1, lingering
        second = committer.submit(lambda: done.append("r2"), may_wait=True)
        await DeferredList([first, second])
        assert done == ["r1", "r2"] and committer.batches == 1 and len(synced) == 1
        assert synced[0] - start >= 0.45  # it waited for more, up to linger

        start = time.monotonic()
        removal = committer.submit(lambda: done.append("r3"), may_wait=True)
        await deferLater(reactor, 0.05, lambda: None)
        await DeferredList([removal, committer.submit(lambda: done.append("spares"))])
        assert done[2:] == ["r3", "spares"] and committer.batches == 2 and len(synced) == 2
        assert synced[1] - start < 0.4  # the urgent one ended the wait
    finally:
        committer.stop()


@pytest_twisted.ensureDeferred
async def test_operations_without_directory_entries_need_no_directory_sync(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: synced.append(path))
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    try:
        await committer.submit(lambda: None, sync_directory=False)
        assert synced == [] and committer.syncs == 0 and committer.batches == 1
        await DeferredList([committer.submit(lambda: None, sync_directory=False),
                            committer.submit(lambda: None)])
        assert len(synced) == committer.syncs >= 1  # the one that needs it gets it
    finally:
        committer.stop()


@pytest_twisted.ensureDeferred
async def test_failed_directory_sync_fails_the_whole_batch(tmp_path, monkeypatch):
    def broken(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(commit_module, "fsync_dir", broken)
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    try:
        results = await DeferredList([committer.submit(lambda: None)], consumeErrors=True)
    finally:
        committer.stop()
    (ok, failure), = results
    assert not ok and failure.check(OSError)


@pytest.mark.parametrize("syncfs", [False, True])
@pytest_twisted.ensureDeferred
async def test_store_commit_async_in_both_modes(tmp_path, syncfs, monkeypatch):
    calls = []
    real_syncfs = commit_module.syncfs
    monkeypatch.setattr(commit_module, "syncfs", lambda p: (calls.append("syncfs"), real_syncfs(p)))
    store = QueueStore(tmp_path / "q", fsync=True, syncfs=syncfs, reactor=reactor)
    committed = []
    store.subscribe(committed.append)
    try:
        writer = store.new_message()
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        env = Envelope(writer.id, "s@x.test", [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")],
                       time.time())
        await writer.commit_async(env)
        await deferLater(reactor, 0, deferLater, reactor, 0, lambda: None)  # the store tells on a later turn
        assert store.ids() == [env.id] and committed == [env]
        # Written as it arrived: the data as is, the envelope beside it.
        assert store.data_path(env.id).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
        assert store.envelope_path(env.id).exists()
        env.recipients[0].attempts = 3
        await store.save_async(env)
        assert store.load(env.id).recipients[0].attempts == 3
        await store.remove_async(env.id)
        assert store.ids() == [] and list(store.tmp_dir.iterdir()) == []
    finally:
        store.committer.stop()
    assert calls == (["syncfs"] * 3 if syncfs else [])


@pytest.mark.parametrize("buffered", [False, True])
@pytest_twisted.ensureDeferred
async def test_commit_async_failure_leaves_nothing(tmp_path, monkeypatch, buffered):
    # Without spares (a failed commit into a spare: tests/test_queue_store.py).
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor, spares=False)
    writer = store.new_message(buffered)
    writer.write(b"x\r\n")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", broken_fsync)
    try:
        env = Envelope(writer.id, "", [], time.time())
        with pytest.raises(QueueError):
            await writer.commit_async(env)
    finally:
        store.committer.stop()
    monkeypatch.undo()
    assert list(store.msg_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_queue_sync_setting(tmp_path):
    assert config_from_dict({"hostname": "h.test"}, tmp_path).queue_sync == "fsync"
    assert config_from_dict({"hostname": "h.test", "queue_sync": "syncfs"}, tmp_path).queue_sync == "syncfs"
    with pytest.raises(ConfigError, match="queue_sync"):
        config_from_dict({"hostname": "h.test", "queue_sync": "never"}, tmp_path)


@pytest_twisted.ensureDeferred
async def test_parts_run_a_step_at_a_time_together_then_finishes_in_order(tmp_path, monkeypatch):
    """The parts of a batch's operations advance together: every part's first step
    (write, start the write-out), then every second step (the fsync), so the disk
    has all the batch's files at once.  A failed part fails its operation only,
    whose finish never runs; the others finish in submission order."""
    synced = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: synced.append(path))
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    order = []
    gate = Hold()

    def part(name):
        def steps():
            order.append(f"{name} write")
            yield
            order.append(f"{name} fsync")
        return steps

    def failing_part():
        order.append("b write")
        yield
        raise OSError(28, "No space left on device")

    try:
        first = gate.hold(committer)  # the jobs submitted next form one batch
        ds = [committer.submit(lambda: order.append("a done"), parts=[part("a1"), part("a2")]),
              committer.submit(lambda: order.append("b done"), parts=[failing_part]),
              committer.submit(lambda: order.append("c done"),
                               parts=[part("c"), lambda: order.append("c plain")])]
        gate.release()
        results = await DeferredList([first, *ds], consumeErrors=True)
    finally:
        committer.stop()
    assert [ok for ok, _ in results] == [True, True, False, True]
    assert results[2][1].check(OSError)  # the failed part's error; its finish never ran
    assert order == ["a1 write", "a2 write", "b write", "c write", "c plain",
                     "a1 fsync", "a2 fsync", "c fsync", "a done", "c done"]
    assert len(synced) == committer.batches  # one directory sync per batch


def _fsync_parts(fds, seen):
    """One part per descriptor: it asks for its fsync, and records what came of it."""
    def part(fd):
        def steps():
            try:
                yield fd
            except OSError as e:
                seen.append((fd, e.errno))
                raise
            seen.append((fd, "after"))
        return steps
    return [part(fd) for fd in fds]


async def _one_batch(committer, fds, seen):
    """Submit one operation per descriptor so that they form one batch; their results."""
    gate = Hold()
    try:
        first = gate.hold(committer)  # the jobs submitted next form one batch
        ds = [committer.submit(lambda: None, parts=[part]) for part in _fsync_parts(fds, seen)]
        gate.release()
        results = await DeferredList([first, *ds], consumeErrors=True)
    finally:
        committer.stop()
    return results[1:]


@pytest_twisted.ensureDeferred
async def test_fsyncs_asked_for_in_one_step_are_submitted_together_and_errors_go_back_to_the_part(
        tmp_path, monkeypatch):
    """A part yields a descriptor to have it fsynced: the committer submits those
    of one step in one AIO call (so the kernel can merge the disk flushes), then
    goes on with each part; a failed fsync is raised inside its part."""
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: None)
    submitted = []

    def fake_fsync_all(aio, fds):
        submitted.append((list(fds), threading.current_thread().name))
        return [5 if fd == 13 else 0 for fd in fds]  # EIO for 13

    monkeypatch.setattr(AioFsync, "fsync_all", fake_fsync_all)
    plain = []
    monkeypatch.setattr(os, "fsync", plain.append)
    seen = []
    results = await _one_batch(GroupCommitter(reactor, tmp_path, fsync=True), [11, 12, 13], seen)
    assert [ok for ok, _ in results] == [True, True, False]
    assert results[2][1].check(OSError) and results[2][1].value.errno == 5
    assert sorted(seen) == [(11, "after"), (12, "after"), (13, 5)]
    assert submitted == [([11, 12, 13], "queue-commit")]  # one call, on the committer thread
    assert plain == []


@pytest_twisted.ensureDeferred
async def test_a_batch_of_real_files_is_fsynced_through_aio(tmp_path, monkeypatch):
    """Real files, the real kernel: the batch's fsyncs all go through AIO (a plain
    fsync would fail the test) and succeed; a pipe, which has no fsync, gets
    its EINVAL in its own part only."""
    aio = AioFsync.open()
    assert sys.platform == "linux" and aio is not None  # the product's platform
    aio.close()
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: None)
    fds = []
    for n in range(3):
        fd = os.open(tmp_path / f"f{n}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 4096)
        fds.append(fd)
    reader, writer = os.pipe()
    plain = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (plain.append(fd), real_fsync(fd)))
    seen = []
    try:
        results = await _one_batch(GroupCommitter(reactor, tmp_path, fsync=True), [*fds, writer], seen)
    finally:
        for fd in (*fds, reader, writer):
            os.close(fd)
    assert [ok for ok, _ in results] == [True, True, True, False]
    assert sorted(seen) == sorted([(fd, "after") for fd in fds] + [(writer, errno.EINVAL)])
    assert plain == [writer]  # refused by io_submit, so tried plainly, which says why


@pytest_twisted.ensureDeferred
async def test_without_aio_the_fsyncs_are_made_one_after_the_other(tmp_path, monkeypatch):
    """Where AIO cannot be used (another platform, aio-max-nr reached), or once it
    failed, each file is fsynced with a plain fsync; its error still goes to its part."""
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: None)
    fsynced = []

    def fake_fsync(fd):
        fsynced.append(fd)
        if fd == 13:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(commit_module.os, "fsync", fake_fsync)
    monkeypatch.setattr(AioFsync, "open", classmethod(lambda cls, capacity=128: None))
    seen = []
    results = await _one_batch(GroupCommitter(reactor, tmp_path, fsync=True), [11, 12, 13], seen)
    assert [ok for ok, _ in results] == [True, True, False]
    assert fsynced == [11, 12, 13] and sorted(seen) == [(11, "after"), (12, "after"), (13, 5)]

    def broken(aio, fds):
        raise OSError(errno.EFAULT, "io_getevents: Bad address")

    monkeypatch.undo()
    monkeypatch.setattr(commit_module, "fsync_dir", lambda path: None)
    monkeypatch.setattr(commit_module.os, "fsync", fake_fsync)
    monkeypatch.setattr(AioFsync, "fsync_all", broken)
    fsynced.clear()
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    results = await _one_batch(committer, [11, 12], [])
    assert [ok for ok, _ in results] == [True, True] and fsynced == [11, 12]
    assert not committer._aio_usable  # not tried again


def test_parts_run_to_the_end_without_fsync(tmp_path):
    """With fsync off (tests), the operation and every step of its parts run at once."""
    committer = GroupCommitter(reactor, tmp_path, fsync=False)
    order = []

    def steps():
        order.append("write")
        yield
        order.append("fsync")

    d = committer.submit(lambda: order.append("done"), parts=[steps])
    assert d.called and order == ["write", "fsync", "done"]


@pytest_twisted.ensureDeferred
async def test_buffered_writer_creates_its_file_only_at_commit(tmp_path):
    # Without a spare (the first message after start-up): the file is made at the commit.
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor, spares=False)
    try:
        writer = store.new_message(buffered=True)
        writer.write(b"Received: by us\r\n")
        writer.writelines([b"Subject: x\r\n", b"\r\n", b"body\r\n"])
        assert list(store.tmp_dir.iterdir()) == [] and writer.size == 37
        env = Envelope(writer.id, "s@x.test", [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")],
                       time.time())
        await writer.commit_async(env)
        message = b"Received: by us\r\nSubject: x\r\n\r\nbody\r\n"
        # One file: the envelope in its header, then the message.
        assert store.data_path(env.id).read_bytes() == envelope_header(env.to_bytes()) + message
        assert not store.envelope_path(env.id).exists()
        with open_message(store.data_path(env.id)) as f:
            assert f.read() == message
        assert store.load(env.id).size == 37 and list(store.tmp_dir.iterdir()) == []
        aborted = store.new_message(buffered=True)
        aborted.write(b"x")
        aborted.abort()
        assert list(store.tmp_dir.iterdir()) == []
    finally:
        store.committer.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest_twisted.ensureDeferred
async def test_committer_thread_runs_in_sched_batch_and_the_reactor_thread_does_not(tmp_path):
    """The committer thread, which runs the operations and their parts, is
    SCHED_BATCH (woken by the disk, it does not preempt the reactor thread only
    to wait for its GIL); the reactor thread keeps the normal policy."""
    committer = GroupCommitter(reactor, tmp_path, fsync=True)
    policies: dict[str, tuple[int, str]] = {}

    def record(name: str) -> None:
        policies[name] = (os.sched_getscheduler(0), threading.current_thread().name)

    gate = Hold()
    try:
        first = gate.hold(committer)  # the jobs submitted next form one batch
        rest = [committer.submit(lambda: None, parts=[lambda: record("part one")]),
                committer.submit(lambda: record("committer"), parts=[lambda: record("part two")])]
        gate.release()
        await DeferredList([first, *rest])
    finally:
        committer.stop()
    assert policies == {name: (os.SCHED_BATCH, "queue-commit")
                        for name in ("part one", "part two", "committer")}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
