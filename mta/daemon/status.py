"""The status page (issue 21): a read-only view of the running MTA over HTTP.

Served on ``[status] endpoint`` (off unless configured; a bare port listens on
127.0.0.1), by twisted.web, on a listener of its own.  ``GET /`` is the page
(server-rendered HTML, :mod:`mta.daemon.statuspage`); anything else is 404.

What it shows, and where each part comes from:

* the queue, read from the store at each request: messages by destination and
  by deferral reason in qshape's age buckets (:mod:`mta.queue.shape`, the same
  rows as ``mta queue list --summary``), and the oldest message.  At most
  :data:`MAX_SCAN` envelopes are read per request (the page says so when the
  queue is larger: the counts are then of the oldest ones);
* the held (quarantined) messages (issue 17's hold queue): those of the
  runner's held set (``held()``, :attr:`mta.queue.runner.QueueRunner.held`) and
  any other envelope read with a hold (a worker's), at most :data:`MAX_HELD`,
  oldest first, each with its sender, recipients, why it is held
  (``Envelope.hold``) and its age;
* recent deliveries and failures with their replies, the TLS outcome per
  destination, and the throughput of the last hour: kept in memory by
  :class:`StatusRecorder`, a log observer fed by the ``queued``, ``delivery``
  and ``expired`` events (:mod:`mta.daemon.logs`), in bounded rings (the last
  :data:`MAX_RECENT` of each; :data:`MAX_TLS_DESTINATIONS` destinations; one
  bucket per minute for :data:`MINUTES` minutes).  They start empty at each
  start of the daemon.  With ``workers > 1`` the ``queued`` events are logged
  by the workers, so "received" counts only the main process's own.

Security: when a ``token`` or ``password`` is configured (required at load
unless the endpoint is loopback-only), every request must carry
``Authorization: Bearer <token>`` or HTTP Basic (RFC 7617) ``user:password``,
compared in constant time (:func:`hmac.compare_digest`); otherwise 401 with
``WWW-Authenticate`` (RFC 9110 §11.6.1).  The credentials are read from the
running configuration (a reload changes them) and never logged; no access log
is written.  Every value that came from mail is HTML-escaped, and the page is
sent with a Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request

from mta.config import StatusConfig
from mta.daemon.logs import EventObserver, event_name
from mta.daemon.statuspage import SERIES, Note, Snapshot, TLSCount, render
from mta.daemon.web import QuietSite, WebListener
from mta.queue.envelope import Envelope
from mta.queue.shape import Row, deferral_reasons, destinations, summary

log = Logger()

MINUTES = 60  # the throughput charts: one bucket per minute
MAX_RECENT = 50  # deliveries, and failures, remembered
MAX_TLS_DESTINATIONS = 500
MAX_SCAN = 5000  # envelopes read per request
MAX_ROWS = 50  # rows of each queue table (then one "other" row)
MAX_TEXT = 500  # characters of a reply or an address kept
MAX_HELD = 100  # held messages listed


def _text(value: Any) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


class Throughput:
    """Counts per minute for the last ``minutes`` minutes (a ring of buckets)."""

    def __init__(self, minutes: int = MINUTES) -> None:
        self.minutes = minutes
        self._stamp = [-1] * minutes  # the minute each bucket holds
        self._counts = [[0] * len(SERIES) for _ in range(minutes)]

    def add(self, now: float, series: int, n: int = 1) -> None:
        minute = int(now // 60)
        i = minute % self.minutes
        if self._stamp[i] != minute:
            self._stamp[i] = minute
            self._counts[i] = [0] * len(SERIES)
        self._counts[i][series] += n

    def last_hour(self, now: float) -> list[tuple[float, list[int]]]:
        """``(minute start, counts by SERIES)`` oldest first, ending with the current minute."""
        current = int(now // 60)
        out = []
        for minute in range(current - self.minutes + 1, current + 1):
            i = minute % self.minutes
            counts = list(self._counts[i]) if self._stamp[i] == minute else [0] * len(SERIES)
            out.append((minute * 60.0, counts))
        return out


class StatusRecorder(EventObserver):
    """The page's memory of recent events: a twisted.logger observer that never raises."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.deliveries: deque[Note] = deque(maxlen=MAX_RECENT)
        self.failures: deque[Note] = deque(maxlen=MAX_RECENT)
        self.tls: OrderedDict[str, TLSCount] = OrderedDict()
        self.throughput = Throughput()
        self.errors = 0

    def observe_event(self, event: Mapping[str, Any]) -> None:
        name = event_name(event)
        if name not in ("queued", "delivery", "expired"):
            return
        try:
            now = self.clock()
            if name == "queued":
                self.throughput.add(now, 0)
            elif name == "delivery":
                self._delivery(event, now)
            else:
                self.throughput.add(now, 3)
                self.failures.appendleft(self._note(event, now, "expired"))
        except Exception:
            self.errors += 1  # logging from inside a log observer would recurse

    def _note(self, event: Mapping[str, Any], now: float, outcome: str) -> Note:
        return Note(now, _text(event.get("queue_id")), _text(event.get("recipient")),
                    _text(event.get("destination")), outcome, _text(event.get("reply")),
                    _text(event.get("remote_mta")), _text(event.get("tls")))

    def _delivery(self, event: Mapping[str, Any], now: float) -> None:
        outcome = event.get("outcome")
        if outcome == "delivered":
            self.throughput.add(now, 1)
            note = self._note(event, now, "delivered")
            self.deliveries.appendleft(note)
            if note.destination.startswith("remote"):
                self._count_tls(note.destination, note.tls, event.get("tls_verified") is True)
        elif outcome == "deferred":
            self.throughput.add(now, 2)
        elif outcome == "failed":
            self.throughput.add(now, 3)
            self.failures.appendleft(self._note(event, now, "failed"))

    def _count_tls(self, destination: str, tls: str, verified: bool) -> None:
        count = self.tls.get(destination)
        if count is None:
            if len(self.tls) >= MAX_TLS_DESTINATIONS:
                self.tls.popitem(last=False)  # the destination least recently delivered to
            count = self.tls[destination] = TLSCount()
        else:
            self.tls.move_to_end(destination)
        if not tls:
            count.clear += 1
        elif verified:
            count.verified += 1
        else:
            count.encrypted += 1
        count.last = tls


