"""Prometheus metrics for the MTA, served over HTTP at ``/metrics``.

The counters are fed from two places, so the server and the queue runner
never import this module:

* the structured log events (see :mod:`mta.daemon.logs` for the schema): a log
  observer on the global publisher looks at each event's ``event`` key;
* the SMTP server's reply hook, ``ServerContext.observer(session, reply)``,
  called for every reply the server sends.

The queue's size and the age of its oldest message are read at scrape time
from the queue directory's listing: queue ids begin with the creation time
in hex seconds (:func:`mta.queue.store.new_queue_id`), so no envelope is read.

Label values that come from events are checked against the known sets (a
missing value is counted as ``unknown``, anything else as ``other``), so a
label can never grow without bound.

Metrics (all in one dedicated :class:`CollectorRegistry`)::

    mta_smtp_connections_total{kind}            connections, at the first reply
    mta_smtp_sessions_total{kind,tls}           sessions ended; tls="yes"/"no" (TLS in)
    mta_smtp_session_duration_seconds           histogram
    mta_smtp_sessions_active                    gauge, at scrape time
    mta_smtp_replies_total{code,enhanced}       every reply sent
    mta_smtp_rejections_total{stage,enhanced}   refused transaction steps
    mta_messages_accepted_total                 messages queued
    mta_message_size_bytes                      histogram
    mta_loops_detected_total                    rejections with X.4.6 (RFC 3463 routing loop)
    mta_auth_total{result}                      AUTH ok / failed
    mta_spf_results_total{result}               SPF results (RFC 7208 §2.6)
    mta_limits_total{limit}                     abuse limits hit
    mta_deliveries_total{courier,outcome}       delivery attempts per recipient
    mta_delivery_attempt_seconds{courier}       histogram: one attempt
    mta_delivery_latency_seconds{courier,outcome}  histogram: queued → final result
    mta_outbound_tls_total{tls}                 delivered remote recipients by TLS (TLS out)
    mta_outbound_tls_policy_total{policy,source,result}  new outbound sessions by TLS policy,
                                                where it came from and the outcome
                                                (mta.delivery.tlsoutcome)
    mta_expired_total                           recipients expired in the queue
    mta_notices_total{action}                   bounces / delay notices queued, dropped
    mta_queue_messages                          gauge, at scrape time
    mta_queue_oldest_age_seconds                gauge, at scrape time
    mta_deliveries_in_flight                    gauge: messages with a pass running
    mta_outbound_connections_idle               gauge: connections kept open for reuse
    mta_outbound_connections_reused_total       deliveries that reused an open connection
    mta_metrics_event_errors_total              events this module could not read
    mta_check_verdicts_total{check,result}      each check's verdicts (mta.smtp.pipeline), at scrape time
    mta_queue_held_messages                     gauge: messages in the hold queue, at scrape time
    mta_messages_held_total                     messages put in the hold queue (event "held")
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any, Protocol
from weakref import WeakSet

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mta.daemon.logs import EventObserver, event_name
from mta.daemon.web import QuietSite, WebListener

log = Logger()

LISTENER_KINDS = frozenset({"mx", "submission", "submissions"})
COURIERS = frozenset({"local", "pipe", "remote"})
OUTCOMES = frozenset({"delivered", "deferred", "failed"})
FINAL_OUTCOMES = frozenset({"delivered", "failed"})
STAGES = frozenset({"connect", "mail", "rcpt", "data"})
# RFC 7208 §2.6 result names.
SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
AUTH_RESULTS = frozenset({"ok", "failed", "unavailable"})
# The directory's events (mta.policy.sqldirectory): a lookup the database did not
# answer, its return, rows ignored (a pipe without allow_pipes, a bad target).
DIRECTORY_RESULTS = frozenset({"unavailable", "recovered", "pipe_refused", "bad_row"})
LIMITS = frozenset({"connection_rate", "early_talker", "user_messages"})
COUNTER_BACKENDS = frozenset({"redis"})  # issue 20
NOTICE_ACTIONS = frozenset({"failed", "delayed"})
# The tls_outcome event's values (mta.delivery.tlsoutcome, mta.delivery.routes).
TLS_LEVELS = frozenset({"none", "may", "encrypt", "verify", "dane", "mta-sts"})
TLS_SOURCES = frozenset({"table", "relay", "default", "dane", "mta-sts"})
TLS_RESULTS = frozenset({"verified", "encrypted", "cleartext", "starttls-not-supported",
                         "certificate-host-mismatch", "certificate-expired",
                         "certificate-not-trusted", "validation-failure", "tlsa-invalid",
                         "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
                         "sts-policy-invalid", "sts-webpki-invalid"})
# RFC 3463 §2: class.subject.detail.
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_ENHANCED_IN_REPLY = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})(?: |$)")

SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8)
SESSION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LATENCY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600,
                   12 * 3600, 86400, 5 * 86400)


def _label(value: Any, allowed: frozenset[str]) -> str:
    """``value`` if it is one of ``allowed``; "unknown" when missing, else "other"."""
    if value is None or value == "":
        return "unknown"
    return value if isinstance(value, str) and value in allowed else "other"


def _enhanced(event: Mapping[str, Any]) -> str:
    """The RFC 3463 code of a rejection: the ``enhanced`` field or the start of ``reply``."""
    code = event.get("enhanced")
    if isinstance(code, str) and _ENHANCED.match(code):
        return code
    reply = event.get("reply")
    if isinstance(reply, str):
        m = _ENHANCED_IN_REPLY.match(reply)
        if m:
            return m.group(1)
    return "none"


def _yes_no(tls: Any) -> str:
    return "no" if tls in (None, "", "no", False) else "yes"


def queue_id_time(queue_id: str) -> float | None:
    """The creation time (epoch seconds) encoded at the start of a queue id, or None."""
    try:
        return float(int(queue_id[:8], 16))
    except (ValueError, TypeError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class QueueListing(Protocol):
    """What the metrics read of the queue store (:class:`mta.queue.store.QueueStore`)."""

    def ids(self) -> list[str]:
        """The queued messages' ids, oldest first."""


