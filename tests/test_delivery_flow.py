"""The queue runner driving the real remote courier against scripted sinks.

The retry schedule runs on a fake Clock; the network (sinks on loopback) is real.
"""

from __future__ import annotations

import email
import time
from email import policy

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from mta.config import ConfigError, DeliveryConfig
from mta.delivery.mx import MXHost
from mta.delivery.remote import RemoteCourier
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.runner import QueueRunner, Router
from mta.queue.store import QueueStore
from tests import harness
from tests.sink import start_sink
from tests.test_remote import FakeResolver, make_config

BODY = b"Subject: flow\r\nMessage-ID: <flow@src.test>\r\n\r\nbody\r\n"


class NoLocal:
    def deliver(self, envelope, recipients, data_path):  # pragma: no cover - not reached
        raise AssertionError("no local delivery expected")


def enqueue(store: QueueStore, sender: str, rcpts: list[str]) -> Envelope:
    writer = store.new_message()
    writer.write(BODY)
    env = Envelope(writer.id, sender, [Recipient(a, RecipientKind.REMOTE, a) for a in rcpts], time.time())
    writer.commit(env)
    return env


async def settle(clock: Clock, predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        clock.advance(0)
        await deferLater(reactor, 0.02, lambda: None)


def build(tmp_path, sink_port: int, clock: Clock,
          delivery: DeliveryConfig | None = None) -> tuple[QueueStore, QueueRunner]:
    store = QueueStore(tmp_path / "queue", fsync=False, clock=clock.seconds)
    config = make_config(tmp_path, mx_port=sink_port)
    resolver = FakeResolver({"dst.test": [MXHost("mx.dst.test", 10, ("127.0.0.1",))],
                             "src.test": [MXHost("mx.src.test", 10, ("127.0.0.1",))]})
    courier = RemoteCourier(config, resolver, reactor)
    router = Router({"remote": courier, "local": NoLocal(), "pipe": NoLocal()})
    delivery = delivery or DeliveryConfig(retry_schedule=(60.0, 300.0), retry_jitter=0.0)
    runner = QueueRunner(store, router, clock, delivery, "out.example.test")
    return store, runner


@pytest_twisted.ensureDeferred
async def test_all_mx_down_deferred_then_delivered_on_retry(tmp_path):
    # Reserve a port with a sink, then stop it: the MX is down for the first attempt.
    probe = await start_sink()
    port = probe.port
    await probe.stop()
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, port, clock)
    env = enqueue(store, "sender@src.test", ["a@dst.test"])
    runner.start()
    try:
        await settle(clock, lambda: store.load(env.id).recipients[0].attempts == 1)
        (r,) = store.load(env.id).recipients
        assert r.state is RecipientState.DEFERRED
        assert "refused" in r.last_reply or "connect" in r.last_reply
        sink = await start_sink(port=port)
        try:
            clock.advance(59)  # not yet due
            await deferLater(reactor, 0.1, lambda: None)
            assert sink.messages == []
            clock.advance(1)
            await settle(clock, lambda: not store.ids())
            assert [m.recipients for m in sink.messages] == [["a@dst.test"]]
        finally:
            await sink.stop()
    finally:
        await runner.stop()


