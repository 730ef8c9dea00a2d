"""Metrics: a real MTA on loopback, real SMTP clients, and /metrics scraped over HTTP.

The metrics service is installed the way MTAService does it once configured
(a child service built by ``build_metrics``); each test stops it, which
removes its log observer and closes its port.
"""

from __future__ import annotations

import base64
import smtplib
import time
import urllib.request
from types import SimpleNamespace

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mta.daemon.metrics import Metrics, queue_id_time
from mta.daemon.service import build_metrics
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.store import QueueStore
from tests.harness import RawClient, in_thread, start_mta

pytestmark = pytest.mark.timeout(60)


# --- helpers ---------------------------------------------------------------------------


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """GET /metrics (blocking; run in a thread): content type and {(sample, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return content_type, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


async def scrape_until(port: int, ready, timeout: float = 5.0) -> tuple[str, dict]:
    """Scrape until ``ready(samples)`` (session events come when the server sees the close)."""
    deadline = time.monotonic() + timeout
    while True:
        content_type, samples = await in_thread(scrape, port)
        if ready(samples) or time.monotonic() > deadline:
            return content_type, samples
        await deferLater(reactor, 0.05, lambda: None)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def start_with_metrics(tmp_path, **kw):
    running = await start_mta(tmp_path, **kw)
    service = build_metrics(running.service, "tcp:0:interface=127.0.0.1")
    service.startService()
    await service.listening
    return running, service


async def stop_with_metrics(running, service):
    await service.stopService()
    await running.stop()


@pytest.fixture
def mta_metrics(tmp_path):
    running, service = pytest_twisted.blockon(
        Deferred.fromCoroutine(start_with_metrics(tmp_path)))
    yield running, service
    pytest_twisted.blockon(Deferred.fromCoroutine(stop_with_metrics(running, service)))


# --- the SMTP side, end to end ----------------------------------------------------------------


def send_with_rejected_recipient(port: int) -> str:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<nobody@example.test>")
        assert code == 550 and "5.1.1" in text, text
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: metrics\r\n\r\nhello\r\n.\r\n")
        code, text = c.read_reply()
        assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
        return text.split()[-1]
    finally:
        c.close()


def send_looping_message(port: int) -> None:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        received = b"".join(b"Received: from hop%d.test by hop%d.test; "
                            b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(60))
        c.send(received + b"Subject: loop\r\n\r\nround and round\r\n.\r\n")
        code, text = c.read_reply()
        assert code == 554 and "5.4.6" in text, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


def failed_auth(port: int) -> None:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls()
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.cmd("AUTH PLAIN " + plain("alice", "not the password"))
        assert code == 535, text
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_smtp_counters_after_message_rejections_and_failed_auth(mta_metrics):
    running, service = mta_metrics
    metrics_port = service.port.getHost().port

    queue_id = await in_thread(send_with_rejected_recipient, running.port("mx"))
    await in_thread(send_looping_message, running.port("mx"))
    await in_thread(failed_auth, running.port("submission"))

    content_type, s = await scrape_until(
        metrics_port, lambda s: total(s, "mta_smtp_sessions_total") >= 3)

    assert content_type.startswith("text/plain")
    # Connections, by listener kind (counted at the greeting).
    assert value(s, "mta_smtp_connections_total", kind="mx") == 2
    assert value(s, "mta_smtp_connections_total", kind="submission") == 1
    # Sessions ended, by TLS: only the submission one used STARTTLS.
    assert total(s, "mta_smtp_sessions_total") == 3
    assert total(s, "mta_smtp_sessions_total", tls="yes") == 1
    assert total(s, "mta_smtp_sessions_total", tls="no") == 2
    assert value(s, "mta_smtp_session_duration_seconds_count") == 3
    assert value(s, "mta_smtp_sessions_active") == 0
    # Replies by code, from the server's reply hook.
    assert value(s, "mta_smtp_replies_total", code="550", enhanced="5.1.1") == 1
    assert value(s, "mta_smtp_replies_total", code="554", enhanced="5.4.6") == 1
    assert value(s, "mta_smtp_replies_total", code="535", enhanced="5.7.8") == 1
    assert value(s, "mta_smtp_replies_total", code="221", enhanced="2.0.0") == 3
    assert value(s, "mta_smtp_replies_total", code="220", enhanced="none") == 3  # greetings
    # The accepted message, its size as stored in the queue.
    (envelope,) = running.queued()
    assert envelope.id == queue_id
    assert value(s, "mta_messages_accepted_total") == 1
    assert value(s, "mta_message_size_bytes_count") == 1
    assert value(s, "mta_message_size_bytes_sum") == envelope.size
    # The loop: a rejection with RFC 3463 X.4.6.
    assert total(s, "mta_smtp_rejections_total", enhanced="5.4.6") == 1
    assert value(s, "mta_loops_detected_total") == 1
    # AUTH.
    assert value(s, "mta_auth_total", result="failed") == 1
    assert value(s, "mta_auth_total", result="ok") == 0
    # The queue, read from the directory at scrape time.
    assert value(s, "mta_queue_messages") == 1
    assert 0 <= value(s, "mta_queue_oldest_age_seconds") < 60
    assert value(s, "mta_metrics_event_errors_total") == 0
    # Labels that come from the session and rejected events' fields.
    assert value(s, "mta_smtp_sessions_total", kind="mx", tls="no") == 2
    assert value(s, "mta_smtp_sessions_total", kind="submission", tls="yes") == 1
    assert value(s, "mta_smtp_rejections_total", stage="rcpt", enhanced="5.1.1") == 1
    assert value(s, "mta_smtp_rejections_total", stage="data", enhanced="5.4.6") == 1


@pytest_twisted.ensureDeferred
async def test_stopping_removes_the_observers_and_closes_the_port(tmp_path):
    running, service = await start_with_metrics(tmp_path)
    metrics = service.metrics
    context = running.context
    port = service.port.getHost().port
    try:
        assert context.observer is not None
        await service.stopService()
        assert context.observer is None
        Logger().info("a message after the metrics stopped", event="queued", size=10)
        assert metrics.registry.get_sample_value("mta_messages_accepted_total") == 0
        with pytest.raises(OSError):
            await in_thread(scrape, port)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_busy_metrics_port_is_logged_and_mail_goes_on(tmp_path):
    from twisted.internet.protocol import Factory
    from twisted.logger import globalLogPublisher

    busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    running = await start_mta(tmp_path)
    service = build_metrics(running.service, f"tcp:{busy.getHost().port}:interface=127.0.0.1")
    try:
        service.startService()
        await service.listening
        assert service.port is None
        assert any(e.get("log_format", "").startswith("cannot serve metrics") for e in events)
        queue_id = await in_thread(send_with_rejected_recipient, running.port("mx"))
        assert [e.id for e in running.queued()] == [queue_id]
    finally:
        globalLogPublisher.removeObserver(events.append)
        await service.stopService()
        await running.stop()
        await busy.stopListening()


@pytest_twisted.ensureDeferred
async def test_local_delivery_counted_with_latency(tmp_path):
    running, service = await start_with_metrics(tmp_path, runner=None)  # the real runner
    try:
        queue_id = await in_thread(send_with_rejected_recipient, running.port("mx"))
        _, s = await scrape_until(
            service.port.getHost().port,
            lambda s: total(s, "mta_deliveries_total") >= 1 and value(s, "mta_queue_messages") == 0)
    finally:
        await stop_with_metrics(running, service)
    assert value(s, "mta_deliveries_total", courier="local", outcome="delivered") == 1
    assert total(s, "mta_deliveries_total") == 1
    assert value(s, "mta_delivery_attempt_seconds_count", courier="local") == 1
    assert value(s, "mta_delivery_latency_seconds_count", courier="local", outcome="delivered") == 1
    # Queued and delivered within the test: well under a minute (whole seconds from the id).
    assert 0 <= value(s, "mta_delivery_latency_seconds_sum", courier="local",
                      outcome="delivered") < 60
    assert value(s, "mta_queue_messages") == 0
    assert value(s, "mta_queue_oldest_age_seconds") == 0
    mailbox = tmp_path / "var" / "mail"
    delivered = [p for p in mailbox.rglob("new/*") if p.is_file()]
    assert len(delivered) == 1 and queue_id.encode() in delivered[0].read_bytes()


# --- parts -----------------------------------------------------------------------------------


def test_queue_gauges_read_ids_only(tmp_path):
    now = [1_700_000_000.0]
    store = QueueStore(tmp_path / "queue", fsync=False, clock=lambda: now[0])
    for _ in range(3):
        writer = store.new_message()
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        rcpt = Recipient("alice@example.test", RecipientKind.LOCAL, "alice@example.test")
        writer.commit(Envelope(writer.id, "s@remote.test", [rcpt], now[0]))
        now[0] += 100
    # An unreadable envelope is still counted: nothing is parsed.
    store.envelope_path(store.ids()[-1]).write_text("not json")
    metrics = Metrics(store=store)
    now[0] = 1_700_000_000.0 + 1000
    assert metrics.registry.get_sample_value("mta_queue_messages") == 3
    assert metrics.registry.get_sample_value("mta_queue_oldest_age_seconds") == 1000
    assert queue_id_time(store.ids()[0]) == 1_700_000_000.0


class _Session:
    """An SMTP session as the reply hook sees it: its listener's kind."""

    def __init__(self, kind: str) -> None:
        self.listener = SimpleNamespace(kind=kind)


