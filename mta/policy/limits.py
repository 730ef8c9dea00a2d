"""Abuse limits: sliding-window counters for connection rates, message rates and AUTH failures.

Pure logic over an injected clock (``seconds()``), so tests drive it with a
``twisted.internet.task.Clock``.  Memory is bounded: each key keeps at most
``limit`` timestamps and the number of keys is capped (the oldest are dropped).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Protocol

from mta.config import Limits

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

MAX_KEYS = 100_000


class SlidingWindow:
    """Counts events per key over the last ``window`` seconds."""

    def __init__(self, clock: Any, limit: int, window: float, max_keys: int = MAX_KEYS) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        horizon = self.clock.seconds() - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def forget(self, key: str) -> None:
        self._events.pop(key, None)

    def count(self, key: str) -> int:
        events = self._recent(key)
        return len(events) if events else 0

    def hit(self, key: str) -> bool:
        """Record one event; False when it goes over the limit (0 = unlimited)."""
        if self.limit <= 0:
            return True
        events = self._recent(key)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit + 1)
            if len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        events.append(self.clock.seconds())
        self._events.move_to_end(key)
        return len(events) <= self.limit


class AbuseCounters(Protocol):
    """What the SMTP session (``mta.smtp.sasl``) and its checks (``ConnectionLimits``,
    ``UserRate`` in :mod:`mta.policy.checks`) ask of the abuse counters.

    Two implementations: :class:`AbuseLimits` (this process's memory; every answer
    synchronous, so a plain message pays for no Deferred) and
    :class:`mta.policy.rediscounters.RedisAbuseLimits` (one Redis shared by every
    node; an answer may be a Deferred, and falls back to the local counters while
    Redis cannot be reached, so these calls never fail).  A caller takes a plain
    ``bool``/``None`` as it is and waits for a Deferred.  The rules (limits, windows,
    blocks never extended, known addresses exempt) are those of :class:`AbuseLimits`.
    """

    def connection_allowed(self, ip: str) -> bool | Deferred[bool]:
        """Count one connection from ``ip``; False when over connection_rate_per_ip a minute."""

    def message_allowed(self, user: str) -> bool | Deferred[bool]:
        """Count one message of ``user``; False when over messages_per_user_per_hour."""

    def auth_blocked(self, ip: str, account: str | None = None) -> bool | Deferred[bool]:
        """Whether AUTH from ``ip`` (as ``account``, lower-case, when known) is blocked."""

    def auth_failed(self, ip: str, account: str | None) -> None | Deferred[None]:
        """Count a failed AUTH from ``ip`` (as ``account`` when known), maybe starting a block."""

    def auth_succeeded(self, ip: str, account: str) -> None | Deferred[None]:
        """Remember that ``ip`` authenticated as ``account`` (exempt from its block)."""


# How long a successful AUTH as an account from an address exempts that address from
# the account's block (not from the address's own block).
KNOWN_ADDRESS_TIME = 86400.0


class AbuseLimits:
    """The per-process limits shared by all sessions (the local :class:`AbuseCounters`).

    AUTH blocking (per client address and per account, each counted on its own):

    * ``auth_block_failures`` failed attempts within ``auth_block_window`` seconds
      start a block of ``auth_block_time`` seconds, from that moment; a block is
      never extended.
    * During a block every attempt is answered ``454 4.7.0`` whether the password is
      right or wrong (so the answer tells an attacker nothing) and is not counted;
      when the block ends, counting starts afresh.
    * An address from which the account authenticated successfully within the last
      ``KNOWN_ADDRESS_TIME`` seconds is exempt from that account's block (but not from
      its own address block), so failures from elsewhere cannot lock the real user out.
      The (account, address) pairs are kept in memory, at most ``MAX_KEYS`` of them.

    Compared with Postfix's anvil (a per-client rate of AUTH commands, no per-account
    state) this adds the per-account block; compared with Dovecot's auth_penalty (a
    per-IP delay doubling up to 15 s, reset by a success) the per-IP part here is a
    fixed block rather than a delay, and a success does not clear an address's count,
    so one valid account cannot be used to reset guesses at others.
    """

    def __init__(self, limits: Limits, clock: Any) -> None:
        self.clock = clock
        self.connections = SlidingWindow(clock, limits.connection_rate_per_ip, 60.0)
        self.messages = SlidingWindow(clock, limits.messages_per_user_per_hour, 3600.0)
        self.auth_failures = SlidingWindow(clock, limits.auth_block_failures, limits.auth_block_window)
        self.block_time = limits.auth_block_time
        self._blocked_until: dict[str, float] = {}
        # (account, address) -> when that address last authenticated as the account.
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    def connection_allowed(self, ip: str) -> bool:
        return self.connections.hit(ip)

    def message_allowed(self, user: str) -> bool:
        return self.messages.hit(user)

    def _blocked(self, key: str, now: float) -> bool:
        until = self._blocked_until.get(key)
        if until is None:
            return False
        if until > now:
            return True
        del self._blocked_until[key]
        return False

    def _known_address(self, account: str, ip: str, now: float) -> bool:
        when = self._known.get((account, ip))
        if when is None:
            return False
        if now - when < KNOWN_ADDRESS_TIME:
            return True
        del self._known[(account, ip)]
        return False

    def auth_blocked(self, ip: str, account: str | None = None) -> bool:
        """Whether AUTH from ``ip`` (as ``account``, lower-case, when known) is blocked."""
        now = self.clock.seconds()
        if self._blocked(f"ip:{ip}", now):
            return True
        if account is None or not self._blocked(f"user:{account}", now):
            return False
        return not self._known_address(account, ip, now)

    def auth_failed(self, ip: str, account: str | None) -> None:
        """Count a failure outside a block; reaching the limit starts a block
        (``auth_block_time`` from now, never extended) and clears the count."""
        if self.auth_failures.limit <= 0:
            return
        now = self.clock.seconds()
        for key in (f"ip:{ip}", f"user:{account.lower()}" if account else None):
            if key is None or self._blocked(key, now):
                continue
            self.auth_failures.hit(key)
            if self.auth_failures.count(key) >= self.auth_failures.limit:
                if len(self._blocked_until) > MAX_KEYS:
                    self._blocked_until.clear()
                self._blocked_until[key] = now + self.block_time
                self.auth_failures.forget(key)

    def auth_succeeded(self, ip: str, account: str) -> None:
        """Remember that ``ip`` authenticated as ``account`` (lower-case) just now."""
        key = (account, ip)
        self._known[key] = self.clock.seconds()
        self._known.move_to_end(key)
        if len(self._known) > MAX_KEYS:
            self._known.popitem(last=False)