# --- what the page shows -------------------------------------------------------------------


class QueueReader(Protocol):
    """What the page reads of the queue store (:class:`mta.queue.store.QueueStore`)."""

    def ids(self) -> list[str]:
        """The queued messages' ids, oldest first."""

    def load(self, queue_id: str) -> Envelope:
        """The envelope; FileNotFoundError once gone, ValueError etc. if unreadable."""


def _capped(rows: list[Row]) -> list[Row]:
    """The TOTAL row and the first MAX_ROWS others; the rest summed into one row."""
    if len(rows) <= MAX_ROWS + 1:
        return rows
    rest = rows[MAX_ROWS + 1:]
    counts = [sum(col) for col in zip(*(c for _, _, c in rest), strict=True)]
    return rows[:MAX_ROWS + 1] + [(f"({len(rest)} more)", sum(counts), counts)]


def _held(queue: QueueReader, envelopes: list[Envelope], held_ids: Collection[str]) -> \
        tuple[list[Envelope], int]:
    """The held envelopes (at most MAX_HELD, oldest first) and how many are held:
    those read with a hold, and the ``held_ids`` not among them (past MAX_SCAN)."""
    found = {e.id: e for e in envelopes if e.hold}
    missing = [i for i in held_ids if i not in found]
    total = len(found) + len(missing)
    for queue_id in sorted(missing)[:max(0, MAX_HELD - len(found))]:
        try:
            env = queue.load(queue_id)
        except (OSError, ValueError, KeyError, TypeError):
            total -= 1  # released, deleted or unreadable meanwhile
            continue
        if env.hold:
            found[env.id] = env
        else:
            total -= 1
    held = sorted(found.values(), key=lambda e: e.created)[:MAX_HELD]
    return held, total


