"""The abuse counters in one Redis shared by every node (``[counters] backend = "redis"``).

:class:`RedisAbuseLimits` is the shared :class:`mta.policy.limits.AbuseCounters`:
the per-IP connection rate, the per-user message rate and the AUTH blocks of
:class:`~mta.policy.limits.AbuseLimits`, counted in Redis so that a limit reached
on one node holds on all of them.

Client: redis-py (maintained by Redis, wheels for CPython 3.8 to 3.13+), whose
calls block, run off the reactor thread in a thread pool of this module's own,
``max_connections`` threads over a connection pool of as many connections; every
call is bounded by ``timeout`` (connect and read), and no more than
``4 * max_connections`` calls wait at once (past that the answer is the local
one).  txredisapi, the Twisted-native client, was not chosen: its last release
is years old, it has no maintainer answering issues, and its Python 3.12+
support is untested upstream.

Each operation is one Lua script, so it is atomic in Redis (keys are
``<prefix><kind>:<ip or account>``):

* rates: ``INCR`` of ``rate:conn:IP`` / ``rate:msg:USER``, ``EXPIRE`` at the
  first hit (60 s / 3600 s): a fixed window that starts at the first event,
  where the local counters slide; the limit is the same.
* AUTH failures: ``fail:ip:IP`` and ``fail:user:ACCOUNT`` count within
  auth_block_window; reaching auth_block_failures sets ``block:...`` with
  ``SET NX EX auth_block_time`` (never extended: NX, and a blocked key is not
  counted) and deletes the count.
* a success sets ``known:ACCOUNT:IP`` for ``KNOWN_ADDRESS_TIME``; a block of
  the account does not apply to that address.

Fallback: every operation is also counted in the node's local
:class:`~mta.policy.limits.AbuseLimits`.  When a Redis call fails (down,
refused, timeout, any Redis error), the node answers from the local counters,
logs one ``counters`` event ``state=down`` (and the metric
``mta_counters_backend_up{backend="redis"}`` drops to 0, and
``mta_counters_backend_outages`` counts one), answers locally and synchronously from
then on (no Deferred), and tries a ``PING`` every ``retry_interval`` seconds;
the first that succeeds logs ``state=back`` and Redis answers again.  Mail is
never refused because Redis is down.  The password and the URL are never
logged; an error is logged by its class name only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import CountersConfig, Limits
from mta.policy.limits import KNOWN_ADDRESS_TIME, AbuseLimits

log = Logger(namespace="mta.policy.counters")

# A key part longer than this (an account name can be long) is replaced by its hash.
MAX_KEY_PART = 200

_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# KEYS: block:ip, known:account:ip (or ''), block:user (or '').
_BLOCKED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if #KEYS < 3 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return 1
"""

# KEYS: pairs of (block key, failure count key); ARGV: window, limit, block time.
_FAILED = """
local started = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local n = redis.call('INCR', KEYS[i + 1])
    if n == 1 then redis.call('EXPIRE', KEYS[i + 1], ARGV[1]) end
    if n >= tonumber(ARGV[2]) then
      redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[3])
      redis.call('DEL', KEYS[i + 1])
      started = started + 1
    end
  end
end
return started
"""


def log_counters_state(state: str, backend: str, detail: str) -> None:
    """The ``counters`` event: ``state`` is ``up`` (at start), ``down`` (once per
    outage: the node counts locally) or ``back``; ``detail`` is an error's class
    name, never its text (a URL with a password can be in it)."""
    log.info("shared counters ({backend}) {state}: {detail}", backend=backend, state=state,
             detail=detail, event="counters")


def _part(text: str) -> str:
    if len(text) <= MAX_KEY_PART:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def redis_client(settings: CountersConfig) -> Any:
    """A redis-py client for ``settings``, every call bounded by ``settings.timeout``."""
    import redis

    common = dict(socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
                  max_connections=settings.max_connections, timeout=settings.timeout)
    if settings.url:
        pool = redis.BlockingConnectionPool.from_url(settings.url, **common)
    else:
        pool = redis.BlockingConnectionPool(host=settings.host, port=settings.port,
                                            password=settings.password, db=settings.db, **common)
    return redis.Redis(connection_pool=pool)