class _Connections:
    """The outbound connection cache as the metrics see it (OpenConnections)."""

    __slots__ = ("idle", "reused")

    def __init__(self, reused: int, idle: int) -> None:
        self.reused, self.idle = reused, idle

    def __len__(self) -> int:
        return self.idle


@pytest_twisted.ensureDeferred
async def test_metrics_served_from_only_the_sources_they_are_given(tmp_path):
    """The metrics service gets its sources, not the daemon: the queue listing,
    the sessions, the runner's in-flight count and the connection cache are read
    at scrape time, and its reply hook is chained on the slot it was given."""
    from mta.daemon.metrics import metrics_service

    store = QueueStore(tmp_path / "queue", fsync=False)
    writer = store.new_message()
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    writer.commit(Envelope(writer.id, "s@remote.test",
                           [Recipient("a@example.test", RecipientKind.LOCAL, "a@example.test")], 0.0))
    sessions = {"one", "two"}
    hook = SimpleNamespace(observer=None)
    deliveries = SimpleNamespace(in_flight=3)
    service = metrics_service(reactor, "tcp:0:interface=127.0.0.1", queue=store, sessions=sessions,
                              replies=hook, deliveries=deliveries, connections=_Connections(5, 2))
    service.startService()
    try:
        await service.listening
        assert hook.observer is not None
        hook.observer(_Session("mx"), SimpleNamespace(code=250, enhanced="2.1.0"))
        sessions.add("three")
        deliveries.in_flight = 1
        _, s = await in_thread(scrape, service.port.getHost().port)
    finally:
        await service.stopService()
    assert hook.observer is None  # the slot is left as it was found
    assert value(s, "mta_queue_messages") == 1
    assert value(s, "mta_smtp_sessions_active") == 3
    assert value(s, "mta_deliveries_in_flight") == 1
    assert value(s, "mta_outbound_connections_reused_total") == 5
    assert value(s, "mta_outbound_connections_idle") == 2
    assert value(s, "mta_smtp_replies_total", code="250", enhanced="2.1.0") == 1
    assert value(s, "mta_smtp_connections_total", kind="mx") == 1


