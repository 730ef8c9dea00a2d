"""The abuse counters' wiring: local (the default) or shared in Redis (issue 20).

:func:`build_abuse_counters` chooses by ``[counters] backend``; with Redis it
also makes the thread pool that runs the blocking redis-py calls off the
reactor (``max_connections`` threads, started and stopped by
:class:`CountersService`, which also checks Redis once at start).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mta.config import Config
from mta.policy.limits import AbuseCounters, AbuseLimits


def build_abuse_counters(config: Config, reactor: Any) -> AbuseCounters:
    """The process's abuse counters: :class:`AbuseLimits`, or Redis-backed ones over them."""
    local = AbuseLimits(config.limits, reactor)
    if config.counters.backend != "redis":
        return local
    from mta.policy.rediscounters import RedisAbuseLimits, redis_client

    pool = ThreadPool(minthreads=0, maxthreads=config.counters.max_connections,
                      name="mta-counters")

    def run(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args)

    counters = RedisAbuseLimits(config.limits, config.counters, reactor,
                                redis_client(config.counters), run, local)
    counters.threadpool = pool
    return counters


class CountersService(Service):
    """Starts the Redis counters' thread pool and first check; stops them."""

    name = "counters"

    def __init__(self, counters: Any) -> None:
        self.counters = counters

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.counters.threadpool.start()
        self.counters.start()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.counters.stop()
        self.counters.threadpool.stop()
