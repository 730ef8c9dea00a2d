"""Greylisting: a first attempt of a (client network, sender, recipient) triplet is
deferred, a retry after ``delay`` and within ``window`` passes, as postgrey does.

A real MTA retries a 4xx (RFC 5321 §4.5.4.1); much bulk software does not.
The rules, with postgrey's defaults where the issue left a choice:

* the triplet: the client's network (``ipv4_prefix``, /24; ``ipv6_prefix``,
  /64: one host's retries may come from another address of its pool), the
  envelope sender normalized as postgrey does (lower case; ``+extension`` and
  a BATV ``prvs=...=`` tag removed; runs of digits in the local part made
  ``#``, so VERP senders are one triplet) and the recipient (lower case).
  The null sender is a sender like any other, ``<>`` (postgrey keys bounces on
  the empty sender too: a bounce is retried like any other mail);
* first sight: 451 4.7.1; a retry before ``delay`` has passed: 451 again (the
  first sight is not moved); a retry after ``window``: as a first sight;
* a retry in time passes, and so does every later message of the triplet
  until it has not been seen for ``max_age``;
* ``auto_allow``: a client network with that many triplets passed is passed
  at once from then on (postgrey's --auto-whitelist-clients), until it has not
  been seen for ``max_age``;
* trusted (relay_networks) and authenticated clients are never asked (the
  check's ``applies``), nor clients a DNS allowlist vouches for.

State is one SQLite file (stdlib ``sqlite3``), written synchronously on the
reactor thread, kept tiny: one indexed SELECT and at most two row writes per
RCPT, in WAL mode with ``synchronous=NORMAL``, so a commit is a write to the
WAL without an fsync (tens of microseconds; a thread hop would cost more).  A
crash may lose the last writes; that costs at most one more 451 to a retry,
never mail.  Old rows are removed at most once per ``PURGE_INTERVAL``, at most
``PURGE_BATCH`` rows a time (bounded work on the RCPT path).  Worker processes
share the file (WAL allows it); a lock held longer than ``BUSY_TIMEOUT`` is an
error, which the pipeline answers with the check's ``on_error``.  The clock is
passed in (``seconds()``), so tests use a fake one.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

from mta.config import GreylistConfig

PURGE_INTERVAL = 3600.0
PURGE_BATCH = 1000
BUSY_TIMEOUT = 0.2  # seconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    net TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (net, sender, recipient)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplets_last_seen ON triplets (last_seen);
CREATE TABLE IF NOT EXISTS clients (
    net TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clients_last_seen ON clients (last_seen);
"""

_BATV = re.compile(r"^prvs=[^=@]+=", re.IGNORECASE)
_DIGITS = re.compile(r"\b\d+\b")


class Decision(NamedTuple):
    passed: bool
    wait: int  # seconds until a retry passes (0 when passed)
    why: str  # "new", "early", "late" (a retry after the window), "retried", "known", "client"


def client_network(ip: str, v4_prefix: int, v6_prefix: int) -> str:
    """The client's network as text (``192.0.2.0/24``); the address itself when it
    is no IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def normalize_sender(sender: str) -> str:
    """The sender as postgrey keys it (see the module docstring); ``<>`` for the null sender."""
    if not sender:
        return "<>"
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    local = _BATV.sub("", local)
    local = local.split("+", 1)[0]
    return f"{_DIGITS.sub('#', local)}@{domain}"


class Greylist:
    """The greylist's state in the SQLite file ``config.db``."""

    def __init__(self, config: GreylistConfig, clock: Any) -> None:
        self.config = config
        self.clock = clock
        path = Path(config.db) if config.db is not None else Path("greylist.sqlite")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._purged = 0.0

    def close(self) -> None:
        self.db.close()

    def check(self, ip: str, sender: str, recipient: str) -> Decision:
        """Whether this attempt passes, recording it."""
        cfg = self.config
        now = self.clock.seconds()
        net = client_network(ip, cfg.ipv4_prefix, cfg.ipv6_prefix)
        key = (net, normalize_sender(sender), recipient.lower())
        db = self.db
        if now - self._purged >= PURGE_INTERVAL:
            self.purge(now)
        if cfg.auto_allow:
            row = db.execute("SELECT passes, last_seen FROM clients WHERE net = ?", (net,)).fetchone()
            if row is not None and row[0] >= cfg.auto_allow and now - row[1] < cfg.max_age:
                db.execute("UPDATE clients SET last_seen = ? WHERE net = ?", (now, net))
                return Decision(True, 0, "client")
        row = db.execute("SELECT first_seen, last_seen, passed FROM triplets "
                         "WHERE net = ? AND sender = ? AND recipient = ?", key).fetchone()
        if row is None or (row[2] and now - row[1] >= cfg.max_age):
            db.execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now))
            return Decision(False, int(cfg.delay + 0.999), "new")
        first, _, passed = row
        if passed:
            db.execute("UPDATE triplets SET last_seen = ? WHERE net = ? AND sender = ? "
                       "AND recipient = ?", (now, *key))
            return Decision(True, 0, "known")
        age = now - first
        if age < cfg.delay:
            db.execute("UPDATE triplets SET last_seen = ? WHERE net = ? AND sender = ? "
                       "AND recipient = ?", (now, *key))
            return Decision(False, int(cfg.delay - age + 0.999), "early")
        if age > cfg.window:
            db.execute("UPDATE triplets SET first_seen = ?, last_seen = ? WHERE net = ? "
                       "AND sender = ? AND recipient = ?", (now, now, *key))
            return Decision(False, int(cfg.delay + 0.999), "late")
        db.execute("BEGIN")
        try:
            db.execute("UPDATE triplets SET last_seen = ?, passed = 1 WHERE net = ? AND sender = ? "
                       "AND recipient = ?", (now, *key))
            db.execute("INSERT INTO clients VALUES (?, 1, ?) ON CONFLICT (net) DO UPDATE SET "
                       "passes = passes + 1, last_seen = excluded.last_seen", (net, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Decision(True, 0, "retried")

    def purge(self, now: float) -> int:
        """Forget triplets and clients not seen for ``max_age`` and first sights whose
        window has passed; at most PURGE_BATCH rows of each (more at the next purge,
        which then comes at once)."""
        cfg = self.config
        db = self.db
        removed = db.execute(
            "DELETE FROM triplets WHERE (net, sender, recipient) IN (SELECT net, sender, recipient "
            "FROM triplets WHERE last_seen < ? OR (passed = 0 AND first_seen < ?) LIMIT ?)",
            (now - cfg.max_age, now - cfg.window, PURGE_BATCH)).rowcount
        removed_clients = db.execute(
            "DELETE FROM clients WHERE net IN (SELECT net FROM clients WHERE last_seen < ? LIMIT ?)",
            (now - cfg.max_age, PURGE_BATCH)).rowcount
        full = removed >= PURGE_BATCH or removed_clients >= PURGE_BATCH
        self._purged = 0.0 if full else now
        return removed + removed_clients