def test_events_map_to_bounded_labels():
    m = Metrics()
    get = m.registry.get_sample_value
    m.observe_event({"event": "spf", "result": "fail"})
    m.observe_event({"event": "spf", "result": "something new"})
    m.observe_event({"event": "rejected", "stage": "rcpt", "enhanced": "5.4.6",
                     "reply": "550 5.4.6 Alias expansion loop"})
    m.observe_event({"event": "rejected", "reply": "552 5.3.4 Message size exceeds fixed maximum"})
    m.observe_event({"event": "delivery", "destination": "remote:example.org",
                     "outcome": "delivered", "duration": 0.5, "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384",
                     "queue_id": "65536000" + "a" * 12, "log_time": 0x65536000 + 42.0})
    m.observe_event({"event": "delivery", "destination": "remote:smarthost",
                     "outcome": "delivered", "duration": 0.1, "tls": "", "age": 7.0})
    m.observe_event({"event": "delivery", "destination": "weird", "outcome": "deferred"})
    m.observe_event({"event": "dsn", "action": "failed"})
    m.observe_event({"event": "bounce_dropped"})
    m.observe_event({"event": "session", "kind": "mx", "tls": "TLSv1.3", "duration": "n/a"})
    m.observe_event({"event": "limit", "limit": "early_talker"})
    assert get("mta_spf_results_total", {"result": "fail"}) == 1
    assert get("mta_spf_results_total", {"result": "other"}) == 1
    assert get("mta_smtp_rejections_total", {"stage": "rcpt", "enhanced": "5.4.6"}) == 1
    assert get("mta_smtp_rejections_total", {"stage": "unknown", "enhanced": "5.3.4"}) == 1
    assert get("mta_loops_detected_total") == 1
    assert get("mta_deliveries_total", {"courier": "remote", "outcome": "delivered"}) == 2
    assert get("mta_deliveries_total", {"courier": "other", "outcome": "deferred"}) == 1
    # Latency from the queue id's time when the event has no age, else the age.
    assert get("mta_delivery_latency_seconds_sum",
               {"courier": "remote", "outcome": "delivered"}) == 42 + 7
    assert get("mta_outbound_tls_total", {"tls": "yes"}) == 1
    assert get("mta_outbound_tls_total", {"tls": "no"}) == 1
    assert get("mta_notices_total", {"action": "failed"}) == 1
    assert get("mta_notices_total", {"action": "dropped"}) == 1
    assert get("mta_smtp_sessions_total", {"kind": "mx", "tls": "yes"}) == 1
    assert get("mta_smtp_session_duration_seconds_count") == 0  # "n/a" is not a number
    assert get("mta_limits_total", {"limit": "early_talker"}) == 1
    assert get("mta_metrics_event_errors_total") == 0


