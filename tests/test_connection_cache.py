"""Outbound connection reuse (mta.delivery.cache): what a receiving server sees.

Real sockets to a scripted sink on loopback; the cache's own bookkeeping
(age, room, closing) on a fake Clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock, deferLater

from mta.config import DeliveryConfig
from mta.delivery.cache import ConnectionCache
from mta.delivery.mx import MXHost
from mta.delivery.remote import RemoteCourier
from mta.queue.courier import Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.runner import QueueRunner, Router
from mta.queue.store import QueueStore
from tests.sink import Sink, start_sink, wait_until
from tests.test_remote import FakeResolver, make_config, sinks

BODY = b"Subject: again\r\n\r\nbody\r\n"
CA = trustme.CA()
CERT = CA.issue_cert("127.0.0.1")
TRUST = Certificate.loadPEM(CA.cert_pem.bytes())


def courier_for(tmp_path: Path, sink: Sink, cache_time: float = 5.0,
                tls: str = "none") -> RemoteCourier:
    config = make_config(tmp_path, smarthosts=(f"127.0.0.1:{sink.port}",), smarthost_tls=tls,
                         connection_cache_time=cache_time)
    return RemoteCourier(config, FakeResolver({}), reactor, trust_root=TRUST)


@asynccontextmanager
async def cached_courier(tmp_path: Path, cache_time: float = 5.0, policy: str = "none",
                         **sink_options: Any) -> AsyncIterator[tuple[Sink, RemoteCourier]]:
    """A sink and a courier with a connection cache; closes both afterwards."""
    sink = await start_sink(**sink_options)
    try:
        courier = courier_for(tmp_path, sink, cache_time, policy)
        yield sink, courier
        await courier.close()
    finally:
        await sink.stop()


def message(tmp_path: Path, qid: str, rcpt: str) -> tuple[Envelope, Path]:
    path = tmp_path / f"{qid}.msg"
    path.write_bytes(BODY)
    return Envelope(qid, "s@src.test", [Recipient(rcpt, RecipientKind.REMOTE, rcpt)], 0.0,
                    size=len(BODY)), path


async def deliver(courier: RemoteCourier, tmp_path: Path, qid: str, rcpt: str) -> list[Any]:
    env, path = message(tmp_path, qid, rcpt)
    return await courier.deliver(env, env.recipients, path)


def verbs(commands: list[str]) -> list[str]:
    return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in commands]


@pytest_twisted.ensureDeferred
async def test_second_message_goes_on_the_same_connection_and_close_sends_quit(tmp_path: Path) -> None:
    async with cached_courier(tmp_path) as (sink, courier):
        first = await deliver(courier, tmp_path, "q1", "a@dst.test")
        second = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert [r.outcome for r in first + second] == [Outcome.DELIVERED, Outcome.DELIVERED]
        [session] = sink.sessions
        assert verbs(session.commands) == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"]
        assert [m.recipients for m in sink.messages] == [["a@dst.test"], ["b@dst.test"]]
        assert not session.closed
        await courier.close()
        await wait_until(lambda: session.closed)
        assert session.commands[-1] == "QUIT"
        assert courier.cache.reused == 1 and len(courier.cache) == 0


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_with_quit_after_the_cache_time(tmp_path: Path) -> None:
    async with cached_courier(tmp_path, cache_time=0.2) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        [session] = sink.sessions
        await deferLater(reactor, 0.05, lambda: None)
        assert not session.closed  # kept for a moment...
        await wait_until(lambda: session.closed, timeout=3)  # ...then closed politely
        assert session.commands[-1] == "QUIT" and len(courier.cache) == 0
        await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert len(sink.sessions) == 2  # a new connection after the idle time


@pytest_twisted.ensureDeferred
async def test_cache_time_zero_closes_each_connection_at_once(tmp_path: Path) -> None:
    async with cached_courier(tmp_path, cache_time=0) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert [verbs(s.commands)[-1] for s in sink.sessions] == ["QUIT", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_server_closing_the_connection_at_reuse_costs_a_reconnect_not_a_deferral(
        tmp_path: Path) -> None:
    # The server drops the reused connection at MAIL, unanswered: nothing was
    # done there, so the client connects again at once and the message goes out once.
    async with cached_courier(tmp_path, drop={"MAIL:reused"}) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        [result] = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert result.outcome is Outcome.DELIVERED, result.reply
        assert [m.recipients for m in sink.messages] == [["a@dst.test"], ["b@dst.test"]]
        assert len(sink.sessions) == 2 and sink.sessions[0].dropped_at == "MAIL"


@pytest_twisted.ensureDeferred
async def test_421_to_mail_on_a_reused_connection_is_retried_on_a_new_one(tmp_path: Path) -> None:
    # A server limiting messages per connection refuses the reused session's
    # MAIL with 421 and closes: nothing was sent, so a new connection takes it.
    refusal = "421 4.7.0 too many messages in this session"
    async with cached_courier(tmp_path, replies={"MAIL:reused": refusal}) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        [result] = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert result.outcome is Outcome.DELIVERED, result.reply
        assert [m.recipients for m in sink.messages] == [["a@dst.test"], ["b@dst.test"]]
        assert len(sink.sessions) == 2


@pytest_twisted.ensureDeferred
async def test_failure_after_the_data_on_a_reused_connection_is_not_retried(tmp_path: Path) -> None:
    # The body went out and the server vanished before its final reply: the
    # message may have been taken, so it is deferred, never sent twice at once.
    async with cached_courier(tmp_path) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        sink.options.drop.add("DATA_END")
        [result] = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert result.outcome is Outcome.DEFERRED
        assert len(sink.sessions) == 1  # no second connection


@pytest_twisted.ensureDeferred
async def test_connection_closed_or_421_while_idle_is_not_reused(tmp_path: Path) -> None:
    async with cached_courier(tmp_path) as (sink, courier):
        await deliver(courier, tmp_path, "q1", "a@dst.test")
        [proto] = list(sink._connections)
        proto.transport.write(b"421 4.4.2 sink.test idle timeout\r\n")  # and stays open
        await deferLater(reactor, 0.1, lambda: None)
        [result] = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert result.outcome is Outcome.DELIVERED
        assert len(sink.sessions) == 2 and "MAIL" not in verbs(sink.sessions[0].commands[4:])
        # the server closes the second one while idle: the third message connects anew
        [proto] = [p for p in sink._connections if p.session is sink.sessions[1]]
        proto.transport.loseConnection()
        await wait_until(lambda: sink.sessions[1].closed)
        await deferLater(reactor, 0.05, lambda: None)
        [result] = await deliver(courier, tmp_path, "q3", "c@dst.test")
        assert result.outcome is Outcome.DELIVERED and len(sink.sessions) == 3
        assert len(sink.messages) == 3


@pytest_twisted.ensureDeferred
async def test_tls_connection_is_reused_without_a_second_handshake(tmp_path: Path) -> None:
    async with cached_courier(tmp_path, policy="require", tls=CERT) as (sink, courier):
        [first] = await deliver(courier, tmp_path, "q1", "a@dst.test")
        [second] = await deliver(courier, tmp_path, "q2", "b@dst.test")
        assert first.outcome is second.outcome is Outcome.DELIVERED
        assert second.tls.startswith("TLSv1.") and second.tls == first.tls  # reported on both
        [session] = sink.sessions
        assert verbs(session.commands).count("STARTTLS") == 1
        assert all(m.tls for m in sink.messages) and len(sink.messages) == 2


@pytest_twisted.ensureDeferred
async def test_runner_stop_closes_cached_connections(tmp_path: Path) -> None:
    sink = await start_sink()
    clock = Clock()
    clock.advance(time.time())
    store = QueueStore(tmp_path / "queue", fsync=False, clock=clock.seconds)
    courier = courier_for(tmp_path, sink)
    runner = QueueRunner(store, Router({"remote": courier}, smarthost=True), clock,
                         DeliveryConfig(retry_jitter=0.0), "out.example.test")
    try:
        ids = []
        for rcpt in ("a@dst.test", "b@dst.test"):
            writer = store.new_message()
            writer.write(BODY)
            env = Envelope(writer.id, "s@src.test", [Recipient(rcpt, RecipientKind.REMOTE, rcpt)],
                           time.time())
            writer.commit(env)
            ids.append(env.id)
        runner.start()
        def done() -> bool:
            clock.advance(0)  # the runner's timers are on the fake clock
            return not store.ids()

        await wait_until(done)
        assert len(sink.messages) == 2 and not any(s.closed for s in sink.sessions)
    finally:
        await runner.stop()
        await sink.stop()
    assert all(s.commands[-1] == "QUIT" for s in sink.sessions)
    assert not any(store.exists(i) for i in ids)


# --- the cache's bookkeeping, on a fake clock -------------------------------------------


class FakeSession:
    def __init__(self, clock: Clock, reusable: bool = True) -> None:
        self.opened_at = clock.seconds()
        self.reusable = reusable
        self.finished = 0

    def finish(self) -> Deferred[None]:
        self.finished += 1
        return succeed(None)


def test_cache_hands_back_only_live_young_sessions_and_keeps_within_room() -> None:
    clock = Clock()
    cache = ConnectionCache(clock, idle_time=2, max_age=300, max_idle=2)
    a, b, c = FakeSession(clock), FakeSession(clock), FakeSession(clock)
    cache.put("k", a)
    cache.put("k", b)
    cache.put("k", c)  # no room: closed at once
    assert (len(cache), c.finished) == (2, 1)
    assert cache.take("k") is b  # most recently used first
    assert cache.take("other") is None
    b.reusable = False
    cache.put("k", b)
    assert cache.take("k") is a and b.finished == 1  # a dead one is closed, not handed out
    clock.advance(301)
    cache.put("k", a)  # too old to keep
    assert a.finished == 1 and len(cache) == 0


def test_cache_expires_idle_sessions_and_keeps_nothing_once_closed() -> None:
    clock = Clock()
    cache = ConnectionCache(clock, idle_time=2)
    a, b = FakeSession(clock), FakeSession(clock)
    cache.put("k", a)
    clock.advance(1.9)
    assert a.finished == 0
    clock.advance(0.2)
    assert a.finished == 1 and cache.take("k") is None
    cache.put("k", b)
    cache.close()
    assert b.finished == 1 and not clock.getDelayedCalls()
    cache.put("k", a)
    assert a.finished == 2 and len(cache) == 0


def test_cache_time_setting(tmp_path: Path) -> None:
    from mta.config import ConfigError, config_from_dict

    assert config_from_dict({"hostname": "h.test"}, tmp_path).delivery.connection_cache_time == 2.0
    with pytest.raises(ConfigError, match="delivery.connection_cache_time"):
        config_from_dict({"hostname": "h.test", "delivery": {"connection_cache_time": -1}}, tmp_path)


# --- MX delivery: reuse by domain, before any DNS lookup -----------------------------------


def mx_courier(tmp_path: Path, port: int, resolver: FakeResolver) -> RemoteCourier:
    config = make_config(tmp_path, mx_port=port, connection_cache_time=5.0, tls_policy="none")
    return RemoteCourier(config, resolver, reactor)


@pytest_twisted.ensureDeferred
async def test_next_message_to_a_domain_reuses_its_connection_without_a_dns_lookup(
        tmp_path: Path) -> None:
    async with sinks({}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost("mx1.dst.test", 10, ("127.0.0.1",))]})
        courier = mx_courier(tmp_path, sink.port, resolver)
        try:
            for i in range(3):
                [result] = await deliver(courier, tmp_path, f"q{i}", f"r{i}@dst.test")
                assert result.outcome is Outcome.DELIVERED and result.remote_mta == "mx1.dst.test"
            # As Postfix reuses a connection by its next hop: one lookup, one session.
            assert resolver.calls == ["dst.test"]
            assert len(sink.sessions) == 1 and courier.cache.reused == 2
            # Another domain on the same server still gets its own lookup.
            resolver.answers["other.test"] = resolver.answers["dst.test"]
            await deliver(courier, tmp_path, "q9", "x@other.test")
            assert resolver.calls == ["dst.test", "other.test"]
        finally:
            await courier.close()


@pytest_twisted.ensureDeferred
async def test_a_reused_server_gone_meanwhile_sends_the_domain_to_dns_and_the_next_mx(
        tmp_path: Path) -> None:
    async with sinks({}, {}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost("mx1.dst.test", 10, ("127.0.0.1",)),
                                              MXHost("mx2.dst.test", 20, ("127.0.0.2",))]})
        courier = mx_courier(tmp_path, first.port, resolver)
        try:
            await deliver(courier, tmp_path, "q1", "a@dst.test")
            assert [m.recipients for m in first.messages] == [["a@dst.test"]]
            await first.stop()  # closes the cached connection and refuses new ones
            [result] = await deliver(courier, tmp_path, "q2", "b@dst.test")
            assert result.outcome is Outcome.DELIVERED and result.remote_mta == "mx2.dst.test"
            assert resolver.calls == ["dst.test", "dst.test"]
            assert [m.recipients for m in second.messages] == [["b@dst.test"]]
        finally:
            await courier.close()