class ReplyHook(Protocol):
    """Where the SMTP server calls ``observer(session, reply)`` for every reply it
    sends (:class:`mta.smtp.server.ServerContext`); None: no hook."""

    observer: Callable[[Any, Any], None] | None


class QueueCollector:
    """Gauges read at scrape time: queue size and oldest age, sessions, deliveries in flight.

    Each source may be None.
    """

    def __init__(self, store: QueueListing | None = None, clock: Callable[[], float] = time.time,
                 active_sessions: Callable[[], int] | None = None,
                 in_flight: Callable[[], int] | None = None,
                 outbound: Callable[[], tuple[int, int]] | None = None,
                 verdicts: Callable[[], Mapping[tuple[str, str], int]] | None = None,
                 held: Callable[[], int] | None = None) -> None:
        self.store = store
        self.verdicts = verdicts  # issue 17: (check, result) -> count
        self.held = held  # issue 17: messages in the hold queue
        self.clock = clock
        self.active_sessions = active_sessions
        self.in_flight = in_flight
        self.outbound = outbound  # (connections reused so far, idle now)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.store is not None:
            ids = self.store.ids()
            yield GaugeMetricFamily("mta_queue_messages", "Messages in the queue.", value=len(ids))
            created = [t for t in map(queue_id_time, ids[:1]) if t is not None]
            age = max(0.0, self.clock() - created[0]) if created else 0.0
            yield GaugeMetricFamily("mta_queue_oldest_age_seconds",
                                    "Age of the oldest message in the queue (0 when empty).",
                                    value=age)
        if self.active_sessions is not None:
            yield GaugeMetricFamily("mta_smtp_sessions_active", "SMTP sessions open now.",
                                    value=self.active_sessions())
        if self.in_flight is not None:
            yield GaugeMetricFamily("mta_deliveries_in_flight",
                                    "Messages with a delivery pass running.",
                                    value=self.in_flight())
        if self.outbound is not None:
            reused, idle = self.outbound()
            yield GaugeMetricFamily("mta_outbound_connections_idle",
                                    "Outbound SMTP connections kept open for the next message.",
                                    value=idle)
            yield CounterMetricFamily("mta_outbound_connections_reused",
                                      "Deliveries that went over an already open connection.",
                                      value=reused)
        if self.held is not None:
            yield GaugeMetricFamily("mta_queue_held_messages",
                                    "Messages in the hold (quarantine) queue.", value=self.held())
        if self.verdicts is not None:
            family = CounterMetricFamily("mta_check_verdicts", "Verdicts of the SMTP session's "
                                         "checks, by check and result.", labels=["check", "result"])
            for (check, result), n in sorted(self.verdicts().items()):
                family.add_metric([check, result], n)
            yield family

    def describe(self) -> list[Any]:
        return []  # values are only known at scrape time


