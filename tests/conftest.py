"""Shared test fixtures: the leak check every test runs under, and temporary paths.

The autouse fixture ``no_leaks`` fails a test that leaves delayed calls, open
sockets or listening ports behind in the reactor, after giving the reactor a
short, bounded time to finish closing what the test closed.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater


def _snapshot() -> tuple[set, set]:
    calls = {c for c in reactor.getDelayedCalls() if c.active()}
    selectables = set(reactor.getReaders()) | set(reactor.getWriters())
    return calls, selectables


def _describe(calls: set, selectables: set) -> str:
    lines = [f"delayed call: {c}" for c in calls]
    lines += [f"open selectable: {s!r}" for s in selectables]
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it leaves delayed calls or connections behind."""
    calls_before, sel_before = _snapshot()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        calls, sel = _snapshot()
        new_calls = {c for c in calls - calls_before
                     if "ThreadPool" not in repr(c) and "threadpool" not in repr(c)}
        new_sel = sel - sel_before
        # The reactor's own waker pipe is not a leak.
        new_sel = {s for s in new_sel if "Waker" not in type(s).__name__}
        if not new_calls and not new_sel:
            return
        if time.monotonic() > deadline:
            for c in new_calls:
                c.cancel()
            for s in new_sel:
                try:
                    s.loseConnection() if hasattr(s, "loseConnection") else s.stopListening()
                except Exception:
                    pass
            pytest.fail("test left the reactor dirty:\n" + _describe(new_calls, new_sel))
        pytest_twisted.blockon(deferLater(reactor, 0.02, lambda: None))


@pytest.fixture
def dns_server():
    """A started :class:`tests.dnsserver.LoopbackDNS` with no names; stopped afterwards.

    Fill it in the test with ``dns_server.load({...})`` / ``set`` / ``add``, and
    point resolvers at it with ``dns_server.dns_config(timeout=...)``.
    """
    from tests.dnsserver import LoopbackDNS

    server = LoopbackDNS()
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture(scope="session")
def dane_world(tmp_path_factory):
    """One validating resolver (Unbound) in front of signed test zones (NSD) for the
    whole session, with the receiving certificate their TLSA records describe
    (:class:`tests.test_dane.DaneWorld`)."""
    from tests.test_dane import DaneWorld

    world = DaneWorld(tmp_path_factory.mktemp("dnssec"))
    world.start()
    yield world
    world.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL 15 server for the whole run (:mod:`tests.pgserver`), on
    127.0.0.1; a test takes a fresh database with ``postgres.create_database()``
    and connects with ``postgres.dsn(name)``.  A test that kills it must start it
    again (``postgres.start()``) before it ends."""
    from tests.pgserver import start_postgres

    server = start_postgres()
    yield server
    server.cleanup()


@pytest.fixture
def two_nodes(postgres, tmp_path):
    """Two ``twistd -n mta`` nodes sharing one fresh PostgreSQL directory
    (:mod:`tests.nodes`: ports, clients from 127.0.0.2 / 127.0.0.3, the ``mta``
    command per node); killed after the test."""
    from tests.nodes import start_nodes, stop_nodes

    nodes = start_nodes(tmp_path, postgres)
    yield nodes
    stop_nodes(nodes)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (issue 20), on a loopback port in a
    temporary directory; each test keeps to keys of its own prefix."""
    from tests.redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()
