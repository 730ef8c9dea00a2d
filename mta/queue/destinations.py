"""Dead-destination feedback: hold a destination's mail back while it is down.

Postfix's queue manager marks a destination (next hop) dead when a delivery
to it could not talk to any of its servers (connection refused or timed out,
a 4xx greeting, a failed TLS handshake), and defers its other messages
("delivery temporarily suspended") without connecting for each; after a
wait one delivery is let through as a probe.  This is the same on the queue
side: the courier says ``DeliveryResult.destination_down``, the runner asks
:class:`DeadDestinations` before each attempt, using the router's
destination key (``remote:<domain>``, ``remote:smarthost``).

Contract:

* :meth:`failed` marks a key down until ``now + schedule[k]`` (k = the
  number of failed probes so far, the last value repeating).  A failure of
  an attempt started before the key went down (one of the
  ``max_connections_per_destination`` in flight at once) only updates the
  reason; only the probe's failure lengthens the wait.
* While a key is down, :meth:`admit` refuses every message but the probe;
  a refused message is *parked* (:meth:`park`): kept as its id and its own
  deadline (expiry) only, with no timer, no envelope kept in memory and no
  envelope rewrite.
* When the wait is over the runner takes one parked message as the probe
  (:meth:`take_probe`).  Its success (:meth:`up`) releases all the parked
  messages at once; its failure parks nothing new and starts the next wait.
* :meth:`due` gives the parked messages whose own deadline has come (they
  must expire on time), at the latest at the end of each wait.
* :meth:`reset` (``mta queue flush``) forgets every dead destination, as
  Postfix's ``postqueue -f`` does.

Memory: one dict entry (id -> float) per parked message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class DeadDestination:
    """One destination known to be down."""

    until: float  # no attempt before this (then one probe)
    reason: str  # the last error, for "delivery temporarily suspended: <reason>"
    probes: int = 0  # probes that failed since it went down
    probe: str | None = None  # the queue id let through as the probe, while it runs
    # Parked messages: queue id -> the time a pass is needed anyway (expiry).
    parked: dict[str, float] = field(default_factory=dict)


class DeadDestinations:
    """The destinations known to be down, and the messages held back for them."""

    def __init__(self, schedule: Sequence[float]) -> None:
        self.schedule = tuple(schedule)
        self._down: dict[str, DeadDestination] = {}

    def __len__(self) -> int:
        return len(self._down)

    def get(self, key: str) -> DeadDestination | None:
        return self._down.get(key)

    def admit(self, key: str, queue_id: str) -> bool:
        """May ``queue_id`` make a delivery attempt to ``key`` now?"""
        dead = self._down.get(key)
        return dead is None or dead.probe == queue_id

    def suspended_reply(self, key: str) -> str:
        dead = self._down[key]
        return f"451 4.4.1 delivery temporarily suspended: {dead.reason}"

    def park(self, key: str, queue_id: str, deadline: float) -> None:
        self._down[key].parked[queue_id] = deadline

    def failed(self, key: str, reason: str, now: float, queue_id: str) -> float | None:
        """A delivery to ``key`` reached none of its servers.  Returns when the next
        probe is due if this failure started a wait (the runner sets one timer),
        else None (the key was down already: only the reason is updated)."""
        dead = self._down.get(key)
        if dead is None:
            dead = self._down[key] = DeadDestination(until=now + self.schedule[0], reason=reason)
            return dead.until
        dead.reason = reason
        if dead.probe != queue_id:
            return None
        dead.probe = None
        dead.probes += 1
        dead.until = now + self.schedule[min(dead.probes, len(self.schedule) - 1)]
        return dead.until

    def up(self, key: str) -> list[str]:
        """A delivery to ``key`` reached a server: it is up; the parked ids, to run now."""
        dead = self._down.pop(key, None)
        return list(dead.parked) if dead is not None else []

    def take_probe(self, key: str) -> str | None:
        """The wait for ``key`` is over: the parked message to probe with (None:
        nothing is parked, and the key is forgotten; the next message probes)."""
        dead = self._down.get(key)
        if dead is None:
            return None
        while dead.parked:
            queue_id = next(iter(dead.parked))
            del dead.parked[queue_id]
            dead.probe = queue_id
            return queue_id
        del self._down[key]
        return None

    def due(self, key: str, now: float) -> list[str]:
        """Parked ids whose own deadline has come; they are unparked."""
        dead = self._down.get(key)
        if dead is None:
            return []
        ids = [qid for qid, deadline in dead.parked.items() if deadline <= now]
        for qid in ids:
            del dead.parked[qid]
        return ids

    def forget(self, queue_id: str) -> None:
        """A message is gone (deleted, bounced by the administrator)."""
        for dead in self._down.values():
            dead.parked.pop(queue_id, None)

    def reset(self) -> list[str]:
        """Forget every dead destination; the ids that were parked."""
        ids = [qid for dead in self._down.values() for qid in dead.parked]
        self._down.clear()
        return ids

    def parked_count(self) -> int:
        return sum(len(dead.parked) for dead in self._down.values())
