"""Dead-destination feedback (mta.queue.destinations) and the background queue load.

The runner drives the real remote courier against real loopback listeners (a
listener that closes every connection before its greeting, then a sink on the
same port); the retry schedule runs on a fake Clock.  The restart test runs the
real daemon on a queue of a few thousand messages.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher

from mta.config import DeliveryConfig
from mta.queue.envelope import RecipientKind, RecipientState
from mta.queue.store import QueueStore
from tests.daemon import Daemon
from tests.sink import start_sink
from tests.test_delivery_flow import build, enqueue, settle
from tests.test_queue_views import enqueue as enqueue_aged
from tests.test_queue_views import write_config


class _Closer(protocol.Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self.factory.accepted += 1
        self.transport.loseConnection()  # before any greeting: the server is unusable


class ClosingListener(protocol.ServerFactory):
    """Accepts TCP connections on loopback, counts them and closes each at once."""

    protocol = _Closer

    def __init__(self) -> None:
        self.accepted = 0
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def number(self) -> int:
        return self.port.getHost().port


class Events:
    """The log events the runner emits, by name."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event: dict) -> None:
        if "event" in event:
            self.events.append(event)

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    def close(self) -> None:
        globalLogPublisher.removeObserver(self)


N = 60
SCHEDULE = DeliveryConfig(retry_schedule=(60.0, 300.0), retry_jitter=0.0)


async def turns(clock: Clock, seconds: float = 0.3) -> None:
    """Let the real network and the fake clock's due calls run for a while."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        clock.advance(0)
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_refusing_destination_gets_one_connection_per_retry_period(tmp_path):
    listener = ClosingListener()
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, listener.number, clock, SCHEDULE)
    ids = [enqueue(store, "sender@src.test", ["a@dst.test"]).id for _ in range(N)]
    events = Events()
    runner.start()
    try:
        def logged() -> int:
            return len(events.named("delivery"))

        await settle(clock, lambda: logged() >= N)
        await turns(clock)
        # The first wave: at most the destination's concurrency, not one per message.
        first = listener.accepted
        limit = SCHEDULE.max_connections_per_destination
        assert 1 <= first <= limit
        assert len(events.named("destination_down")) == 1
        suspended = [e for e in events.named("delivery")
                     if e["reply"].startswith("451 4.4.1 delivery temporarily suspended: ")]
        assert len(suspended) == N - first
        assert "connect" in suspended[0]["reply"] or "closed" in suspended[0]["reply"]
        assert {e["outcome"] for e in suspended} == {"deferred"}
        # Held without an envelope rewrite: never attempted, as on disk before.
        on_disk = [store.load(i).recipients[0] for i in ids]
        assert sum(1 for r in on_disk if r.attempts == 0) == N - first
        assert all(r.state is not RecipientState.DELIVERED for r in on_disk)

        # Each wait ends with one probe: one connection, not one per message.
        clock.advance(60)
        await turns(clock)
        assert listener.accepted == first + 1
        clock.advance(299)
        await turns(clock)
        assert listener.accepted == first + 1  # the second wait is 300 s
        clock.advance(1)
        await turns(clock)
        assert listener.accepted == first + 2
        assert len(events.named("destination_probe")) == 2

        # The destination comes back on the same port: the next probe gets
        # through and every held message is delivered, none lost.
        port = listener.number
        await listener.port.stopListening()
        sink = await start_sink(port=port)
        try:
            clock.advance(300)
            await settle(clock, lambda: not store.ids(), timeout=30)
            delivered = sorted(r for m in sink.messages for r in m.recipients)
            assert delivered == ["a@dst.test"] * N
            assert len(sink.messages) == N
            # All but the probe were held (the first wave too, at its own retry).
            assert events.named("destination_up")[0]["count"] == N - 1
        finally:
            await sink.stop()
    finally:
        events.close()
        await runner.stop()
        if listener.port.connected:
            await listener.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_flush_forgets_a_dead_destination_and_drains_at_once(tmp_path):
    listener = ClosingListener()
    clock = Clock()
    clock.advance(time.time())
    store, runner = build(tmp_path, listener.number, clock, SCHEDULE)
    for _ in range(20):
        enqueue(store, "sender@src.test", ["b@dst.test"])
    events = Events()
    runner.start()
    try:
        await settle(clock, lambda: len(events.named("delivery")) >= 20)
        assert len(events.named("destination_down")) == 1
        port = listener.number
        await listener.port.stopListening()
        sink = await start_sink(port=port)
        try:
            assert runner.flush() == 20  # mta queue flush: no waiting for the probe
            await settle(clock, lambda: not store.ids(), timeout=30)
            assert len(sink.messages) == 20
        finally:
            await sink.stop()
    finally:
        events.close()
        await runner.stop()


@pytest.mark.slow
def test_restart_with_a_large_queue_greets_before_the_queue_is_loaded(tmp_path):
    config = write_config(tmp_path)
    store = QueueStore(tmp_path / "var" / "queue", fsync=False)
    count = 3000
    for i in range(count):
        enqueue_aged(store, f"s{i}@src.test", [(f"r{i}@remote.test", RecipientKind.REMOTE)], 60)
    port = int(config.read_text().split('endpoint = "127.0.0.1:')[1].split('"')[0])
    daemon = Daemon(tmp_path, config, port)
    daemon.start()  # returns at the first 220
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            assert s.recv(100).startswith(b"221")
        log = tmp_path / "var" / "mta.json"

        def events() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines() if line]

        deadline = time.monotonic() + 60
        while (not any(e.get("event") == "queue_loaded" for e in events())
               and time.monotonic() < deadline):
            time.sleep(0.1)
        names = [e.get("event") for e in events()]
        assert "queue_loaded" in names
        loaded = names.index("queue_loaded")
        # Both sessions (the daemon's readiness check and ours) were served, greeting
        # included, before the last envelopes of the queue were read.
        sessions = [i for i, name in enumerate(names) if name == "session"]
        assert len(sessions) >= 2 and sessions[1] < loaded
        assert [e for e in events() if e.get("event") == "queue_loaded"][0]["count"] == count

        # The smarthost has nothing listening: the messages are held back, not
        # each given a connection attempt.
        deadline = time.monotonic() + 60
        while (sum(1 for e in events() if e.get("event") == "delivery") < count
               and time.monotonic() < deadline):
            time.sleep(0.2)
        deliveries = [e for e in events() if e.get("event") == "delivery"]
        assert len(deliveries) == count, (
            [e for e in deliveries if "temporarily suspended" not in e["reply"]],
            [e for e in events() if e.get("level") in ("warn", "error", "critical")][:5])
        attempted = [e for e in deliveries if "temporarily suspended" not in e["reply"]]
        assert 1 <= len(attempted) <= DeliveryConfig().max_connections_per_destination
    finally:
        daemon.kill()