@pytest_twisted.ensureDeferred
async def test_mixed_recipient_replies_and_one_dsn(tmp_path):
    sink = await start_sink(replies={"RCPT:later@dst.test": "450 4.2.1 try later",
                                     "RCPT:gone@dst.test": "550 5.1.1 no such user"})
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, sink.port, clock)
    env = enqueue(store, "sender@src.test", ["ok@dst.test", "later@dst.test", "gone@dst.test"])
    runner.start()
    try:
        def states():
            try:
                return {r.address: r.state for r in store.load(env.id).recipients}
            except FileNotFoundError:
                return {}

        await settle(clock, lambda: states().get("ok@dst.test") is RecipientState.DELIVERED
                     and len(sink.messages) >= 2)
        got = states()
        assert got == {"ok@dst.test": RecipientState.DELIVERED,
                       "later@dst.test": RecipientState.DEFERRED,
                       "gone@dst.test": RecipientState.FAILED}
        # The bounce went out through the same sink (the sender's domain): exactly one.
        bounces = [m for m in sink.messages if m.sender == ""]
        assert len(bounces) == 1 and bounces[0].recipients == ["sender@src.test"]
        report = email.message_from_bytes(bounces[0].data, policy=policy.compat32)
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1]
        assert status.get_content_type() == "message/delivery-status"
        blocks = status.get_payload()
        recipient_block = blocks[1]
        assert recipient_block["Final-Recipient"].replace(" ", "") == "rfc822;gone@dst.test"
        assert recipient_block["Action"] == "failed"
        assert recipient_block["Status"] == "5.1.1"
        assert "550 5.1.1 no such user" in recipient_block["Diagnostic-Code"]
        assert recipient_block["Remote-MTA"].replace(" ", "") == "dns;mx.dst.test"
        assert b"later@dst.test" not in bounces[0].data.split(b"Content-Type: text/rfc822-headers")[0] \
            .split(b"message/delivery-status")[1]
    finally:
        await runner.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_421_after_refused_recipients_bounces_them_in_one_dsn(tmp_path):
    """A next hop that refuses both recipients and then answers the pipelined DATA
    with 421 (chasquid after three errors): both recipients fail at once and the
    sender gets one DSN naming both, as Postfix does; nothing is left deferred."""
    sink = await start_sink(max_errors=3, replies={"RCPT:gone@dst.test": "550 5.1.1 no such user",
                                                   "RCPT:nope@dst.test": "550 5.7.1 not here"})
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, sink.port, clock)
    env = enqueue(store, "sender@src.test", ["gone@dst.test", "nope@dst.test"])
    runner.start()
    try:
        await settle(clock, lambda: env.id not in store.ids() and len(sink.messages) >= 1)
        bounces = [m for m in sink.messages if m.sender == ""]
        assert len(bounces) == 1 and bounces[0].recipients == ["sender@src.test"]
        assert len(sink.messages) == 1
        report = email.message_from_bytes(bounces[0].data, policy=policy.compat32)
        blocks = report.get_payload()[1].get_payload()
        failed = {b["Final-Recipient"].replace(" ", ""): (b["Action"], b["Status"], b["Diagnostic-Code"])
                  for b in blocks[1:]}
        assert failed.keys() == {"rfc822;gone@dst.test", "rfc822;nope@dst.test"}
        assert failed["rfc822;gone@dst.test"][:2] == ("failed", "5.1.1")
        assert "550 5.1.1 no such user" in failed["rfc822;gone@dst.test"][2]
        assert failed["rfc822;nope@dst.test"][:2] == ("failed", "5.7.1")
    finally:
        await runner.stop()
        await sink.stop()


@pytest.mark.parametrize("extra,expected", [
    ({}, "MAILER-DAEMON@example.test"),  # the primary local domain, not the host name
    ({"local_domains": []}, "MAILER-DAEMON@mx.example.test"),  # none: the host name
    ({"delivery": {"bounce_from": "Bounces@Example.TEST"}}, "Bounces@example.test"),
])
@pytest_twisted.ensureDeferred
async def test_bounce_from_header_is_the_configured_sender(tmp_path, extra, expected):
    """The bounce's From: is delivery.bounce_from (by default MAILER-DAEMON at the
    first local domain); its envelope sender stays <> (RFC 5321 §4.5.5)."""
    config = harness.make_config(tmp_path, tls=False, extra=extra)
    assert config.hostname == "mx.example.test"
    sink = await start_sink(replies={"RCPT:gone@dst.test": "550 5.1.1 no such user"})
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, sink.port, clock, config.delivery)
    enqueue(store, "sender@src.test", ["gone@dst.test"])
    runner.start()
    try:
        await settle(clock, lambda: any(m.sender == "" for m in sink.messages))
        (bounce,) = [m for m in sink.messages if m.sender == ""]
        report = email.message_from_bytes(bounce.data, policy=policy.compat32)
        assert report["From"] == f"Mail Delivery System <{expected}>"
        assert bounce.recipients == ["sender@src.test"]
    finally:
        await runner.stop()
        await sink.stop()


@pytest.mark.parametrize("value", ["nobody", "a@b@", "x@-bad-.test", ""])
def test_bounce_from_is_checked_at_load(tmp_path, value):
    with pytest.raises(ConfigError, match="delivery.bounce_from: .* is not an address"):
        harness.make_config(tmp_path, tls=False, extra={"delivery": {"bounce_from": value}})
