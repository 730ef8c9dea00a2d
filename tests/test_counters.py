"""The abuse counters' contract (mta.policy.limits.AbuseCounters) against both
implementations: the local AbuseLimits and RedisAbuseLimits over a real
redis-server (the session fixture ``redis_server``); the Redis fallback when
Redis is down, and its recovery; the [counters] configuration.

Time: the local counters run on a ``Clock``; Redis's expiries are Redis's own,
so the Redis cases that wait for a block to end use a 1-second block and sleep.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool

from mta.config import ConfigError, CountersConfig, Limits, config_from_dict
from mta.policy.limits import AbuseLimits
from mta.policy.rediscounters import RedisAbuseLimits, redis_client
from tests.redisserver import RedisServer

_prefixes = itertools.count()

LIMITS = Limits(connection_rate_per_ip=3, messages_per_user_per_hour=2, auth_block_failures=3,
                auth_block_window=600.0, auth_block_time=1.0)


class Pool:
    """A started thread pool for the Redis calls (the daemon's is mta.daemon.counters')."""

    def __init__(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="test-counters")
        self.pool.start()

    def run(self, f: Any, *args: Any) -> Deferred:
        return deferToThreadPool(reactor, self.pool, f, *args)

    def stop(self) -> None:
        self.pool.stop()


@pytest.fixture
def pool():
    p = Pool()
    yield p
    p.stop()


def redis_counters(port: int, pool: Pool, clock: Any = None, limits: Limits = LIMITS,
                   retry_interval: float = 5.0) -> RedisAbuseLimits:
    settings = CountersConfig(backend="redis", port=port, prefix=f"test{next(_prefixes)}:",
                              timeout=0.5, retry_interval=retry_interval)
    return RedisAbuseLimits(limits, settings, clock or reactor, redis_client(settings), pool.run)


class Local:
    """The local counters, on a Clock."""

    name = "local"

    def __init__(self) -> None:
        self.clock = Clock()
        self.counters = AbuseLimits(LIMITS, self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def close(self) -> None:
        pass


class Redis:
    """Redis-backed counters over the shared redis-server (a prefix of their own)."""

    name = "redis"

    def __init__(self, server: RedisServer, pool: Pool) -> None:
        self.counters = redis_counters(server.port, pool)

    async def advance(self, seconds: float) -> None:
        await deferLater(reactor, seconds + 0.1, lambda: None)

    def close(self) -> None:
        self.counters.stop()


@pytest.fixture(params=["local", "redis"])
def impl(request, pool):
    if request.param == "local":
        made: Any = Local()
    else:
        made = Redis(request.getfixturevalue("redis_server"), pool)
    yield made
    made.close()


async def answer(value: Any) -> Any:
    """What a caller gets: the plain value, or what the Deferred fires with."""
    return await maybeDeferred(lambda: value)


# --- the contract ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_rate_per_ip(impl):
    c = impl.counters
    got = [await answer(c.connection_allowed("192.0.2.1")) for _ in range(4)]
    assert got == [True, True, True, False]
    assert await answer(c.connection_allowed("192.0.2.2")) is True  # another address


@pytest_twisted.ensureDeferred
async def test_messages_per_user(impl):
    c = impl.counters
    got = [await answer(c.message_allowed("alice@example.test")) for _ in range(3)]
    assert got == [True, True, False]
    assert await answer(c.message_allowed("bob@example.test")) is True


@pytest_twisted.ensureDeferred
async def test_account_block_and_its_end(impl):
    c = impl.counters
    for ip in ("198.51.100.1", "198.51.100.2"):  # below the limit from each address
        assert await answer(c.auth_blocked(ip, "alice@example.test")) is False
        await answer(c.auth_failed(ip, "alice@example.test"))
    assert await answer(c.auth_blocked("198.51.100.3", "alice@example.test")) is False
    await answer(c.auth_failed("198.51.100.3", "alice@example.test"))  # the third: blocked
    assert await answer(c.auth_blocked("198.51.100.4", "alice@example.test")) is True
    assert await answer(c.auth_blocked("198.51.100.4", "bob@example.test")) is False
    assert await answer(c.auth_blocked("198.51.100.4")) is False  # no address is blocked
    await impl.advance(LIMITS.auth_block_time)
    assert await answer(c.auth_blocked("198.51.100.4", "alice@example.test")) is False
    # Counting started afresh: one more failure does not block again.
    await answer(c.auth_failed("198.51.100.4", "alice@example.test"))
    assert await answer(c.auth_blocked("198.51.100.4", "alice@example.test")) is False


@pytest_twisted.ensureDeferred
async def test_address_block_is_not_extended(impl):
    c = impl.counters
    for i in range(3):
        await answer(c.auth_failed("203.0.113.9", f"user{i}@example.test"))
    assert await answer(c.auth_blocked("203.0.113.9")) is True
    # Failures during the block are not counted and do not extend it.
    await impl.advance(LIMITS.auth_block_time / 2)
    for _ in range(5):
        await answer(c.auth_failed("203.0.113.9", None))
    await impl.advance(LIMITS.auth_block_time / 2)
    assert await answer(c.auth_blocked("203.0.113.9")) is False


@pytest_twisted.ensureDeferred
async def test_known_address_is_exempt_from_the_account_block(impl):
    c = impl.counters
    await answer(c.auth_succeeded("192.0.2.77", "carol@example.test"))
    for i in range(3):
        await answer(c.auth_failed(f"203.0.113.{i + 20}", "carol@example.test"))
    assert await answer(c.auth_blocked("203.0.113.50", "carol@example.test")) is True
    assert await answer(c.auth_blocked("192.0.2.77", "carol@example.test")) is False


def test_local_counters_answer_without_deferreds():
    """The fast path when Redis is not configured: plain bools and None."""
    c = AbuseLimits(LIMITS, Clock())
    assert c.connection_allowed("192.0.2.1") is True
    assert c.message_allowed("alice@example.test") is True
    assert c.auth_blocked("192.0.2.1", "alice@example.test") is False
    assert c.auth_failed("192.0.2.1", "alice@example.test") is None
    assert c.auth_succeeded("192.0.2.1", "alice@example.test") is None


@pytest_twisted.ensureDeferred
async def test_two_redis_counters_share_one_count(redis_server, pool):
    """Two nodes' counters over one Redis (and one prefix) count together."""
    a = redis_counters(redis_server.port, pool)
    b = RedisAbuseLimits(LIMITS, a.settings, reactor, redis_client(a.settings), pool.run)
    try:
        assert await answer(a.message_allowed("dave@example.test")) is True
        assert await answer(b.message_allowed("dave@example.test")) is True
        assert await answer(a.message_allowed("dave@example.test")) is False
        assert await answer(b.message_allowed("dave@example.test")) is False
        # ... while each node's local counters alone would still allow it.
        assert b.local.messages.count("dave@example.test") == 2
        for node in (a, b, a):
            await answer(node.auth_failed("192.0.2.200", "erin@example.test"))
        assert await answer(b.auth_blocked("192.0.2.201", "erin@example.test")) is True
        assert await answer(a.auth_blocked("192.0.2.200")) is True
    finally:
        a.stop()
        b.stop()