class RedisAbuseLimits:
    """The shared abuse counters (see the module docstring).

    ``client``: a redis-py client (:func:`redis_client`); ``clock``: the reactor (or
    a ``Clock`` in tests: ``callLater`` for the retries); ``run``: ``run(f, *args) ->
    Deferred`` running ``f`` off the reactor thread (the daemon's own thread pool).
    """

    backend = "redis"

    def __init__(self, limits: Limits, settings: CountersConfig, clock: Any, client: Any,
                 run: Callable[..., Deferred], local: AbuseLimits | None = None) -> None:
        self.limits = limits
        self.settings = settings
        self.clock = clock
        self.client = client
        self._run = run
        self.local = local if local is not None else AbuseLimits(limits, clock)
        self.prefix = settings.prefix
        self.up = True
        self._pending = 0
        self._max_pending = 4 * settings.max_connections
        self._retry: Any = None
        self._stopped = False
        self.threadpool: Any = None  # the daemon's (mta.daemon.counters)
        self._hit = client.register_script(_HIT)
        self._blocked = client.register_script(_BLOCKED)
        self._failed = client.register_script(_FAILED)

    # --- the counters --------------------------------------------------------------

    def connection_allowed(self, ip: str) -> bool | Deferred[bool]:
        local = self.local.connection_allowed(ip)
        limit = self.limits.connection_rate_per_ip
        if limit <= 0:
            return True
        return self._call(local, lambda n: n <= limit, _script_call, self._hit,
                          [f"{self.prefix}rate:conn:{_part(ip)}"], [60])

    def message_allowed(self, user: str) -> bool | Deferred[bool]:
        local = self.local.message_allowed(user)
        limit = self.limits.messages_per_user_per_hour
        if limit <= 0:
            return True
        return self._call(local, lambda n: n <= limit, _script_call, self._hit,
                          [f"{self.prefix}rate:msg:{_part(user)}"], [3600])

    def auth_blocked(self, ip: str, account: str | None = None) -> bool | Deferred[bool]:
        local = self.local.auth_blocked(ip, account)
        if self.limits.auth_block_failures <= 0:
            return local
        p = self.prefix
        keys = [f"{p}block:ip:{_part(ip)}"]
        if account is not None:
            keys += [f"{p}known:{_part(account)}:{_part(ip)}", f"{p}block:user:{_part(account)}"]
        return self._call(local, bool, _script_call, self._blocked, keys, [])

    def auth_failed(self, ip: str, account: str | None) -> None | Deferred[None]:
        self.local.auth_failed(ip, account)
        if self.limits.auth_block_failures <= 0:
            return None
        p = self.prefix
        keys = [f"{p}block:ip:{_part(ip)}", f"{p}fail:ip:{_part(ip)}"]
        if account:
            user = _part(account.lower())
            keys += [f"{p}block:user:{user}", f"{p}fail:user:{user}"]
        window = max(1, round(self.limits.auth_block_window))
        block = max(1, round(self.limits.auth_block_time))
        return self._call(None, lambda started: None, _script_call, self._failed, keys,
                          [window, self.limits.auth_block_failures, block])

    def auth_succeeded(self, ip: str, account: str) -> None | Deferred[None]:
        self.local.auth_succeeded(ip, account)
        key = f"{self.prefix}known:{_part(account)}:{_part(ip)}"
        return self._call(None, lambda ok: None, self._set_known, key)

    def _set_known(self, key: str) -> Any:
        return self.client.set(key, "1", ex=int(KNOWN_ADDRESS_TIME))

    # --- calling Redis, and the fallback ---------------------------------------------

    def _call(self, local: Any, convert: Callable[[Any], Any], f: Any, *args: Any) -> Any:
        """``convert(f(*args))`` run off the reactor, or ``local`` at once while Redis is
        down or too many calls wait; ``local`` too if this call fails (and then Redis
        is marked down)."""
        if not self.up or self._pending >= self._max_pending:
            return local
        self._pending += 1
        d = self._run(f, *args)

        def done(result: Any) -> Any:
            self._pending -= 1
            return convert(result)

        def failed(failure: Failure) -> Any:
            self._pending -= 1
            self._went_down(failure)
            return local

        return d.addCallbacks(done, failed)

    def _went_down(self, failure: Failure) -> None:
        if not self.up:
            return
        self.up = False
        log_counters_state("down", self.backend, failure.type.__name__ if failure.type else "error")
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._stopped or (self._retry is not None and self._retry.active()):
            return
        self._retry = self.clock.callLater(self.settings.retry_interval, self._probe)

    def _probe(self) -> Deferred[None]:
        """PING Redis: back up on an answer, else try again after ``retry_interval``."""
        self._retry = None
        d = self._run(self.client.ping)

        def answered(_: Any) -> None:
            if not self.up:
                self.up = True
                log_counters_state("back", self.backend, "ping answered")

        def failed(failure: Failure) -> None:
            if self.up:  # the first check at start
                self.up = False
                log_counters_state("down", self.backend, failure.type.__name__ if failure.type else "error")
            self._schedule_retry()

        return d.addCallbacks(answered, failed)

    def start(self) -> Deferred[None]:
        """Check Redis once at start: one ``counters`` event, ``up`` or ``down``."""
        d = self._run(self.client.ping)

        def answered(_: Any) -> None:
            log_counters_state("up", self.backend, "ping answered")

        def failed(failure: Failure) -> None:
            self._went_down(failure)

        return d.addCallbacks(answered, failed)

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        try:
            self.client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - closing sockets at shutdown: nothing left to do
            pass


def _script_call(script: Any, keys: list[str], args: list[Any]) -> Any:
    return script(keys=keys, args=args)