@pytest_twisted.ensureDeferred
async def test_mta_service_installs_metrics_and_json_log_from_config(tmp_path):
    import json

    log_path = tmp_path / "mta.jsonl"
    running = await start_mta(tmp_path, extra={"metrics": "tcp:0:interface=127.0.0.1",
                                               "log_json": str(log_path)})
    try:
        metrics = running.service.getServiceNamed("metrics")
        await metrics.listening
        await in_thread(send_with_rejected_recipient, running.port("mx"))
        _, s = await scrape_until(metrics.port.getHost().port,
                                  lambda s: total(s, "mta_smtp_sessions_total") >= 1)
    finally:
        await running.stop()
    assert value(s, "mta_smtp_sessions_total", kind="mx", tls="no") == 1
    assert value(s, "mta_messages_accepted_total") == 1
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines()]
    assert {"queued", "session", "rejected"} <= set(events)
    assert running.context.observer is None  # the reply hook went with the service


@pytest_twisted.ensureDeferred
async def test_outbound_connection_reuse_is_counted(tmp_path):
    from tests.sink import start_sink

    sink = await start_sink()
    running, service = await start_with_metrics(
        tmp_path, runner=None, extra={"relay_networks": ["127.0.0.0/8"], "delivery": {
            "smarthosts": [f"127.0.0.1:{sink.port}"], "smarthost_tls": "none"}})
    try:
        def relay(n: int) -> None:
            with smtplib.SMTP("127.0.0.1", running.port("mx"), timeout=10) as s:
                s.sendmail("s@example.test", [f"r{n}@remote.test"], f"Subject: {n}\r\n\r\nx\r\n")

        for n in range(2):  # one after the other: the second finds the first's connection
            await in_thread(relay, n)
            await scrape_until(service.port.getHost().port,
                               lambda s, n=n: total(s, "mta_deliveries_total") == n + 1)
        _, s = await scrape_until(service.port.getHost().port, lambda s: True)
    finally:
        await stop_with_metrics(running, service)
        await sink.stop()
    assert len(sink.messages) == 2 and len(sink.sessions) == 1
    assert value(s, "mta_outbound_connections_reused_total") == 1
    assert value(s, "mta_outbound_connections_idle") == 1
