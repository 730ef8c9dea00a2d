"""Structured logging: the event schema, a JSON-lines log file, and the secret filter.

Every outcome an operator cares about is one ``twisted.logger`` event whose
``event`` field names it (spelled ``event=`` in every ``log`` call; Twisted's
own keys begin with ``log_``, ours never do).  The format
string of each event makes one readable line in the normal twistd log; the
fields below are what the JSON log (``log_json`` in the configuration) and
:mod:`mta.daemon.metrics` read.

Event schema (``event`` key: fields)
------------------------------------

SMTP server (namespace ``mta.smtp.server``):

``session``     one per connection, when it closes: ``client_ip``, ``listener``
                (listener name), ``kind`` (``mx``/``submission``/``submissions``),
                ``helo`` (or ``-``), ``tls`` (protocol version such as ``TLSv1.3``,
                or ``no``), ``auth`` (user or ``-``), ``accepted`` (messages
                queued), ``errors`` (error replies), ``duration`` (seconds).
``auth``        each AUTH outcome: ``user``, ``ip``, ``result`` (``ok``/``failed``),
                ``reason`` on failure (``bad_credentials``/``blocked``/``malformed``).
``spf``         each SPF check: ``result`` (RFC 7208 §2.6 name: ``pass``, ``fail``,
                ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``),
                ``sender``, ``ip``.
A ``sender`` field is the envelope sender's address, and ``<>`` for the null
sender (never an empty string); the text lines print it as ``from=<>``.

``rejected``    each refused step of a mail transaction: ``stage``
                (``connect``/``mail``/``rcpt``/``data``), ``reply`` (full reply
                text), ``code``, ``enhanced`` (RFC 3463 code), ``reason`` (short
                name, optional), ``ip``, ``sender``, ``recipient`` (at RCPT).
``rejected_summary``  at the end of a session that refused more recipients than
                it logged one by one (the first 10 get ``rejected`` events):
                ``stage`` (``rcpt``), ``count`` (those not logged), ``statuses``
                (RFC 3463 code: count), ``sample`` (comma-separated, first 5),
                ``logged``, ``ip``, ``helo``, ``auth``.
``queued``      each accepted message: ``queue_id`` (older code: ``id``),
                ``sender``, ``rcpts`` (comma-separated), ``size`` (octets), ``ip``.
``limit``       an abuse limit hit: ``limit`` (``connection_rate``,
                ``early_talker``, ``user_messages``), ``ip`` or ``user``.
``check``       a check's verdict that is not a plain acceptance (mta.smtp.pipeline):
                ``check``, ``stage``, ``result`` (``reject``, ``tempfail``,
                ``disconnect``, ``quarantine``; a failure: ``error`` or
                ``timeout``, with ``on_error``), ``reason``, ``code``,
                ``enhanced``, ``reply``, ``ip``.  Acceptances are only counted.
``held``        a message committed into the hold queue: ``queue_id``, ``reason``,
                ``sender``, ``ip``.
``dnsbl``       a DNS blocklist that could not be asked (namespace
                ``mta.policy.dnsbl``): ``zone``, ``ip``, ``result`` (``error``), ``err``.

Queue runner (namespace ``mta.queue.runner``):

``delivery``    each attempt for each recipient: ``queue_id``, ``recipient``,
                ``destination`` (``local``, ``pipe``, ``remote:<domain>``,
                ``remote:smarthost``; the courier kind is the part before ``:``),
                ``outcome`` (``delivered``/``deferred``/``failed``), ``state``,
                ``reply``, ``attempt`` (number), ``duration`` (seconds of this
                attempt), ``remote_mta`` (host that answered, or empty), ``tls``
                (outbound TLS version and cipher, empty for none), ``tls_verified``
                (that connection's certificate was verified), ``age``
                (seconds since the message was queued).
``expired``     ``queue_id``, ``recipient``, ``reply``.
``dsn``         a bounce or delay notice queued: ``action`` (``failed``/``delayed``),
                ``dsn_id``, ``queue_id``, ``sender``, ``recipients``.
``bounce_dropped``  a failure for a null-sender message: ``queue_id``, ``recipient``, ``reply``.
``removed``     ``queue_id``.

DANE (namespace ``mta.delivery.dane``):

``dnssec_check``  the validating resolver's check at start (and again while it
                fails): ``result`` (``ok``/``failed``), ``name``, ``problem``.
``dane``        a DANE outcome for an MX host: ``domain``, ``mx``, ``result``
                (``success``, ``unusable`` or an RFC 8460 failure type:
                ``tlsa-invalid``, ``dnssec-invalid``, ``dane-required``,
                ``starttls-not-supported``, ``certificate-host-mismatch``), ``why``.

Milters (namespace ``mta.policy.milter``; issue 17):

``milter``      a milter's fault or decision the session does not log itself:
                ``milter`` (its name), ``result`` (``closed``, ``garbage``,
                ``timeout``, ``down``, ``shutdown``: a fault, then ``action`` is
                the default action applied for the rest of the session;
                ``discard``, ``quarantine``, ``add_rcpt_refused``), ``stage``,
                ``ip``, ``detail``.  A milter's refusal is a ``rejected`` event
                with ``reason`` ``milter``.
``discarded``   (namespace ``mta.smtp.server``) a message answered 250 and dropped:
                a milter discarded it or removed every recipient: ``sender``,
                ``rcpts``, ``ip``, ``why``.

Outbound TLS policy (namespaces ``mta.delivery.mtasts``, ``mta.delivery.remote``,
``mta.delivery.tlsrpt``):

``mta_sts``     an MTA-STS step: ``result`` (``fetched``: a policy fetched, with
                ``mode``, ``mx``, ``max_age``, ``id``; ``removed``: expired or
                ``mode: none``; ``txt_invalid``; an RFC 8460 result type when a
                fetch failed or a session under a policy failed TLS;
                ``mx_mismatch``: no MX matches an enforce policy), ``domain``.
``tlsrpt``      a TLS report: ``result`` (``queued``, with ``queue_id``, ``rua``,
                ``report_id``; ``no_record``, ``no_rua``, ``dns_error``,
                ``rua_skipped``), ``domain``, ``day``.

Outbound TLS (namespace ``mta.delivery.tlsoutcome``):

``tls_outcome``  each new outbound connection's TLS policy outcome: ``domain``,
                ``server``, ``policy`` (``none``/``may``/``encrypt``/``verify``/
                ``dane``/``mta-sts``), ``source`` (``table``/``relay``/``default``/
                ``dane``/``mta-sts``), ``origin`` (the configuration key), ``result``
                (``verified``/``encrypted``/``cleartext`` or an RFC 8460 failure
                type), ``tls``, ``error``; see :mod:`mta.delivery.tlsoutcome`.

Worker pool (namespace ``mta.daemon.workers``, main process):

``handed_over``  a worker's message still queued after the worker's first
                delivery pass, taken over by the main process's runner (its
                retries): ``queue_id``, ``worker`` (index).

Shared abuse counters (namespace ``mta.policy.counters``; issue 20):

``counters``    the Redis counters' state: ``state`` (``up`` at start, ``down``
                once per outage: the node counts locally, ``back``), ``backend``
                (``redis``), ``detail`` (an error's class name, never its text).

Elsewhere: ``reload`` (``result``, ``err``), ``control`` (``command``, ``uid``),
``deleted`` and ``admin_bounce`` (``queue_id``), ``released`` (``queue_id``,
``reason``: out of the hold queue).

With ``workers = N``, each worker process writes the events of its SMTP
sessions and of its deliveries (the first pass of the mail it accepted) to a
JSON log of its own, ``<log_json>.worker<N>``
(:func:`worker_json_path`); ``mta queue trace`` merges them with the main
process's by time.

JSON lines
----------

:func:`json_file_observer` writes one JSON object per line (not Twisted's
``jsonFileLogObserver``, which writes RFC 7464 record-separated text with
Twisted's internal keys).  Each object has ``time`` (ISO 8601, UTC),
``level``, ``event`` (when the event has one), ``namespace``, ``message``
(the formatted text), ``traceback`` (for failures), then every field of the
event whose value is JSON data (str, number, bool, None, and lists and
string-keyed dicts of those; exceptions, paths and enums are written as
text; other values are left out).  A field whose name clashes with one of
those keys is written with a ``_`` prefix.

Left out
--------

twisted's own lines for each DNS question's UDP port ("DNSDatagramProtocol
starting on N", "(UDP Port N Closed)", "Starting protocol ...") are not
written by the text, worker or JSON log (:func:`is_resolver_chatter`), and no
line of the text log is broken by a CR or LF inside a field value
(:func:`classic_formatter`).

Secrets
-------

No field whose name contains ``password``, ``passwd``, ``secret`` or ``token``
(any case; also inside dict values) is ever written: the JSON observer drops
them itself, and :func:`install_scrubber` puts an observer on the log
publisher that removes them from each event in place.  Installed before
twistd begins logging (from the service maker), it runs ahead of twistd's own
text observer, so the text log never sees them either; an event whose format
string names such a field then prints as Twisted's "Unable to format event"
line, without the secret.  Secrets pasted into the format string itself, or
carried inside an exception's message, cannot be recognised by name.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path, PurePath
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from zope.interface import implementer

SECRET_WORDS = ("password", "passwd", "secret", "token")
# Keys of a JSON line that event fields may not overwrite.
RESERVED_KEYS = frozenset({"time", "level", "event", "namespace", "message", "traceback"})
_MAX_DEPTH = 6


# --- the event key ---------------------------------------------------------------------


def event_name(event: Mapping[str, Any]) -> str | None:
    """The event's ``event`` key, or None."""
    name = event.get("event")
    return name if isinstance(name, str) else None