def snapshot(hostname: str, queue: QueueReader, recorder: StatusRecorder, now: float,
             held_ids: Collection[str] = ()) -> Snapshot:
    ids = queue.ids()
    envelopes: list[Envelope] = []
    unreadable = 0
    for queue_id in ids[:MAX_SCAN]:
        try:
            envelopes.append(queue.load(queue_id))
        except FileNotFoundError:
            continue  # delivered meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            unreadable += 1
    notes = []
    if len(ids) > MAX_SCAN:
        notes.append(f"The queue holds {len(ids)} messages; the tables count the oldest "
                     f"{MAX_SCAN}.")
    if recorder.errors:
        notes.append(f"{recorder.errors} log events could not be read.")
    held, held_total = _held(queue, envelopes, held_ids)
    return Snapshot(
        hostname=hostname, now=now, queued=len(ids), scanned=len(envelopes),
        unreadable=unreadable,
        by_destination=_capped(summary(envelopes, now, destinations)),
        by_reason=_capped(summary(envelopes, now, deferral_reasons)),
        oldest=min(envelopes, key=lambda e: e.created, default=None),
        deliveries=list(recorder.deliveries), failures=list(recorder.failures),
        tls=sorted(recorder.tls.items()), throughput=recorder.throughput.last_hour(now),
        notes=notes, held=held, held_total=held_total)


# --- HTTP ----------------------------------------------------------------------------------


def authorized(settings: StatusConfig, header: bytes | None) -> bool:
    """Whether an ``Authorization`` header value passes ``settings`` (always, when
    neither a token nor a password is set).  Constant-time comparisons."""
    if settings.token is None and settings.password is None:
        return True
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(b" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == b"bearer" and settings.token is not None:
        return hmac.compare_digest(credentials, settings.token.encode("ascii"))
    if scheme == b"basic" and settings.password is not None:
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return False
        user, colon, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(user, settings.user.encode("ascii"))
        password_ok = hmac.compare_digest(password, settings.password.encode("ascii"))
        return bool(colon) and user_ok & password_ok
    return False


SECURITY_HEADERS = (
    # No script may run on the page, even if something escaped escaping.
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


class StatusResource(Resource):
    """``GET /``: the page; ``settings()`` gives the running ``[status]``."""

    isLeaf = True

    def __init__(self, settings: Callable[[], StatusConfig],
                 page: Callable[[], str]) -> None:
        super().__init__()
        self.settings = settings
        self.page = page

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        settings = self.settings()
        if not authorized(settings, request.getHeader(b"authorization")):
            request.setResponseCode(401)
            challenges = []
            if settings.password is not None:
                challenges.append(b'Basic realm="mta status", charset="UTF-8"')
            if settings.token is not None:
                challenges.append(b'Bearer realm="mta status"')
            request.setHeader(b"www-authenticate", b", ".join(challenges))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"authentication required\n"
        if request.path != b"/":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.page().encode("utf-8")

    def render_HEAD(self, request: Request) -> bytes:  # noqa: N802
        return self.render_GET(request)



class StatusService(WebListener):
    """While running: the recorder observes the log and ``endpoint`` serves the page.

    Failing to listen is logged and does not stop the MTA (as the metrics).
    """

    what = "the status page"

    def __init__(self, reactor: Any, endpoint: str, recorder: StatusRecorder,
                 resource: StatusResource, publisher: LogPublisher = globalLogPublisher) -> None:
        super().__init__(reactor, endpoint)
        self.recorder = recorder
        self.resource = resource
        self.publisher = publisher

    def factory(self) -> Any:
        return QuietSite(self.resource)

    def listening_on(self, address: Any) -> None:
        log.info("status page on http://{host}:{port}/", host=getattr(address, "host", address),
                 port=getattr(address, "port", ""))

    def startService(self) -> None:  # noqa: N802
        self.recorder.install(self.publisher)
        super().startService()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        self.recorder.uninstall()
        return super().stopService()


def status_service(reactor: Any, endpoint: str, *, queue: QueueReader,
                   settings: Callable[[], StatusConfig], hostname: Callable[[], str],
                   clock: Callable[[], float],
                   held: Callable[[], Collection[str]] = tuple) -> StatusService:
    """The status page on ``endpoint``, reading the ``queue``, the ids of the held
    messages (``held()``) and the running ``settings()`` and ``hostname()`` at each
    request; ``clock()`` is the time."""
    recorder = StatusRecorder(clock)

    def page() -> str:
        return render(snapshot(hostname(), queue, recorder, clock(), list(held())))

    return StatusService(reactor, endpoint, recorder, StatusResource(settings, page))
