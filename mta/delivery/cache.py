"""The outbound connection cache: SMTP sessions kept open between messages.

After a delivery whose last transaction ended cleanly, the client leaves the
connection open and puts it here under its destination key (address, port,
TLS policy, credentials, protocol).  The next delivery to the same key takes
it and starts with MAIL FROM directly, skipping the TCP handshake, the
greeting, EHLO and STARTTLS (RFC 5321 §3.3 allows any number of transactions
per session).  This is Postfix's connection cache: an idle connection is kept
for ``idle_time`` seconds (``smtp_connection_cache_time_limit``, 2 s) and not
reused once it is ``max_age`` seconds old (``smtp_connection_reuse_time_limit``,
300 s); then it gets QUIT and is closed.

The cache never holds more than ``max_idle`` connections, so it stays below
the runner's connection limits; taking one back checks that it is still open
and that the server sent nothing meanwhile (a 421 while idle, say).  A reused
connection that fails before any recipient is answered and before the message
data goes out (the server closed it just then, or refuses MAIL with 421
because it limits messages per connection) costs nothing: the client connects
afresh for the same transaction (:func:`mta.delivery.client.send`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

IDLE_TIME = 2.0
MAX_AGE = 300.0


class CachedSession(Protocol):
    """What the cache needs of a client session (``mta.delivery.session.ClientSession``)."""

    opened_at: float

    @property
    def reusable(self) -> bool: ...

    def finish(self) -> Any: ...


@dataclass
class _Idle:
    session: CachedSession
    timer: IDelayedCall


class ConnectionCache:
    def __init__(self, clock: IReactorTime, idle_time: float = IDLE_TIME, max_age: float = MAX_AGE,
                 max_idle: int = 100) -> None:
        self.clock = clock
        self.idle_time = idle_time
        self.max_age = max_age
        self.max_idle = max_idle
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._count = 0
        self._closing: set[Deferred[Any]] = set()
        self._closed = False
        self.reused = 0  # connections taken back (tests and logs)

    @property
    def enabled(self) -> bool:
        return self.idle_time > 0 and not self._closed

    def __len__(self) -> int:
        return self._count

    def has(self, key: Hashable) -> bool:
        """Whether an idle session is kept for ``key`` (:meth:`take` still checks it)."""
        return bool(self._idle.get(key))

    def take(self, key: Hashable) -> CachedSession | None:
        """An open, idle, not too old session for ``key``, or None."""
        entries = self._idle.get(key)
        now = self.clock.seconds()
        while entries:
            entry = entries.pop()  # the most recently used: the least likely to be timed out
            self._count -= 1
            if entry.timer.active():
                entry.timer.cancel()
            if entry.session.reusable and now - entry.session.opened_at < self.max_age:
                if not entries:
                    del self._idle[key]
                self.reused += 1
                return entry.session
            self._finish(entry.session)
        self._idle.pop(key, None)
        return None

    def put(self, key: Hashable, session: CachedSession) -> None:
        """Keep ``session`` for the next delivery to ``key`` (or close it if there is no room)."""
        too_old = self.clock.seconds() - session.opened_at >= self.max_age
        if not self.enabled or too_old or self._count >= self.max_idle:
            self._finish(session)
            return
        entries = self._idle.setdefault(key, [])
        entry = _Idle(session, self.clock.callLater(self.idle_time, self._expire, key, session))
        entries.append(entry)
        self._count += 1

    def close(self) -> Deferred[Any]:
        """QUIT every idle connection; fires when all of them are closed. No more are kept."""
        self._closed = True
        for entries in self._idle.values():
            for entry in entries:
                if entry.timer.active():
                    entry.timer.cancel()
                self._finish(entry.session)
        self._idle.clear()
        self._count = 0
        return DeferredList(list(self._closing))

    def _expire(self, key: Hashable, session: CachedSession) -> None:
        entries = self._idle.get(key, [])
        for i, entry in enumerate(entries):
            if entry.session is session:
                del entries[i]
                self._count -= 1
                break
        if not entries:
            self._idle.pop(key, None)
        self._finish(session)

    def _finish(self, session: CachedSession) -> None:
        d = ensureDeferred(session.finish())
        self._closing.add(d)

        def done(result: Any) -> None:
            self._closing.discard(d)
            if isinstance(result, Failure):
                log.failure("closing a cached SMTP connection failed", result)

        d.addBoth(done)
