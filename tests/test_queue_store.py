"""The queue's files on disk: one file per message, its state file, removal, recovery."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mta.delivery.local import MaildirCourier
from mta.queue import commit as commit_module
from mta.queue import spares as spares_module
from mta.queue import store as store_module
from mta.queue import writer as writer_module
from mta.queue.dsn import read_headers
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.layout import (
    READY,
    RECEIVING,
    MessageNotReady,
    envelope_header,
    list_ids,
    load_envelope,
    open_message,
    read_embedded_envelope,
    read_message_start,
)
from mta.queue.spares import SPARE_BATCH, SPARE_MAX_AGE
from mta.queue.store import QueueStore
from mta.system.fsutil import fsync_dir as real_fsync_dir
from tests.harness import message_files

MESSAGE = b"Received: by us\r\nSubject: one file\r\n\r\nbody\r\n"


def envelope_for(queue_id: str) -> Envelope:
    return Envelope(queue_id, "s@x.test",
                    [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test"),
                     Recipient("b@y.test", RecipientKind.REMOTE, "b@y.test")], time.time())


def commit_one(store: QueueStore, message: bytes = MESSAGE, buffered: bool = True) -> Deferred[Envelope]:
    """Queue a message: fires with its envelope once it is committed."""
    writer = store.new_message(buffered=buffered)
    writer.write(message)
    env = envelope_for(writer.id)
    return writer.commit_async(env).addCallback(lambda _: env)


async def queue_one(store: QueueStore, message: bytes = MESSAGE, buffered: bool = True) -> Envelope:
    """Queue a message; return once any spares its commit asked for are made too
    (they are made on another thread, and tests look at the directory)."""
    env = await commit_one(store, message, buffered)
    deadline = time.monotonic() + 5
    while store.making_spares() and time.monotonic() < deadline:
        await deferLater(reactor, 0.001, lambda: None)
    assert not store.making_spares()
    return env


@pytest.fixture
def store(tmp_path):
    s = QueueStore(tmp_path / "q", fsync=True, reactor=reactor)
    yield s
    s.committer.stop()
    s.remover.stop()


@pytest_twisted.ensureDeferred
async def test_a_message_is_one_file_with_its_envelope_first(store):
    env = await queue_one(store)
    assert message_files(store.msg_dir) == [f"{env.id}.msg"]
    raw = store.data_path(env.id).read_bytes()
    # Readable with less(1): the JSON envelope, then the message as it will be sent.
    header = raw[:-len(MESSAGE)]
    assert raw.endswith(MESSAGE) and header == envelope_header(env.to_bytes())
    first, rest = header.split(b"\n", 1)
    assert first == b"mta-envelope %d" % len(rest)
    assert json.loads(rest)["recipients"][1]["address"] == "b@y.test"
    assert json.loads(read_embedded_envelope(store.data_path(env.id)))["size"] == len(MESSAGE)
    with open_message(store.data_path(env.id)) as f:
        assert f.read() == MESSAGE
    assert store.ids() == [env.id] and store.load(env.id).to_bytes() == env.to_bytes()


@pytest_twisted.ensureDeferred
async def test_state_changes_go_to_a_state_file_that_overrides_the_header(store):
    env = await queue_one(store)
    env.recipients[0].state = RecipientState.DELIVERED
    await store.save_async(env)
    assert message_files(store.msg_dir) == [f"{env.id}.json", f"{env.id}.msg"]
    assert store.load(env.id).recipients[0].state is RecipientState.DELIVERED
    # The message file is not rewritten: its header keeps the envelope as accepted.
    assert json.loads(read_embedded_envelope(store.data_path(env.id)))["recipients"][0]["state"] == "pending"
    await store.remove_async(env.id)
    assert message_files(store.msg_dir) == [] and store.ids() == []


@pytest_twisted.ensureDeferred
async def test_a_big_message_is_written_as_it_arrives_with_its_envelope_beside_it(store):
    env = await queue_one(store, buffered=False)
    assert store.data_path(env.id).read_bytes() == MESSAGE  # no header
    assert store.envelope_path(env.id).exists()
    assert store.load(env.id).recipients[1].address == "b@y.test"
    with open_message(store.data_path(env.id)) as f:
        assert f.read() == MESSAGE


def test_synchronous_commit_of_a_buffered_message_is_one_file_too(store):
    writer = store.new_message(buffered=True)
    writer.write(MESSAGE)
    env = envelope_for(writer.id)
    writer.commit(env)
    assert message_files(store.msg_dir) == [f"{env.id}.msg"]
    assert store.load(env.id).id == env.id


@pytest_twisted.ensureDeferred
async def test_removal_deletes_the_message_first_so_a_crash_cannot_bring_it_back(store):
    env = await queue_one(store)
    env.recipients[0].state = RecipientState.DELIVERED
    env.recipients[1].state = RecipientState.DEFERRED
    await store.save_async(env)
    # A crash right after the data file went: only the state file is left.
    store.data_path(env.id).unlink()
    assert store.ids() == [] and not store.exists(env.id)
    with pytest.raises(FileNotFoundError):
        store.load(env.id)
    assert store.recover() == []
    assert list(store.msg_dir.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_recover_sorts_out_what_a_crash_left(store, tmp_path):
    kept = await queue_one(store)
    state_kept = await queue_one(store)
    state_kept.recipients[0].state = RecipientState.DELIVERED
    await store.save_async(state_kept)
    big = await queue_one(store, buffered=False)
    msg = store.msg_dir
    # Left by a commit of an older version that never wrote its envelope (never acknowledged).
    (msg / "00000001aaaaaaaaaaaa.msg").write_bytes(MESSAGE)
    # A big message's commit that renamed its envelope but not yet its data (never acknowledged).
    (msg / "00000002aaaaaaaaaaaa.json").write_bytes(envelope_for("00000002aaaaaaaaaaaa").to_bytes())
    # A damaged header: kept aside for the operator, not delivered, not deleted.
    (msg / "00000003aaaaaaaaaaaa.msg").write_bytes(b"mta-envelope x\n{}" + MESSAGE)
    (store.tmp_dir / "half.msg").write_bytes(b"half")
    ids = store.recover()
    assert ids == sorted([kept.id, state_kept.id, big.id])
    assert sorted(p.name for p in msg.iterdir()) == sorted(
        [f"{kept.id}.msg", f"{state_kept.id}.msg", f"{state_kept.id}.json", f"{big.id}.msg", f"{big.id}.json"])
    assert [p.name for p in (store.root / "corrupt").iterdir()] == ["00000003aaaaaaaaaaaa.msg"]
    assert list(store.tmp_dir.iterdir()) == []
    assert store.load(state_kept.id).recipients[0].state is RecipientState.DELIVERED
    assert list_ids(msg) == ids


def test_a_bad_header_is_an_error_for_readers_not_a_wrong_message(tmp_path):
    bad = tmp_path / "bad.msg"
    bad.write_bytes(b"mta-envelope 12345678901234567890\n{}" + MESSAGE)
    with pytest.raises(OSError):
        open_message(bad)
    with pytest.raises(ValueError):
        load_envelope(tmp_path, "bad")
    short = tmp_path / "short.msg"
    short.write_bytes(b"mta-envelope 500\n{}")
    with pytest.raises(ValueError):
        read_embedded_envelope(short)


@pytest_twisted.ensureDeferred
async def test_a_large_envelope_in_the_header_is_read_whole(store):
    writer = store.new_message(buffered=True)
    writer.write(MESSAGE)
    env = envelope_for(writer.id)
    env.recipients = [Recipient(f"user{i:05d}@y.test", RecipientKind.REMOTE, f"user{i:05d}@y.test")
                      for i in range(1000)]  # well past the first 64 KiB read
    await writer.commit_async(env)
    assert len(env.to_bytes()) > 65536
    assert [r.address for r in store.load(env.id).recipients] == [r.address for r in env.recipients]
    with open_message(store.data_path(env.id)) as f:
        assert f.read() == MESSAGE


@pytest_twisted.ensureDeferred
async def test_readers_of_the_message_never_see_the_header(store, tmp_path):
    env = await queue_one(store)
    path = store.data_path(env.id)
    assert read_headers(path) == b"Received: by us\r\nSubject: one file\r\n"
    courier = MaildirCourier(tmp_path / "mail", "mx.example.test", fsync=False)
    rcpt = Recipient("alice@example.test", RecipientKind.LOCAL, "alice@example.test",
                     mailbox="alice@example.test")
    env.recipients = [rcpt]
    [result] = await courier.deliver(env, [rcpt], path)
    assert str(result.outcome) == "delivered", result
    (delivered,) = (tmp_path / "mail" / "example.test" / "alice" / "new").iterdir()
    assert delivered.read_bytes() == (b"Return-Path: <s@x.test>\nDelivered-To: alice@example.test\n"
                                      + MESSAGE.replace(b"\r\n", b"\n"))


@pytest_twisted.ensureDeferred
async def test_read_message_start_skips_the_header_and_stops_at_the_limit(store, tmp_path):
    env = await queue_one(store)
    path = store.data_path(env.id)
    assert read_message_start(path, 1 << 20) == MESSAGE
    assert read_message_start(path, 10) == MESSAGE[:10]
    big = await queue_one(store, buffered=False)  # no header
    assert read_message_start(store.data_path(big.id), 1 << 20) == MESSAGE
    writer = store.new_message(buffered=True)
    writer.write(MESSAGE)
    many = envelope_for(writer.id)
    many.recipients = [Recipient(f"user{i:05d}@y.test", RecipientKind.REMOTE, f"user{i:05d}@y.test")
                       for i in range(1000)]  # an envelope longer than the first read
    await writer.commit_async(many)
    assert read_message_start(store.data_path(many.id), 1 << 20) == MESSAGE
    assert read_message_start(store.data_path(many.id), 5) == MESSAGE[:5]
    bad = tmp_path / "bad.msg"
    bad.write_bytes(b"mta-envelope x\n" + MESSAGE)
    with pytest.raises(OSError):
        read_message_start(bad, 100)


# --- spares: queue files made ahead of time ------------------------------------------------


async def spares_made(store: QueueStore, count: int = SPARE_BATCH) -> list[str]:
    """Start making spares and wait (at most 5 s) until ``count`` are ready; their ids."""
    store.prepare_spares()
    deadline = time.monotonic() + 5
    while store.spare_count() < count and time.monotonic() < deadline:
        await deferLater(reactor, 0.01, lambda: None)
    assert store.spare_count() >= count
    return [queue_id for queue_id, _ in store._spares]


def mode_and_size(path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_size


@pytest_twisted.ensureDeferred
async def test_spares_are_empty_unreadable_files_that_are_no_messages(store, monkeypatch):
    synced = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda p: (synced.append(p), real_fsync_dir(p)))
    spares = await spares_made(store)
    assert len(spares) == SPARE_BATCH and len(synced) == 1  # one directory fsync for the batch
    spare = store.data_path(spares[0])
    assert mode_and_size(spare) == (RECEIVING, 0)
    # Not a message for any reader.
    assert store.ids() == [] and list_ids(store.msg_dir) == [] and not store.exists(spares[0])
    assert list(store.envelopes()) == []
    for read in (lambda: open_message(spare), lambda: read_message_start(spare, 10),
                 lambda: store.load(spares[0])):
        with pytest.raises(MessageNotReady):
            read()
    assert issubclass(MessageNotReady, FileNotFoundError)  # "removed meanwhile" to old readers


@pytest_twisted.ensureDeferred
async def test_a_message_fills_a_spare_with_one_fsync_and_no_directory_fsync(store, monkeypatch):
    spares = await spares_made(store)
    calls = []
    monkeypatch.setattr(commit_module, "fsync_dir", lambda p: calls.append(("fsync_dir", p)))
    real_fsync = store_module.os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(store_module.os, "rename", lambda *a: calls.append("rename"))
    real_write_out, real_fchmod = writer_module.write_out, store_module.os.fchmod
    monkeypatch.setattr(writer_module, "write_out", lambda fd: (calls.append("write_out"), real_write_out(fd)))
    monkeypatch.setattr(store_module.os, "fchmod",
                        lambda fd, mode: (calls.append(f"fchmod {mode:o}"), real_fchmod(fd, mode)))
    env = await queue_one(store)
    assert env.id == spares[0] and store.spare_count() == SPARE_BATCH - 1
    # The message's own file only (its name was durable already): the data written
    # out first, then the mode that says "complete", then the one fsync for both.
    assert calls == ["write_out", "fchmod 600", "fsync"]
    assert mode_and_size(store.data_path(env.id)) == (READY, len(envelope_header(env.to_bytes()) + MESSAGE))
    assert store.data_path(env.id).read_bytes() == envelope_header(env.to_bytes()) + MESSAGE
    assert store.ids() == [env.id] and store.exists(env.id) and list(store.tmp_dir.iterdir()) == []
    with open_message(store.data_path(env.id)) as f:
        assert f.read() == MESSAGE


@pytest_twisted.ensureDeferred
async def test_spares_are_made_again_when_few_are_left(store):
    await spares_made(store)
    for _ in range(SPARE_BATCH - spares_module.SPARE_LOW + 1):
        await queue_one(store)
    # Below the low mark: a new batch is on its way.
    await spares_made(store, count=spares_module.SPARE_LOW + SPARE_BATCH - 1)
    assert len(store.ids()) == SPARE_BATCH - spares_module.SPARE_LOW + 1


@pytest_twisted.ensureDeferred
async def test_an_aborted_message_gives_its_spare_back_and_a_failed_one_removes_it(store, monkeypatch):
    spares = await spares_made(store)
    writer = store.new_message(buffered=True)
    writer.write(b"x")
    writer.abort()
    assert store.spare_count() == SPARE_BATCH and store._spares[0][0] == writer.id
    assert mode_and_size(store.data_path(writer.id)) == (RECEIVING, 0)

    writer = store.new_message(buffered=True)
    writer.write(MESSAGE)

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", broken_fsync)
    with pytest.raises(store_module.QueueError):
        await writer.commit_async(envelope_for(writer.id))
    monkeypatch.undo()
    assert writer.id == spares[0] and not store.data_path(writer.id).exists()
    assert store.ids() == [] and list(store.tmp_dir.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_message_that_outgrows_memory_replaces_its_spare(store):
    await spares_made(store)
    writer = store.new_message(buffered=True)
    writer.write(b"Received: by us\r\n")
    writer.spill()  # what the SMTP session does past dkim.max_message_size
    writer.write(b"Subject: big\r\n\r\nbody\r\n")
    assert mode_and_size(store.data_path(writer.id))[0] == RECEIVING  # the spare, until the rename
    env = envelope_for(writer.id)
    await writer.commit_async(env)
    assert store.data_path(writer.id).read_bytes() == b"Received: by us\r\nSubject: big\r\n\r\nbody\r\n"
    assert mode_and_size(store.data_path(writer.id))[0] & 0o400
    assert store.ids() == [env.id] and store.load(env.id).recipients[1].address == "b@y.test"
    # A spilled message that is dropped takes its spare with it.
    other = store.new_message(buffered=True)
    other.spill()
    other.abort()
    assert not store.data_path(other.id).exists() and list(store.tmp_dir.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_spare_older_than_a_minute_is_dropped_not_used(tmp_path):
    now = [1_800_000_000.0]
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor, clock=lambda: now[0])
    try:
        old = await spares_made(store)
        now[0] += SPARE_MAX_AGE + 1
        writer = store.new_message(buffered=True)
        # Not one of the old ones (its id's time would be a minute off): a new file.
        assert writer.id not in old and int(writer.id[:8], 16) == int(now[0])
        writer.abort()
        await spares_made(store)  # the new batch
        deadline = time.monotonic() + 5
        while any(store.data_path(q).exists() for q in old) and time.monotonic() < deadline:
            await deferLater(reactor, 0.01, lambda: None)
        assert not any(store.data_path(q).exists() for q in old)
        assert all(int(q[:8], 16) == int(now[0]) for q, _ in store._spares)
    finally:
        store.committer.stop()


@pytest_twisted.ensureDeferred
async def test_recover_and_shutdown_remove_spares_and_unfinished_commits(store):
    kept = await queue_one(store)
    await spares_made(store)
    # A commit that a crash cut short: some data written, never made READY (no 250 given).
    half = store.data_path("00000004aaaaaaaaaaaa")
    half.write_bytes(b"mta-envelope 10\n{")
    half.chmod(RECEIVING)
    assert store.ids() == [kept.id]
    assert store.recover() == [kept.id]
    assert message_files(store.msg_dir) == [f"{kept.id}.msg"]
    assert sorted(p.name for p in store.msg_dir.iterdir()) == [f"{kept.id}.msg"]
    # At shutdown the unused spares go, those of a batch being made too.
    await spares_made(store)
    store._spares.clear()  # as if the batch's Deferred had not fired yet
    store._making.update(q.name[:-4] for q in store.msg_dir.iterdir() if q.name[:-4] != kept.id)
    store.discard_spares()
    assert sorted(p.name for p in store.msg_dir.iterdir()) == [f"{kept.id}.msg"]
    store.prepare_spares()  # a store started again makes spares again
    await spares_made(store)


@pytest_twisted.ensureDeferred
async def test_sweep_removes_only_old_files_that_are_no_messages(store):
    kept = await queue_one(store)
    spares = await spares_made(store)
    old = time.time() - 1000
    for queue_id in spares[:5] + [kept.id]:
        os.utime(store.data_path(queue_id), (old, old))
    assert store.sweep_unfinished(500) == 5
    assert [q for q in spares if store.data_path(q).exists()] == spares[5:]
    assert store.ids() == [kept.id]  # a message is never swept, however old
    assert store.sweep_unfinished(500) == 0


def test_envelope_text_has_a_field_per_line_and_a_recipient_per_line():
    env = envelope_for("6b09fd83e0792c88a3e9")
    env.extra = {"orig_sender": "s@x.test", "n": 2}
    env.recipients[1].last_reply = "451 4.7.1 \"try\" later ü"
    text = env.to_bytes().decode("utf-8")
    lines = text.splitlines()
    assert text.endswith("]}\n") and lines[0] == '{"id": "6b09fd83e0792c88a3e9",'
    assert ' "sender": "s@x.test",' in lines
    assert ' "extra": {"orig_sender": "s@x.test", "n": 2},' in lines
    recipient_lines = [line for line in lines if line.startswith('  {"address": ')]
    assert [json.loads(line.rstrip(","))["address"] for line in recipient_lines] == [
        "a@y.test", "b@y.test"]
    assert "ü" in recipient_lines[1]  # UTF-8 as it is, readable
    assert Envelope.from_bytes(env.to_bytes()) == env
    assert json.loads(env.to_line()) == json.loads(text) and env.to_line().isascii()
    empty = Envelope("x", "", [], 1.0)
    assert empty.to_bytes().endswith(b' "extra": {},\n "recipients": []}\n')
    assert Envelope.from_bytes(empty.to_bytes()) == empty


@pytest_twisted.ensureDeferred
async def test_a_slow_removal_never_holds_up_a_new_message(store, monkeypatch):
    """Removals have their own group-commit thread: while an unlink waits for the
    disk (a synchronous discard, say), new messages are still committed."""
    done = await queue_one(store)
    entered, release = threading.Event(), threading.Event()
    real_unlink = store_module.unlink_quietly

    def slow_unlink(path):
        if path.name.startswith(done.id):
            entered.set()
            release.wait(10)
        real_unlink(path)

    for module in (store_module, spares_module):  # removing, and recycling into a spare
        monkeypatch.setattr(module, "unlink_quietly", slow_unlink)
    removal = store.remove_async(done.id)
    try:
        assert await deferToThread(entered.wait, 10)
        new = await queue_one(store)  # committed while the removal is stuck
        assert store.exists(new.id) and not removal.called
    finally:
        release.set()
    await removal
    assert not store.exists(done.id) and store.ids() == [new.id]
    store.remover.stop()


@pytest_twisted.ensureDeferred
async def test_making_spares_never_holds_up_a_new_message(store, monkeypatch):
    """Spares are made on the removals' thread: while a batch of them is being
    made (ext4 searching for free inodes, say), new messages are still committed,
    into the spares left or through tmp/."""
    await spares_made(store)
    entered, release = threading.Event(), threading.Event()
    real_open = os.open

    def slow_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).startswith(str(store.msg_dir)):
            entered.set()
            release.wait(10)
        return real_open(path, flags, *args, **kwargs)

    def queue_within_5s():  # without queue_one's wait for the spares, which are stuck
        return commit_one(store).addTimeout(5, reactor)

    monkeypatch.setattr(store_module.os, "open", slow_open)
    try:
        queued = []
        while not entered.is_set() and len(queued) < SPARE_BATCH:  # down to the low mark
            queued.append(await queue_within_5s())
        assert await deferToThread(entered.wait, 10)  # a new batch is being made, and stuck
        queued.append(await queue_within_5s())  # committed meanwhile
        assert all(store.exists(env.id) for env in queued)
    finally:
        release.set()
    await spares_made(store, count=spares_module.SPARE_LOW)
    assert sorted(store.ids()) == sorted(env.id for env in queued)


# --- a finished message's file recycled as the next spare ---------------------------------


@pytest_twisted.ensureDeferred
async def test_a_finished_messages_file_becomes_a_spare_that_the_next_message_fills(store, monkeypatch):
    """remove_async renames the data file to a fresh id in mode RECEIVING (the
    message is gone to every reader), removes its state file, and the pool has
    the new spare; the next message overwrites the same inode and is cut to its
    own length, so nothing of the old one is left in it."""
    monkeypatch.setattr(store, "_refill", lambda: None)  # no spares but the recycled one
    long_body = MESSAGE + b"x" * 8000 + b"\r\n"
    old = await queue_one(store, long_body)  # no spare yet: written in tmp/ and renamed
    old.recipients[0].state = RecipientState.DELIVERED
    await store.save_async(old)  # it has a state file too
    inode = store.data_path(old.id).stat().st_ino
    await store.remove_async(old.id)
    assert not store.exists(old.id) and store.ids() == [] and message_files(store.msg_dir) == []
    assert not store.envelope_path(old.id).exists()
    [(spare, made)] = list(store._spares)
    assert spare != old.id and abs(made - time.time()) < 5
    st = store.data_path(spare).stat()
    assert (st.st_ino, stat.S_IMODE(st.st_mode)) == (inode, RECEIVING)
    assert abs(st.st_mtime - time.time()) < 5  # a spare's age counts from now (sweep_unfinished)
    with pytest.raises(MessageNotReady):
        store.load(spare)

    new = await queue_one(store)  # shorter than what the file held
    assert new.id == spare and store.data_path(new.id).stat().st_ino == inode
    assert store.data_path(new.id).read_bytes() == envelope_header(new.to_bytes()) + MESSAGE
    assert mode_and_size(store.data_path(new.id))[0] == READY
    with open_message(store.data_path(new.id)) as f:
        assert f.read() == MESSAGE
    assert store.ids() == [new.id]


@pytest_twisted.ensureDeferred
async def test_with_enough_spares_a_finished_message_is_removed(store):
    """Past SPARE_KEEP spares in the pool the file is unlinked, as without spares."""
    await spares_made(store)
    store.add_spares([store_module.new_queue_id() for _ in range(spares_module.SPARE_KEEP)])
    count = store.spare_count()
    env = await queue_one(store)
    assert store.spare_count() == count - 1
    await store.remove_async(env.id)
    assert store.spare_count() == count - 1 and not store.data_path(env.id).exists()


def test_spares_handed_over_past_the_limit_or_after_shutdown_are_removed(tmp_path):
    store = QueueStore(tmp_path / "q", fsync=False)
    ids = [store_module.new_queue_id() for _ in range(spares_module.SPARE_KEEP + SPARE_BATCH + 2)]
    for spare_id in ids:
        store.data_path(spare_id).touch(mode=RECEIVING)
    store.add_spares(ids)
    assert store.spare_count() == spares_module.SPARE_KEEP + SPARE_BATCH
    assert sorted(p.name[:-4] for p in store.msg_dir.iterdir()) == sorted(ids[:-2])
    store.discard_spares()
    late = store_module.new_queue_id()
    store.data_path(late).touch(mode=RECEIVING)
    store.add_spares([late])
    assert store.spare_count() == 0 and list(store.msg_dir.iterdir()) == []


def test_recovery_removes_a_recycled_file_whose_mode_change_a_crash_lost(tmp_path):
    """A READY file whose embedded envelope names another id is a finished
    message's file recycled as a spare, not a message: recovery removes it
    (delivering it again would send a message twice); real messages stay."""
    store = QueueStore(tmp_path / "q", fsync=False)
    kept = envelope_for("6b0a3e032267e810cec1")
    old = envelope_for("6b0a3e032267e810cec2")
    store.data_path(kept.id).write_bytes(envelope_header(kept.to_bytes()) + MESSAGE)
    store.data_path("6b0a3e032267e810cec3").write_bytes(envelope_header(old.to_bytes()) + MESSAGE)
    for name in ("6b0a3e032267e810cec1", "6b0a3e032267e810cec3"):
        os.chmod(store.data_path(name), READY)
    assert store.recover() == [kept.id]
    assert message_files(store.msg_dir) == [f"{kept.id}.msg"]


def test_a_file_that_cannot_be_recycled_is_removed_and_owes_nothing(tmp_path, monkeypatch):
    """If the rename fails, the message is removed as before; the pool's count of
    spares on their way goes back down, so recycling goes on for the next ones,
    and a worker that was to get the spare is still owed one."""
    store = QueueStore(tmp_path / "q", fsync=False)
    told = []
    store.spare_outlet = SimpleNamespace(spare_taker=lambda keep: told.append)
    writer = store.new_message()
    writer.write(MESSAGE)
    writer.commit(envelope_for(writer.id))
    real_rename = os.rename
    monkeypatch.setattr(store_module.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    store.remove_async(writer.id)
    monkeypatch.setattr(store_module.os, "rename", real_rename)
    assert told == [None] and not store.data_path(writer.id).exists() and list(store.msg_dir.iterdir()) == []

    store.spare_outlet = None  # now our own pool takes them
    writer = store.new_message()
    writer.write(MESSAGE)
    writer.commit(envelope_for(writer.id))
    monkeypatch.setattr(store_module.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    store.remove_async(writer.id)
    monkeypatch.setattr(store_module.os, "rename", real_rename)
    assert store._recycling == 0 and store.spare_count() == 0
    writer = store.new_message()
    writer.write(MESSAGE)
    writer.commit(envelope_for(writer.id))
    store.remove_async(writer.id)
    assert store._recycling == 0 and store.spare_count() == 1  # recycled


@pytest_twisted.ensureDeferred
async def test_a_shutdown_during_a_recycling_leaves_no_spare_behind(tmp_path):
    """The removal lingers (REMOVAL_LINGER) when the process stops: the recycled
    file is removed with the other spares, and its late hand-over changes nothing."""
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor, spares=True)
    env = await queue_one(store)
    d = store.remove_async(env.id)
    store.discard_spares()
    assert list(store.msg_dir.iterdir()) == []
    await d
    assert list(store.msg_dir.iterdir()) == [] and store.spare_count() == 0


@pytest_twisted.ensureDeferred
async def test_queued_message_handle_reads_both_layouts(store):
    """Readers get a QueuedMessage: the same view of a one-file message (envelope
    in its header) and of a streamed one (data file and state file)."""
    one_file = await queue_one(store)  # buffered: the envelope in the file's header
    streamed = store.new_message(buffered=False)
    streamed.write(MESSAGE)
    env = Envelope(streamed.id, "s@x.test", [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")],
                   time.time())
    await streamed.commit_async(env)
    assert store.data_path(one_file.id).read_bytes().startswith(b"mta-envelope ")
    assert store.data_path(streamed.id).read_bytes() == MESSAGE
    for queue_id in (one_file.id, streamed.id):
        message = store.message(queue_id)
        assert message.id == queue_id and message.size == len(MESSAGE)
        assert message.envelope().id == queue_id and message.envelope().size == len(MESSAGE)
        with message.open() as f:
            assert f.read() == MESSAGE
        assert message.read_start(8) == MESSAGE[:8]
        assert message.read_headers(1000) == b"Received: by us\r\nSubject: one file\r\n"
        assert message.read_headers(20) == b"Received: by us\r\n"  # cut at a line boundary
    with pytest.raises(FileNotFoundError):
        store.message("0" * 20).open()


# --- issue 19 point 4: a finished message is gone the moment its removal is asked for ---


@pytest_twisted.ensureDeferred
async def test_a_removed_message_is_gone_before_its_removal_is_synced(tmp_path):
    """The unlink is done on the caller's thread as remove_async returns, before
    the batch on the remover's thread (and its directory sync) has run: a process
    killed in between never delivers the message again."""
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor, spares=False)
    try:
        env = await queue_one(store)
        d = store.remove_async(env.id)
        assert not d.called  # the directory sync has not happened yet
        assert not store.data_path(env.id).exists() and not store.exists(env.id)
        await d
        assert message_files(store.msg_dir) == [] and store.ids() == []
    finally:
        store.committer.stop()
        store.remover.stop()


@pytest_twisted.ensureDeferred
async def test_a_recycled_message_is_no_message_before_its_rename(store, monkeypatch):
    """When the file is to become a spare, its chmod to RECEIVING (which makes it
    no message to readers and to recover()) is done at once; the rename follows
    on the remover's thread."""
    monkeypatch.setattr(store, "_refill", lambda: None)  # no spares but the recycled one
    env = await queue_one(store)
    d = store.remove_async(env.id)
    path = store.data_path(env.id)
    if path.exists():  # the thread has not renamed it yet: it is RECEIVING already
        assert stat.S_IMODE(path.stat().st_mode) == RECEIVING
    assert not store.exists(env.id) and store.ids() == []
    await d
    assert [queue_id for queue_id, _ in store._spares] != [env.id] and store.spare_count() == 1