# --- Redis down: the local fallback, one event, recovery -------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_down_falls_back_to_local_then_recovers(tmp_path, pool):
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("event") == "counters":
            events.append(event)

    server = RedisServer(tmp_path / "redis")  # not started yet: nothing listens
    clock = Clock()
    c = redis_counters(server.port, pool, clock=clock, retry_interval=2.0)
    globalLogPublisher.addObserver(observe)
    try:
        t0 = time.monotonic()
        first = c.connection_allowed("192.0.2.1")
        assert isinstance(first, Deferred)
        assert await first is True  # the local answer
        assert time.monotonic() - t0 < 2.0
        assert [(e["state"], e["detail"]) for e in events] == [("down", "ConnectionError")]
        assert c.up is False
        # While down: local and synchronous, and still limited by the local counters.
        assert [c.connection_allowed("192.0.2.1") for _ in range(3)] == [True, True, False]
        assert c.auth_failed("192.0.2.9", "frank@example.test") is None
        assert len(events) == 1  # once per outage
        clock.advance(2.0)  # a retry: still down
        await deferLater(reactor, 0.3, lambda: None)
        assert c.up is False and len(events) == 1
        server.start()
        try:
            clock.advance(2.0)  # the next retry finds it
            for _ in range(50):
                if c.up:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            assert c.up is True
            assert [e["state"] for e in events] == ["down", "back"]
            # Back on Redis: counted there.
            counted = c.message_allowed("gina@example.test")
            assert isinstance(counted, Deferred)
            assert await counted is True
            reply = server.command("GET", f"{c.prefix}rate:msg:gina@example.test")
            assert reply == b"$1\r\n1\r\n"
        finally:
            server.kill()
    finally:
        globalLogPublisher.removeObserver(observe)
        c.stop()
        assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_redis_timeout_falls_back(pool):
    """A port that accepts and never answers (not Redis): the call times out
    (``timeout``) and the local answer is given."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        c = redis_counters(silent.getsockname()[1], pool, clock=Clock())
        t0 = time.monotonic()
        assert await answer(c.auth_blocked("192.0.2.1", "hal@example.test")) is False
        assert time.monotonic() - t0 < 3.0
        assert c.up is False
        c.stop()
    finally:
        silent.close()


# --- configuration -------------------------------------------------------------------


def load(tmp_path, counters: dict) -> Any:
    raw = {"hostname": "mx.example.test", "local_domains": ["example.test"], "counters": counters}
    return config_from_dict(raw, tmp_path).counters


def test_counters_config_defaults_to_local(tmp_path):
    assert load(tmp_path, {}) == CountersConfig()
    assert CountersConfig().backend == "local"


def test_counters_config_redis_and_secrets_not_in_repr(tmp_path):
    c = load(tmp_path, {"backend": "redis", "url": "redis://:s3cret@127.0.0.1:6380/2",
                        "password": "s3cret", "prefix": "site1:", "timeout": 0.25})
    assert (c.backend, c.prefix, c.timeout) == ("redis", "site1:", 0.25)
    assert "s3cret" not in repr(c)


@pytest.mark.parametrize("counters, message", [
    ({"backend": "memcached"}, 'counters.backend: must be "local" or "redis"'),
    ({"backend": "redis", "port": 70000}, "counters.port: must be between 1 and 65535"),
    ({"backend": "redis", "timeout": 0}, "counters.timeout: must be greater than zero"),
    ({"backend": "redis", "url": "http://x"}, "counters.url: must begin with redis://"),
    ({"backend": "redis", "hots": "x"}, "counters.hots: unknown key"),
])
def test_counters_config_errors(tmp_path, counters, message):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, counters)
    assert message in str(e.value)

