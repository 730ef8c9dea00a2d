"""The one intake (mta.queue.intake): the store tells its listeners of a commit
only once it is durable and on a later reactor turn, and local submission
writes the queue file the SMTP server writes for the same message."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mta.intake.submit import Submitter, submit_message
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.intake import Intake
from mta.queue.layout import ENVELOPE_MAGIC, read_embedded_envelope
from mta.queue.store import QueueStore
from tests.harness import in_thread, start_mta


async def later_turns() -> None:
    """Two reactor turns: whatever was scheduled for the next one has run."""
    await deferLater(reactor, 0, deferLater, reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_listeners_hear_of_a_commit_once_durable_and_on_a_later_turn(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q", fsync=True, reactor=reactor)
    fired: list[bool] = []
    heard: list[tuple[str, bool, bool]] = []  # (id, queued on disk, commit had fired)
    store.subscribe(lambda env: heard.append((env.id, store.exists(env.id), bool(fired))))
    try:
        txn = Intake(store, "s@x.test")
        txn.add_recipient("a@y.test", [Recipient("a@y.test", RecipientKind.REMOTE, "a@y.test")])
        txn.open(buffered=True)
        txn.write(b"Subject: x\r\n\r\nbody\r\n")
        d = txn.commit(txn.envelope(created=time.time()))
        assert heard == []  # not from inside the commit
        heard_when_durable: list[list[tuple[str, bool, bool]]] = []
        d.addCallback(lambda _: (fired.append(True), heard_when_durable.append(list(heard))))
        await d
        # Not on the turn that made it durable either ...
        assert heard_when_durable == [[]]
        await later_turns()
        # ... but on a later one, with the message queued on disk.
        assert heard == [(txn.id, True, True)]
    finally:
        store.discard_spares()


@pytest_twisted.ensureDeferred
async def test_intake_keeps_one_copy_per_mailbox_and_aborts_cleanly(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q", fsync=False, reactor=reactor, spares=False)
    txn = Intake(store, "s@x.test")
    bob = Recipient("bob@example.test", RecipientKind.LOCAL, "", mailbox="bob@example.test")
    assert txn.add_recipient("bob+x@example.test", [bob]) == 1
    assert txn.add_recipient("bob@example.test", [bob]) == 0  # the same mailbox
    assert txn.originals == ["bob+x@example.test", "bob@example.test"]
    assert [(r.address, r.original) for r in txn.recipients] == [
        ("bob@example.test", "bob+x@example.test")]
    txn.open(buffered=False)
    txn.write(b"Subject: x\r\n\r\nbody\r\n")
    txn.abort()
    assert store.ids() == [] and list(store.tmp_dir.iterdir()) == []


def _message_part(raw: bytes) -> tuple[bytes, bytes]:
    """(first header field, the rest) of a queue file's message, past its envelope."""
    assert raw.startswith(ENVELOPE_MAGIC)  # one file: the envelope in its header
    length_line, _, rest = raw.partition(b"\n")
    message = rest[int(length_line[len(ENVELOPE_MAGIC):]):]
    first, _, more = message.partition(b"\r\n")
    while more[:1] in (b" ", b"\t"):  # the field's folded lines
        line, _, more = more.partition(b"\r\n")
        first += b"\r\n" + line
    return first, more


@pytest_twisted.ensureDeferred
async def test_local_submission_and_smtp_write_the_same_queue_file(tmp_path: Path) -> None:
    mta = await start_mta(tmp_path)
    message = (b"From: someone@remote.test\r\nTo: alice@example.test\r\nSubject: same\r\n"
               b"Date: Tue, 08 Dec 2026 00:00:00 +0000\r\nMessage-ID: <same@remote.test>\r\n"
               b"\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n")
    try:
        def over_smtp() -> None:
            with smtplib.SMTP("127.0.0.1", mta.port("mx"), timeout=10) as client:
                client.sendmail("someone@remote.test", ["alice@example.test"], message)

        await in_thread(over_smtp)
        [smtp_id] = mta.store.ids()
        local_id = await submit_message(mta.store, mta.config, mta.context.aliases,
                                        "someone@remote.test", ["alice@example.test"], message,
                                        Submitter(uid=1000))
        files = {queue_id: mta.store.data_path(queue_id).read_bytes()
                 for queue_id in (smtp_id, local_id)}
        # One file each (no state file beside it), our Received header on top of
        # the message exactly as sent, dots and all.
        assert not mta.store.envelope_path(smtp_id).exists()
        assert not mta.store.envelope_path(local_id).exists()
        (smtp_received, smtp_rest), (local_received, local_rest) = (
            _message_part(files[smtp_id]), _message_part(files[local_id]))
        assert smtp_received.startswith(b"Received: from ")
        assert local_received.startswith(b"Received: from localhost (uid=1000 [127.0.0.1])")
        assert smtp_rest == local_rest == message
        envelopes = [Envelope.from_bytes(read_embedded_envelope(mta.store.data_path(queue_id)))
                     for queue_id in (smtp_id, local_id)]
        for env in envelopes:
            assert env.sender == "someone@remote.test"
            assert [(r.address, str(r.kind), r.original, r.mailbox) for r in env.recipients] == [
                ("alice@example.test", "local", "alice@example.test", "alice@example.test")]
        assert envelopes[0].size == len(files[smtp_id]) - files[smtp_id].index(smtp_received)
        assert envelopes[1].size == len(files[local_id]) - files[local_id].index(local_received)
    finally:
        await mta.stop()
