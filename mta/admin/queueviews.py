"""Views of the queue for ``mta queue list`` and ``mta queue trace`` (issue 21).

* Filters (``--sender``, ``--recipient``, ``--destination``, ``--state``): an
  address matches ``user@domain`` exactly (any case), or a ``domain`` /
  ``@domain`` by its domain; the null sender is ``<>``.  A message's
  destinations are the domains of its recipients still to deliver (``local``
  for mailboxes and pipes of this host).  Its state is ``held`` while it is in
  the hold queue (issue 17), else ``deferred`` once a recipient still to
  deliver has been tried and deferred, else ``active`` (waiting for its first
  attempt, as Postfix's incoming/active queues).
* ``--summary``: as Postfix's qshape, one row per destination (and a TOTAL
  row) with the number of messages in each age bucket (minutes: at most 5,
  10, 20, ..., 1280, more); a message counts once per destination.  Then the
  number of messages in each state (``--json``: ``states``).
* ``trace ID|ADDRESS``: every event of the JSON logs the daemon writes
  (``log_json``, and each worker's ``<log_json>.worker<N>``:
  :func:`mta.daemon.logs.worker_json_path`) that names the message (or, for an
  address, that names the address as sender or recipient, and then every event
  of those messages), with the notices (bounces) made from it, ordered by time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mta.queue.envelope import Envelope

# The shape of the queue is shared with the status page (mta.daemon.status).
from mta.queue.shape import (  # noqa: F401 (AGE_BUCKETS, STATES, bucket_labels, ...: this module's API)
    AGE_BUCKETS,
    STATES,
    bucket_labels,
    destinations,
    message_state,
    state_counts,
    summary,
)

MAX_TRACE_EVENTS = 100_000  # per trace: a bound on memory, whatever the logs hold
MAX_LINKED_IDS = 1000


def _matches(address: str, pattern: str) -> bool:
    """``address`` is ``pattern`` (``user@domain``) or in its domain (``domain``, ``@domain``)."""
    pattern = pattern.strip().lower()
    address = address.lower()
    if pattern == "<>":
        return address in ("", "<>")
    local, at, domain = pattern.rpartition("@")
    if local:
        return address == pattern
    return address.rpartition("@")[2] == (domain if at else pattern).lstrip("@")


def select(envelopes: Iterable[Envelope], sender: str | None = None,
           recipient: str | None = None, destination: str | None = None,
           state: str | None = None) -> list[Envelope]:
    """The envelopes that pass every filter given."""
    out = []
    for env in envelopes:
        if sender is not None and not _matches(env.sender, sender):
            continue
        if recipient is not None and not any(
                _matches(r.address, recipient) or (r.original and _matches(r.original, recipient))
                for r in env.recipients):
            continue
        if destination is not None and destination.lower().lstrip("@") not in destinations(env):
            continue
        if state is not None and message_state(env) != state:
            continue
        out.append(env)
    return out


def summary_json(rows: list[tuple[str, int, list[int]]],
                 states: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "buckets_minutes": bucket_labels(),
        "destinations": [{"destination": d, "total": t, "counts": c} for d, t, c in rows]}
    if states is not None:
        out["states"] = states
    return out


def states_line(states: dict[str, int]) -> str:
    """The summary's last line: the messages in each state."""
    return "-- by state: " + ", ".join(f"{name} {n}" for name, n in states.items())


# --- trace ---------------------------------------------------------------------------------


def log_files(log_json: Path) -> list[tuple[str, Path]]:
    """``(process, path)`` of the JSON logs: the main process's, then each worker's."""
    from mta.daemon.logs import WORKER_JSON_SUFFIX

    files = [("main", log_json)]
    pattern = log_json.name + WORKER_JSON_SUFFIX + "*"
    for path in sorted(log_json.parent.glob(pattern)):
        suffix = path.name[len(log_json.name) + 1:]
        if suffix[len("worker"):].isdigit():
            files.append((suffix, path))
    return files


def read_events(files: Sequence[tuple[str, Path]], errors: list[str]) -> Iterator[dict[str, Any]]:
    """Each JSON line of each file as a dict with ``process`` added; unreadable lines skipped."""
    for process, path in files:
        try:
            f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            continue
        except OSError as e:
            errors.append(f"cannot read {path}: {e.strerror or e}")
            continue
        with f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(event, dict):
                    event["process"] = process
                    yield event


def _ids(event: dict[str, Any]) -> set[str]:
    return {v for k in ("queue_id", "id") if isinstance(v := event.get(k), str)}


def _addresses(event: dict[str, Any]) -> list[str]:
    found = []
    for key in ("sender", "recipient", "original"):
        if isinstance(v := event.get(key), str):
            found.append(v)
    for key in ("rcpts", "recipients"):
        value = event.get(key)
        if isinstance(value, str):
            found += value.split(",")
        elif isinstance(value, list):
            found += [v for v in value if isinstance(v, str)]
    return [a.strip().strip("<>") for a in found]


_ORDER = {"queued": 0, "removed": 2}


def trace(events: Iterable[dict[str, Any]], target: str, is_id: bool) -> list[dict[str, Any]]:
    """The events of one message (``is_id``) or of every message of an address, with the
    notices made from them (``dsn`` events name the new message as ``dsn_id``), by time."""
    kept: list[dict[str, Any]] = []
    for event in events:
        if len(kept) >= MAX_TRACE_EVENTS:
            break
        if _ids(event) or event.get("dsn_id") or any(_addresses(event)):
            kept.append(event)
    ids: set[str] = set()
    if is_id:
        ids.add(target)
    else:
        ids |= {i for e in kept if any(_matches(a, target) for a in _addresses(e))
                for i in _ids(e)}
    for _ in range(10):  # follow notices of notices, a few levels at most
        more = {e["dsn_id"] for e in kept if isinstance(e.get("dsn_id"), str)
                and _ids(e) & ids} - ids
        if not more or len(ids) >= MAX_LINKED_IDS:
            break
        ids |= more
    chosen = [e for e in kept if _ids(e) & ids or (isinstance(e.get("dsn_id"), str)
                                                     and e["dsn_id"] in ids)
              or (not is_id and any(_matches(a, target) for a in _addresses(e)))]
    chosen.sort(key=lambda e: (str(e.get("time") or ""), _ORDER.get(str(e.get("event")), 1)))
    return chosen


def trace_lines(events: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{e.get('time') or '-'}  {e.get('process', '-'):<8}  {e.get('event') or '-':<10}  "
            f"{e.get('message', '')}" for e in events]
