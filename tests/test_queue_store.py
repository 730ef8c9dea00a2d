"""The queue's files on disk: one file per message, its state file, removal, recovery."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from mta.delivery.dsn import read_headers
from mta.delivery.local import MaildirCourier
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.store import (
    QueueStore,
    envelope_header,
    list_ids,
    load_envelope,
    open_message,
    read_embedded_envelope,
    read_message_start,
)

MESSAGE = b"Received: by us\r\nSubject: one file\r\n\r\nbody\r\n"


def envelope_for(queue_id: str) -> Envelope:
    return Envelope(queue_id, "s@x.test",
                    [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test"),
                     Recipient("b@y.test", RecipientKind.REMOTE, "b@y.test")], time.time())


async def queue_one(store: QueueStore, message: bytes = MESSAGE, buffered: bool = True) -> Envelope:
    writer = store.new_message(buffered=buffered)
    writer.write(message)
    env = envelope_for(writer.id)
    await writer.commit_async(env)
    return env


@pytest.fixture
def store(tmp_path):
    s = QueueStore(tmp_path / "q", fsync=True, reactor=reactor)
    yield s
    s.committer.stop()


@pytest_twisted.ensureDeferred
async def test_a_message_is_one_file_with_its_envelope_first(store):
    env = await queue_one(store)
    assert sorted(p.name for p in store.msg_dir.iterdir()) == [f"{env.id}.msg"]
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
    assert sorted(p.name for p in store.msg_dir.iterdir()) == [f"{env.id}.json", f"{env.id}.msg"]
    assert store.load(env.id).recipients[0].state is RecipientState.DELIVERED
    # The message file is not rewritten: its header keeps the envelope as accepted.
    assert json.loads(read_embedded_envelope(store.data_path(env.id)))["recipients"][0]["state"] == "pending"
    await store.remove_async(env.id)
    assert list(store.msg_dir.iterdir()) == [] and store.ids() == []


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
    assert sorted(p.name for p in store.msg_dir.iterdir()) == [f"{env.id}.msg"]
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
