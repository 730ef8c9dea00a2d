"""The epoll loop without per-event log context (mta.system.fastpoll), on the real reactor."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mta.system import fastpoll


class Echo(Protocol):
    def dataReceived(self, data):  # noqa: N802
        self.transport.write(data)


class BrokenOnClose(Echo):
    def connectionLost(self, reason=None):  # noqa: N802
        raise RuntimeError("connectionLost failed")


class Client(Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.echoed: Deferred[bytes] = Deferred()

    def dataReceived(self, data):  # noqa: N802
        self.got += data
        if self.got.endswith(b"\n") and not self.echoed.called:
            self.echoed.callback(self.got)


async def echo_once(port_number: int, line: bytes) -> bytes:
    client = Client()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_number, timeout=5)
    await Deferred.fromCoroutine(_connect(endpoint, client))
    client.transport.write(line)
    got = await client.echoed.addTimeout(5, reactor)
    client.transport.loseConnection()
    return got


async def _connect(endpoint, client):
    return await endpoint.connect(Factory.forProtocol(lambda: client))


@pytest_twisted.ensureDeferred
async def test_the_reactor_serves_connections_and_survives_a_failing_protocol():
    """Installed on the suite's (epoll) reactor: connections are served; an
    exception escaping a protocol's connectionLost is logged, and the loop goes
    on serving the others (as Twisted's callWithLogger did)."""
    assert isinstance(reactor, EPollReactor)
    assert fastpoll.install(reactor) and fastpoll.install(reactor)  # once is enough; twice is harmless
    assert reactor.doIteration.__name__ == "do_poll"
    failures = []

    def observe(event):
        if event.get("log_failure") is not None and "error while handling" in event.get("log_format", ""):
            failures.append(event["log_failure"])

    broken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(BrokenOnClose))
    fine = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
    globalLogPublisher.addObserver(observe)
    try:
        assert await echo_once(broken.getHost().port, b"one\n") == b"one\n"
        for _ in range(100):  # bounded: the server side's close comes within a few turns
            if failures:
                break
            await Deferred.fromCoroutine(_sleep(0.01))
        assert await echo_once(fine.getHost().port, b"two\n") == b"two\n"
    finally:
        globalLogPublisher.removeObserver(observe)
        await broken.stopListening()
        await fine.stopListening()
    assert len(failures) == 1 and failures[0].check(RuntimeError)


async def _sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


def test_other_reactors_are_left_alone():
    clock = Clock()
    assert not fastpoll.install(clock) and not hasattr(clock, "doIteration")
