"""Abuse limits: sliding-window counters for connection rates, message rates and AUTH failures.

Pure logic over an injected clock (``seconds()``), so tests drive it with a
``twisted.internet.task.Clock``.  Memory is bounded: each key keeps at most
``limit`` timestamps and the number of keys is capped (the oldest are dropped).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from mta.config import Limits

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


class AbuseLimits:
    """The per-process limits shared by all sessions."""

    def __init__(self, limits: Limits, clock: Any) -> None:
        self.clock = clock
        self.connections = SlidingWindow(clock, limits.connection_rate_per_ip, 60.0)
        self.messages = SlidingWindow(clock, limits.messages_per_user_per_hour, 3600.0)
        self.auth_failures = SlidingWindow(clock, limits.auth_block_failures, limits.auth_block_window)
        self.block_time = limits.auth_block_time
        self._blocked_until: dict[str, float] = {}

    def connection_allowed(self, ip: str) -> bool:
        return self.connections.hit(ip)

    def message_allowed(self, user: str) -> bool:
        return self.messages.hit(user)

    def auth_blocked(self, ip: str, account: str | None = None) -> bool:
        now = self.clock.seconds()
        for key in (f"ip:{ip}", f"user:{account}" if account else None):
            if key is None:
                continue
            until = self._blocked_until.get(key)
            if until is not None:
                if until > now:
                    return True
                del self._blocked_until[key]
        return False

    def auth_failed(self, ip: str, account: str | None) -> None:
        """Count a failure; past the limit, block the IP (and the account) for a while."""
        for key in (f"ip:{ip}", f"user:{account.lower()}" if account else None):
            if key is None:
                continue
            self.auth_failures.hit(key)
            if self.auth_failures.limit > 0 and self.auth_failures.count(key) >= self.auth_failures.limit:
                if len(self._blocked_until) > MAX_KEYS:
                    self._blocked_until.clear()
                self._blocked_until[key] = self.clock.seconds() + self.block_time