# --- secrets -----------------------------------------------------------------------------


def is_secret(key: object) -> bool:
    """True for a field name that may hold a credential."""
    return isinstance(key, str) and _secret_name(key)


@functools.lru_cache(maxsize=4096)
def _secret_name(key: str) -> bool:
    # Field names repeat from event to event: each is looked at once.
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


_PLAIN_TYPES = frozenset({str, bytes, int, float, bool, type(None)})


def _has_secret(value: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH or type(value) in _PLAIN_TYPES:
        return False  # most fields: answered without an ABC isinstance check
    if isinstance(value, Mapping):
        return any(is_secret(k) or _has_secret(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_secret(v, depth + 1) for v in value)
    return False


def _without_secrets(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with secret keys removed from every dict inside it."""
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: _without_secrets(v, depth + 1) for k, v in value.items() if not is_secret(k)}
    if isinstance(value, list):
        return [_without_secrets(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_without_secrets(v, depth + 1) for v in value)
    return value


# Field names already seen not to be secret.  Events repeat the same few dozen
# names, so after the first events the name check is one set difference in C
# per event instead of a Python call per field (the scrubber runs for every
# log line, in front of every observer).  Bounded: past the limit, names are
# checked every time.
_SAFE_KEYS: set[str] = set()
_SAFE_KEYS_MAX = 4096


def scrub(event: LogEvent) -> LogEvent:
    """Remove secret fields from ``event`` in place and return it.

    Nested dicts holding secrets are replaced by cleaned copies, never
    changed in place: they may belong to the code that logged them.
    """
    unknown = event.keys() - _SAFE_KEYS
    for key in unknown:
        if is_secret(key):
            del event[key]
        elif isinstance(key, str) and len(_SAFE_KEYS) < _SAFE_KEYS_MAX:
            _SAFE_KEYS.add(key)
    plain = _PLAIN_TYPES
    nested = [key for key, value in event.items()
              if type(value) not in plain and not key.startswith("log_") and _has_secret(value)]
    for key in nested:
        event[key] = _without_secrets(event[key])
    return event


def scrubbed(event: LogEvent) -> LogEvent:
    """A copy of ``event`` without secret fields; ``event`` is left as it is."""
    return scrub(dict(event))


@implementer(ILogObserver)
class SecretScrubber:
    """A log observer that removes secret fields from each event in place.

    Observers registered on the same publisher *after* it never see them.
    """

    def __call__(self, event: LogEvent) -> None:
        scrub(event)


_SCRUBBER = SecretScrubber()


class EventObserver:
    """Something that reads the log's events (``observe_event``) while installed
    on a publisher: the metrics, the status page's memory."""

    _publisher: LogPublisher | None = None

    def observe_event(self, event: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def install(self, publisher: LogPublisher = globalLogPublisher) -> None:
        """Start observing the events published on ``publisher``."""
        self._publisher = publisher
        publisher.addObserver(self.observe_event)

    def uninstall(self) -> None:
        if self._publisher is not None:
            self._publisher.removeObserver(self.observe_event)
            self._publisher = None


def install_scrubber(publisher: LogPublisher = globalLogPublisher) -> SecretScrubber:
    """Register the in-place secret filter on ``publisher`` (idempotent).

    Call it before ``globalLogBeginner.beginLoggingTo`` runs (twistd calls that
    after the service maker returns), so it comes before twistd's observer.
    """
    publisher.addObserver(_SCRUBBER)
    return _SCRUBBER


def remove_scrubber(publisher: LogPublisher = globalLogPublisher) -> None:
    publisher.removeObserver(_SCRUBBER)


@implementer(ILogObserver)
class Scrubbing:
    """Wraps an observer so that it only ever sees events without secrets."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        self.observer(scrubbed(event))


# --- twisted's resolver chatter ------------------------------------------------------------
#
# twisted.names asks each DNS question from a new UDP port (a random source port,
# against spoofed answers), and twisted's UDP port logs its start and its close
# through the legacy log whatever the protocol's ``noisy`` says:
# "DNSDatagramProtocol starting on 40213", "(UDP Port 40213 Closed)", and with
# ``noisy`` also "Starting/Stopping protocol <...DNSDatagramProtocol object ...>".
# That is two to four lines per lookup, of no use to an operator, so the log
# writers here (the text log, a worker's log, the JSON log) leave them out.  The
# MTA opens no other UDP ports, so every UDP port close is the resolver's.

_RESOLVER_CHATTER = re.compile(
    r"DNSDatagramProtocol starting on \d+|\(UDP Port \d+ Closed\)"
    r"|(?:Starting|Stopping) protocol <twisted\.names\.dns\.DNSDatagramProtocol object at \w+>")


def is_resolver_chatter(event: LogEvent) -> bool:
    """True for twisted's per-lookup UDP port lines (see above); a dict look-up for
    any event of our own."""
    if event.get("log_namespace") != "log_legacy":
        return False
    text = event.get("log_text")
    return isinstance(text, str) and _RESOLVER_CHATTER.fullmatch(text) is not None


# --- JSON lines ----------------------------------------------------------------------------


class _Skip(Exception):
    """A value that is not JSON data."""


def _jsonable(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise _Skip()
    if value is None or isinstance(value, bool | int | str):
        return value.value if isinstance(value, Enum) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Enum):
        return _jsonable(value.value, depth + 1)
    if isinstance(value, PurePath | BaseException):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_jsonable(v, depth + 1) for v in items]
    if isinstance(value, Mapping):
        return {k: _jsonable(v, depth + 1) for k, v in value.items()
                if isinstance(k, str) and not is_secret(k)}
    raise _Skip()


def _iso_time(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent) -> str:
    """One line of JSON (no newline) for ``event``; secret fields are left out."""
    event = scrubbed(event)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": getattr(level, "name", None),
    }
    name = event_name(event)
    if name is not None:
        out["event"] = name
    out["namespace"] = event.get("log_namespace")
    out["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key == "event":
            continue
        try:
            data = _jsonable(value)
        except _Skip:
            continue
        out["_" + key if key in RESERVED_KEYS else key] = data
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on its own line, then flushes.

    Safe to call from several threads (events logged by thread-pool work).
    """

    def __init__(self, stream: IO[str], path: Path | None = None) -> None:
        self.stream: IO[str] | None = stream
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, event: LogEvent) -> None:
        if is_resolver_chatter(event):
            return
        line = event_as_json(event) + "\n"
        with self._lock:
            if self.stream is None:
                return
            self.stream.write(line)
            self.stream.flush()

    def reopen(self) -> None:
        """Close and open the file again (after logrotate moved it away)."""
        if self.path is None:
            return
        stream = _open_log(self.path)
        with self._lock:
            old, self.stream = self.stream, stream
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()


def _open_log(path: Path) -> IO[str]:
    # Logs name people's addresses: not world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    return open(fd, "a", encoding="utf-8", errors="replace")  # noqa: SIM115


def json_file_observer(path: Path) -> JSONLinesObserver:
    """An observer appending JSON lines to ``path`` (created if missing). Raises OSError."""
    return JSONLinesObserver(_open_log(path), path)


class JSONLogService(Service):
    """Writes the JSON log while running: registers the observer on start, closes on stop."""

    def __init__(self, path: Path, publisher: LogPublisher = globalLogPublisher) -> None:
        self.path = path
        self.publisher = publisher
        self.observer: JSONLinesObserver | None = None

    def startService(self) -> None:  # noqa: N802
        self.observer = json_file_observer(self.path)
        self.publisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self.observer is not None:
            self.publisher.removeObserver(self.observer)
            self.observer.close()
            self.observer = None

    def reopen(self) -> None:
        if self.observer is not None:
            self.observer.reopen()


# A worker process writes its own JSON log beside the main one: <log_json>.worker<N>
# (one writer per file, so lines never interleave); `mta queue trace` reads them all.
WORKER_JSON_SUFFIX = ".worker"


def worker_json_path(path: Path, index: int) -> Path:
    """The JSON log of worker ``index`` when the main process writes ``path``."""
    return path.with_name(f"{path.name}{WORKER_JSON_SUFFIX}{index}")


def json_log_service(path: Path, publisher: LogPublisher = globalLogPublisher) -> JSONLogService:
    """The JSON log as a child service of the MTA (see :class:`JSONLogService`)."""
    return JSONLogService(path, publisher)


# --- the text log: cheaper time stamps, worker lines ---------------------------------------
#
# twistd writes the text log with a FileLogObserver formatting each event with
# formatEventAsClassicLogText ("<time> [namespace#level] text").  Formatting
# the time stamp (a datetime and a time zone per event) is a good part of the
# cost of a line; the same text is made here with the stamp cached per second.


class _CachedTime:
    """``formatTime`` with the RFC 3339 text of the current second cached."""

    def __init__(self) -> None:
        self._second = -1
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
            self._second = second
        return self._text


def _escape_line_breaks(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Escaped:
    """A field value as the text log shows it: whatever it formats to, with CR and
    LF written as ``\\r`` and ``\\n``.  Indexing, attributes and calls (the format
    string's ``{d[k]}``, ``{p.name}``, twisted's ``{f()}``) give escaped values too."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return _escape_line_breaks(format(self._value, spec))

    def __str__(self) -> str:
        return _escape_line_breaks(str(self._value))

    def __repr__(self) -> str:
        return _escape_line_breaks(repr(self._value))

    def __getitem__(self, key: Any) -> _Escaped:
        return _Escaped(self._value[key])

    def __getattr__(self, name: str) -> _Escaped:
        return _Escaped(getattr(self._value, name))

    def __call__(self) -> _Escaped:
        return _Escaped(self._value())


_UNESCAPED_TYPES = frozenset({int, float, bool, type(None)})


def escaped_fields(event: LogEvent) -> LogEvent:
    """A copy of ``event`` whose fields (all but twisted's ``log_*`` keys) format
    without raw CR or LF, so that no value can start a line of its own in the text
    log (a header value, a client's reply text, an exception message)."""
    return {key: value if (type(value) in _UNESCAPED_TYPES or not isinstance(key, str)
                           or key.startswith("log_")) else _Escaped(value)
            for key, value in event.items()}


def classic_formatter(system_prefix: str = "") -> Any:
    """An event formatter giving twistd's classic line; ``system_prefix`` goes before
    ``namespace#level`` in the brackets (``worker1 ``).

    The common event -- a format string naming fields, no failure attached -- is
    formatted with ``str.format_map`` (C) instead of twisted's pure-Python
    ``string.Formatter``; anything else (a failure, twisted's ``{f()}`` call
    syntax, a missing field) goes through twisted's own formatter.  The text is
    the same either way.

    Every event is one line whatever its fields hold: CR and LF inside a field
    value are written as ``\\r`` and ``\\n`` (:func:`escaped_fields`; the plain
    line pays only a scan of its text for them).  A line break in the format
    string itself, or in a failure's traceback, continues the line after a tab,
    as twisted writes it.
    """
    format_time = _CachedTime()

    def format_event(event: LogEvent) -> str | None:
        if is_resolver_chatter(event):
            return None
        system = event.get("log_system")
        if system is None or (system_prefix and system == "-"):
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        system = f"{system_prefix}{system}"
        fmt = event.get("log_format")
        if isinstance(fmt, str) and "log_failure" not in event and "()" not in fmt:
            try:
                text = fmt.format_map(event)
                if "\n" in text or "\r" in text:
                    text = fmt.format_map(escaped_fields(event))
            except Exception:  # noqa: BLE001 - twisted's formatter reports it in the line
                text = None
            if text is not None:
                if not text:
                    return None
                text = text.replace("\n", "\n\t")
                return f"{format_time(event.get('log_time'))} [{system}] {text}\n"
        event = escaped_fields(event)
        if system_prefix:
            event["log_system"] = system
        return formatEventAsClassicLogText(event, formatTime=format_time)

    return format_event


def _text_log_observer() -> FileLogObserver | None:
    for observer in getattr(globalLogPublisher, "_observers", ()):
        if isinstance(observer, FileLogObserver):
            return observer
    return None


class FlushEachTurn:
    """A log file written once per turn of the reactor.

    twisted's FileLogObserver writes each line and flushes it: a ``write(2)``
    per line (whatever the file's buffering: PYTHONUNBUFFERED, common under
    service managers, makes every write a system call), and for a worker
    process a wake-up of the main process per line, since its lines go
    through a pipe.  Behind this wrapper the lines of one turn of the reactor
    -- the events of every session it served in that turn -- are kept and
    leave in one write when the turn ends (``callLater(0)`` runs before the
    reactor next waits), or at once past ``limit`` characters.  A line logged
    from another thread goes out at once, with what is waiting, and so does
    everything when the reactor shuts down; while it is not running (start-up,
    "Main loop terminated."), each line goes out at once.  What a SIGKILL can
    lose is the lines of the turn it interrupts.
    """

    def __init__(self, out: IO[Any], reactor: Any, limit: int = 65536) -> None:
        self.out = out
        self.reactor = reactor
        self.limit = limit
        self._reactor_thread = threading.get_ident()
        self._waiting: list[Any] = []
        self._size = 0
        self._lock = threading.Lock()
        self._pending: Any = None
        reactor.addSystemEventTrigger("after", "shutdown", self.flush_now)

    def write(self, data: Any) -> None:
        with self._lock:
            self._waiting.append(data)
            self._size += len(data)
            full = self._size >= self.limit
        if full:
            self.flush_now()

    def flush(self) -> None:
        if threading.get_ident() != self._reactor_thread or not self.reactor.running:
            self.flush_now()
        elif self._pending is None:
            self._pending = self.reactor.callLater(0, self.flush_now)

    def flush_now(self) -> None:
        with self._lock:
            waiting, self._waiting, self._size = self._waiting, [], 0
            if threading.get_ident() == self._reactor_thread:
                pending, self._pending = self._pending, None
                if pending is not None and pending.active():
                    pending.cancel()
            if not waiting:
                return
            try:
                # Lines are all str or all bytes, as the observer's file takes them.
                self.out.write(waiting[0][:0].join(waiting))
                self.out.flush()
            except (OSError, ValueError):
                pass  # closed or full: nothing better to do with a log line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


def speed_up_text_log(reactor: Any = None) -> bool:
    """Give twistd's text log observer the cached-time formatter (same lines, less
    work) and, with ``reactor``, one flush per reactor turn (:class:`FlushEachTurn`)."""
    observer = _text_log_observer()
    if observer is None:
        return False
    observer.formatEvent = classic_formatter()
    out = getattr(observer, "_outFile", None)  # FileLogObserver's file (not public API)
    if reactor is not None and out is not None and not isinstance(out, FlushEachTurn):
        observer._outFile = FlushEachTurn(out, reactor)
    return True


def write_log_text(text: str) -> bool:
    """Append ready-made log lines to twistd's text log in one write; False if there is none."""
    observer = _text_log_observer()
    out = getattr(observer, "_outFile", None)  # FileLogObserver's file (not public API)
    if out is None:
        return False
    encoding = getattr(observer, "_encoding", None)
    try:
        out.write(text if encoding is None else text.encode(encoding))
        out.flush()
    except (OSError, ValueError, TypeError):
        return False
    return True


def worker_log_observer(index: int, out: IO[str] | None = None,
                        reactor: Any = None) -> FileLogObserver:
    """A worker process's log: classic lines marked ``[workerN ...]`` on stderr
    (with ``reactor``, flushed once per reactor turn: see :class:`FlushEachTurn`)."""
    import sys

    stream: Any = out or sys.stderr
    if reactor is not None:
        stream = FlushEachTurn(stream, reactor)
    return FileLogObserver(stream, classic_formatter(f"worker{index} "))