class Metrics(EventObserver):
    """All the MTA's metrics; feed it with :meth:`observe_event` and :meth:`observe_reply`."""

    def __init__(self, store: QueueListing | None = None, clock: Callable[[], float] | None = None,
                 active_sessions: Callable[[], int] | None = None,
                 in_flight: Callable[[], int] | None = None,
                 registry: CollectorRegistry | None = None,
                 outbound: Callable[[], tuple[int, int]] | None = None,
                 verdicts: Callable[[], Mapping[tuple[str, str], int]] | None = None,
                 held: Callable[[], int] | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if clock is None:
            clock = getattr(store, "clock", None) or time.time
        self.clock = clock
        self._seen_sessions: WeakSet[Any] = WeakSet()
        r = self.registry
        # --- SMTP in
        self.connections = Counter("mta_smtp_connections", "SMTP connections, by listener kind.",
                                   ["kind"], registry=r)
        self.sessions = Counter("mta_smtp_sessions", "SMTP sessions ended, by listener kind and "
                                "whether TLS was used.", ["kind", "tls"], registry=r)
        self.session_duration = Histogram("mta_smtp_session_duration_seconds",
                                          "Length of SMTP sessions.", buckets=SESSION_BUCKETS,
                                          registry=r)
        self.replies = Counter("mta_smtp_replies", "Replies sent by the SMTP server.",
                               ["code", "enhanced"], registry=r)
        self.rejections = Counter("mta_smtp_rejections", "Refused steps of mail transactions, "
                                  "by stage and RFC 3463 code.", ["stage", "enhanced"], registry=r)
        self.accepted = Counter("mta_messages_accepted", "Messages accepted into the queue.",
                                registry=r)
        self.message_size = Histogram("mta_message_size_bytes", "Size of accepted messages.",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.loops = Counter("mta_loops_detected", "Mail loops detected (RFC 3463 X.4.6).",
                             registry=r)
        self.auth = Counter("mta_auth", "AUTH attempts by result.", ["result"], registry=r)
        self.spf = Counter("mta_spf_results", "SPF check results.", ["result"], registry=r)
        self.limits = Counter("mta_limits", "Abuse limits hit.", ["limit"], registry=r)
        # --- delivery
        self.deliveries = Counter("mta_deliveries", "Delivery attempts per recipient, by courier "
                                  "and outcome.", ["courier", "outcome"], registry=r)
        self.attempt_seconds = Histogram("mta_delivery_attempt_seconds",
                                         "Time one delivery attempt took.", ["courier"],
                                         buckets=ATTEMPT_BUCKETS, registry=r)
        self.latency = Histogram("mta_delivery_latency_seconds", "Time from queueing to the "
                                 "final result.", ["courier", "outcome"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.outbound_tls = Counter("mta_outbound_tls", "Recipients delivered to remote servers, "
                                    "by whether the connection used TLS.", ["tls"], registry=r)
        self.tls_policy = Counter("mta_outbound_tls_policy", "New outbound sessions by TLS "
                                  "policy, its source and the outcome.",
                                  ["policy", "source", "result"], registry=r)
        self.expired = Counter("mta_expired", "Recipients that expired in the queue.", registry=r)
        self.notices = Counter("mta_notices", "Bounces and delay notices queued, or dropped "
                               "(null sender).", ["action"], registry=r)
        self.directory = Counter("mta_directory_events", "SQL directory events: lookups the "
                                 "database did not answer, recoveries, ignored rows.",
                                 ["result"], registry=r)
        self.event_errors = Counter("mta_metrics_event_errors", "Log events that could not be "
                                    "read for metrics.", registry=r)
        # --- shared abuse counters (issue 20): made at the first "counters" event, so a
        # node without [counters] backend = "redis" exports neither.
        self.counters_up: Gauge | None = None
        self.counters_outages: Counter | None = None
        self.held_total = Counter("mta_messages_held", "Messages put in the hold (quarantine) "
                                  "queue.", registry=r)
        self.collector = QueueCollector(store, self.clock, active_sessions, in_flight, outbound,
                                        verdicts, held)
        r.register(self.collector)
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "session": self._on_session,
            "auth": self._on_auth,
            "spf": self._on_spf,
            "rejected": self._on_rejected,
            "rejected_summary": self._on_rejected_summary,
            "queued": self._on_queued,
            "limit": self._on_limit,
            "delivery": self._on_delivery,
            "expired": self._on_expired,
            "dsn": self._on_dsn,
            "bounce_dropped": self._on_bounce_dropped,
            "directory": self._on_directory,
            "tls_outcome": self._on_tls_outcome,
            "held": lambda event: self.held_total.inc(),
            "counters": self._on_counters,  # issue 20
        }

    # --- feeding ------------------------------------------------------------------

    def observe_event(self, event: Mapping[str, Any]) -> None:
        """A twisted.logger observer: count the events this module knows. Never raises."""
        name = event_name(event)
        handler = self._handlers.get(name) if name is not None else None
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            # Logging from inside a log observer would recurse: count it instead.
            self.event_errors.inc()

    def observe_reply(self, session: Any, reply: Any) -> None:
        """The ``ServerContext.observer`` hook: every reply the SMTP server sends."""
        if session not in self._seen_sessions:
            self._seen_sessions.add(session)
            kind = getattr(getattr(session, "listener", None), "kind", None)
            self.connections.labels(kind=_label(kind, LISTENER_KINDS)).inc()
        enhanced = reply.enhanced if _ENHANCED.match(reply.enhanced or "") else "none"
        self.replies.labels(code=str(reply.code), enhanced=enhanced).inc()

    # --- SMTP events ---------------------------------------------------------------

    def _on_session(self, event: Mapping[str, Any]) -> None:
        kind = _label(event.get("kind"), LISTENER_KINDS)
        self.sessions.labels(kind=kind, tls=_yes_no(event.get("tls"))).inc()
        duration = _number(event.get("duration"))
        if duration is not None:
            self.session_duration.observe(max(0.0, duration))

    def _on_auth(self, event: Mapping[str, Any]) -> None:
        self.auth.labels(result=_label(event.get("result"), AUTH_RESULTS)).inc()

    def _on_spf(self, event: Mapping[str, Any]) -> None:
        self.spf.labels(result=_label(event.get("result"), SPF_RESULTS)).inc()

    def _on_rejected(self, event: Mapping[str, Any]) -> None:
        enhanced = _enhanced(event)
        self.rejections.labels(stage=_label(event.get("stage"), STAGES), enhanced=enhanced).inc()
        if enhanced[1:] == ".4.6":  # RFC 3463: X.4.6 routing loop detected
            self.loops.inc()

    def _on_rejected_summary(self, event: Mapping[str, Any]) -> None:
        # The refusals a session did not log one by one, by RFC 3463 code.
        statuses = event.get("statuses")
        for enhanced, count in (statuses.items() if isinstance(statuses, Mapping) else ()):
            n = _number(count)
            if n is not None and n > 0:
                self.rejections.labels(stage=_label(event.get("stage"), STAGES),
                                       enhanced=_enhanced({"enhanced": enhanced})).inc(n)

    def _on_queued(self, event: Mapping[str, Any]) -> None:
        self.accepted.inc()
        size = _number(event.get("size"))
        if size is not None:
            self.message_size.observe(size)

    def _on_counters(self, event: Mapping[str, Any]) -> None:
        if self.counters_up is None or self.counters_outages is None:
            self.counters_up = Gauge("mta_counters_backend_up", "1 while the shared abuse "
                                     "counters' back end answers, 0 while the node counts "
                                     "locally.", ["backend"], registry=self.registry)
            self.counters_outages = Counter("mta_counters_backend_outages", "Times the shared "
                                            "abuse counters' back end went down (fallback to "
                                            "local).", ["backend"], registry=self.registry)
        backend = _label(event.get("backend"), COUNTER_BACKENDS)
        state = event.get("state")
        if state == "down":
            self.counters_up.labels(backend=backend).set(0)
            self.counters_outages.labels(backend=backend).inc()
        elif state in ("up", "back"):
            self.counters_up.labels(backend=backend).set(1)

    def _on_limit(self, event: Mapping[str, Any]) -> None:
        self.limits.labels(limit=_label(event.get("limit"), LIMITS)).inc()

    def _on_directory(self, event: Mapping[str, Any]) -> None:
        self.directory.labels(result=_label(event.get("result"), DIRECTORY_RESULTS)).inc()

    # --- delivery events -----------------------------------------------------------

    def _on_delivery(self, event: Mapping[str, Any]) -> None:
        destination = event.get("destination")
        courier = destination.partition(":")[0] if isinstance(destination, str) else None
        courier = _label(courier, COURIERS)
        outcome = _label(event.get("outcome"), OUTCOMES)
        self.deliveries.labels(courier=courier, outcome=outcome).inc()
        duration = _number(event.get("duration"))
        if duration is not None:
            self.attempt_seconds.labels(courier=courier).observe(max(0.0, duration))
        if outcome in FINAL_OUTCOMES:
            age = self._age(event)
            if age is not None:
                self.latency.labels(courier=courier, outcome=outcome).observe(age)
        if courier == "remote" and outcome == "delivered" and "tls" in event:
            self.outbound_tls.labels(tls=_yes_no(event.get("tls"))).inc()

    def _age(self, event: Mapping[str, Any]) -> float | None:
        """Seconds since queueing: the ``age`` field, else from the queue id's time."""
        age = _number(event.get("age"))
        if age is None:
            queue_id = event.get("queue_id")
            created = queue_id_time(queue_id) if isinstance(queue_id, str) else None
            now = _number(event.get("log_time"))
            if created is None or now is None:
                return None
            age = now - created
        return max(0.0, age)

    def _on_expired(self, event: Mapping[str, Any]) -> None:
        self.expired.inc()

    def _on_dsn(self, event: Mapping[str, Any]) -> None:
        self.notices.labels(action=_label(event.get("action"), NOTICE_ACTIONS)).inc()

    def _on_bounce_dropped(self, event: Mapping[str, Any]) -> None:
        self.notices.labels(action="dropped").inc()

    def _on_tls_outcome(self, event: Mapping[str, Any]) -> None:
        self.tls_policy.labels(policy=_label(event.get("policy"), TLS_LEVELS),
                               source=_label(event.get("source"), TLS_SOURCES),
                               result=_label(event.get("result"), TLS_RESULTS)).inc()


# --- HTTP -------------------------------------------------------------------------------


class MetricsResource(Resource):
    """``GET /metrics``: the registry in the Prometheus (or OpenMetrics) text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


def metrics_site(registry: CollectorRegistry) -> Site:
    """``/metrics``, with no access-log line for every scrape."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return QuietSite(root)


class MetricsService(WebListener):
    """Counts while running and serves ``/metrics`` on ``endpoint``.

    On start: the log observer goes on ``publisher``, the reply hook on
    ``context`` (chained after any hook already there), and the endpoint
    listens.  On stop all three are undone.  Failing to listen is logged and
    does not stop the MTA: mail matters more than metrics.
    """

    what = "metrics"

    def __init__(self, metrics: Metrics, endpoint: IStreamServerEndpoint,
                 context: ReplyHook | None = None,
                 publisher: LogPublisher = globalLogPublisher) -> None:
        super().__init__(None, endpoint)
        self.metrics = metrics
        self.context = context
        self.publisher = publisher
        self._previous_hook: Any = None
        self._hook: Any = None

    def factory(self) -> Any:
        return metrics_site(self.metrics.registry)

    def listening_on(self, address: Any) -> None:
        log.info("metrics on http://{host}:{port}/metrics", host=address.host, port=address.port)

    def startService(self) -> None:  # noqa: N802
        self.metrics.install(self.publisher)
        if self.context is not None:
            self._previous_hook = previous = self.context.observer
            observe = self.metrics.observe_reply
            if previous is None:
                self._hook = observe
            else:
                def both(session: Any, reply: Any) -> None:
                    previous(session, reply)
                    observe(session, reply)
                self._hook = both
            self.context.observer = self._hook
        super().startService()

    def stopService(self) -> Deferred[None]:  # noqa: N802
        self.metrics.uninstall()
        if self.context is not None and self.context.observer is self._hook:
            self.context.observer = self._previous_hook
        self._hook = self._previous_hook = None
        return super().stopService()


class Deliveries(Protocol):
    """What the metrics read of the queue runner (:class:`mta.queue.runner.QueueRunner`)."""

    @property
    def in_flight(self) -> int: ...


class OpenConnections(Protocol):
    """What the metrics read of the outbound connection cache
    (:class:`mta.delivery.cache.ConnectionCache`)."""

    reused: int

    def __len__(self) -> int: ...


class Checks(Protocol):
    """What the metrics read of the check pipeline's counts (:class:`mta.smtp.state.ServerContext`,
    whose ``pipeline`` a reload replaces)."""

    pipeline: Any  # mta.smtp.pipeline.Pipeline: verdict_counts()


def metrics_service(reactor: Any, endpoint: str, *, queue: QueueListing, sessions: Sized,
                    replies: ReplyHook, deliveries: Deliveries | None = None,
                    connections: OpenConnections | None = None,
                    checks: Checks | None = None) -> IService:
    """The metrics service on ``endpoint`` (a Twisted server endpoint string such
    as ``tcp:9125:interface=127.0.0.1``), reading at scrape time the ``queue``
    listing, the open SMTP ``sessions``, the runner's ``deliveries`` in flight
    and the outbound ``connections`` kept open (each None when there is none),
    and counting every reply through the ``replies`` hook."""

    def in_flight() -> int:
        return deliveries.in_flight if deliveries is not None else 0

    def outbound() -> tuple[int, int]:
        return (connections.reused, len(connections)) if connections is not None else (0, 0)

    def verdicts() -> Mapping[tuple[str, str], int]:
        return checks.pipeline.verdict_counts() if checks is not None else {}

    def held() -> int:
        return getattr(deliveries, "held_count", 0) if deliveries is not None else 0

    metrics = Metrics(store=queue, active_sessions=lambda: len(sessions),
                      in_flight=in_flight, outbound=outbound,
                      verdicts=verdicts if checks is not None else None,
                      held=held if deliveries is not None else None)
    return MetricsService(metrics, serverFromString(reactor, endpoint), context=replies)
