"""The queue's shape, as Postfix's qshape: messages by destination (or by the
reason they wait) and by age (issue 21).

Shared by ``mta queue list --summary`` (:mod:`mta.admin.queueviews`) and the
status page (:mod:`mta.daemon.status`), which both read envelopes from the
store.  A message's destinations are the domains of its recipients still to
deliver (``local`` for mailboxes and pipes of this host); its state is
``held`` while it is in the hold queue (issue 17: ``Envelope.hold``, as
Postfix's hold queue), else ``deferred`` once a recipient still to deliver has
been tried and deferred, else ``active`` (waiting for its first attempt, as
Postfix's incoming/active queues).  A held message's deferral reason is
``held: <why>``.  Ages go in qshape's buckets (minutes: at most 5, 10, 20, ..., 1280,
more); a message counts once per row it belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from mta.queue.envelope import Envelope, RecipientKind, RecipientState

# qshape's buckets: the upper bound of each, in minutes; the last one is open.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
NOT_TRIED = "(not tried yet)"
STATES = ("active", "deferred", "held")  # message_state's values
MAX_REASON = 120  # characters of a reply kept as a reason
_SPACES = re.compile(r"\s+")

Row = tuple[str, int, list[int]]


def destinations(env: Envelope) -> list[str]:
    """The destinations of the recipients still to deliver, each once, in order."""
    seen: dict[str, None] = {}
    for r in env.recipients:
        if r.state.final:
            continue
        if r.kind is RecipientKind.REMOTE:
            seen[r.address.rpartition("@")[2].lower() or "local"] = None
        else:
            seen["local"] = None
    return list(seen)


def deferral_reasons(env: Envelope) -> list[str]:
    """Why the recipients still to deliver wait: each one's last reply (spaces
    squeezed, cut to :data:`MAX_REASON` characters), or :data:`NOT_TRIED`; for a
    held message, ``held: <why>`` (the hold's reason) alone."""
    if env.hold:
        return [("held: " + _SPACES.sub(" ", env.hold).strip())[:MAX_REASON]]
    seen: dict[str, None] = {}
    for r in env.recipients:
        if r.state.final:
            continue
        reply = _SPACES.sub(" ", r.last_reply).strip()
        seen[reply[:MAX_REASON] if reply else NOT_TRIED] = None
    return list(seen)


def message_state(env: Envelope) -> str:
    """One of :data:`STATES` (see the module's docstring)."""
    if env.hold:
        return "held"
    pending = [r for r in env.recipients if not r.state.final]
    if any(r.state is RecipientState.DEFERRED or r.attempts > 0 for r in pending):
        return "deferred"
    return "active"


def state_counts(envelopes: Iterable[Envelope]) -> dict[str, int]:
    """How many of ``envelopes`` are in each of :data:`STATES` (every state named)."""
    counts = dict.fromkeys(STATES, 0)
    for env in envelopes:
        counts[message_state(env)] += 1
    return counts


def bucket_labels() -> list[str]:
    return [str(b) for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}+"]


def _bucket(age_seconds: float) -> int:
    minutes = age_seconds / 60
    for i, bound in enumerate(AGE_BUCKETS):
        if minutes <= bound:
            return i
    return len(AGE_BUCKETS)


def summary(envelopes: Iterable[Envelope], now: float,
            key: Callable[[Envelope], list[str]] = destinations) -> list[Row]:
    """``(row, total, counts per bucket)`` rows, TOTAL first, then by total
    (then by name); the rows are ``key(envelope)``: its destinations by default."""
    width = len(AGE_BUCKETS) + 1
    rows: dict[str, list[int]] = {}
    total = [0] * width
    for env in envelopes:
        i = _bucket(now - env.created)
        total[i] += 1
        for name in key(env):
            rows.setdefault(name, [0] * width)[i] += 1
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return [("TOTAL", sum(total), total)] + [(d, sum(c), c) for d, c in ordered]
