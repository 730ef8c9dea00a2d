"""Structured logs: JSON lines that parse back, secrets never written, the server's events.

Unit tests log through a private publisher; the end-to-end test runs a real
MTA with the JSON log service on the global publisher and stops it (which
removes the observer) before reading the file.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import (
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatTime,
    globalLogPublisher,
    textFileLogObserver,
)

import mta.daemon.logs as logs_module
from mta.daemon.logs import (
    FlushEachTurn,
    JSONLinesObserver,
    Scrubbing,
    classic_formatter,
    event_as_json,
    install_scrubber,
    json_file_observer,
    json_log_service,
    remove_scrubber,
    scrub,
    worker_log_observer,
)
from mta.queue.layout import load_envelope
from tests.harness import PASSWORD, RawClient, in_thread, start_mta

pytestmark = pytest.mark.timeout(60)

SECRETS = ("hunter2-the-secret", "smarthost-s3cret", "bearer-tok-123", "api-key-xyz")


def read_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def log_everything(log: Logger) -> None:
    log.info(
        "queued {queue_id} size={size} to={rcpts}",
        event="queued", queue_id="65536000abcdefabcdef", size=1234, rcpts="a@x.test,b@y.test",
        recipients=["a@x.test", "b@y.test"], ratio=0.5, ok=True, nothing=None,
        password=SECRETS[0], smarthost_password=SECRETS[1],
        options={"port": 25, "auth": {"Token": SECRETS[2]}}, api_secret_key=SECRETS[3],
        err=ValueError("boom"), where=Path("/var/queue"), obj=object(), message="collide",
        raw=b"\x00bytes", nan=float("nan"),
    )
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("queue pass for {queue_id} failed", queue_id="q1", event="pass")
    log.warn("plain message without an event key")


def test_json_lines_parse_back_without_secrets(tmp_path):
    path = tmp_path / "mta.jsonl"
    observer = json_file_observer(path)
    log_everything(Logger(namespace="mta.test", observer=observer))
    observer.close()
    raw = path.read_text(encoding="utf-8")
    for secret in SECRETS:
        assert secret not in raw
    queued, failure, plain = read_lines(path)

    assert datetime.fromisoformat(queued["time"]).utcoffset().total_seconds() == 0
    assert queued["level"] == "info" and queued["namespace"] == "mta.test"
    assert queued["event"] == "queued"
    assert queued["message"] == "queued 65536000abcdefabcdef size=1234 to=a@x.test,b@y.test"
    assert queued["queue_id"] == "65536000abcdefabcdef" and queued["size"] == 1234
    assert queued["recipients"] == ["a@x.test", "b@y.test"]
    assert queued["ratio"] == 0.5 and queued["ok"] is True and queued["nothing"] is None
    assert queued["options"] == {"port": 25, "auth": {}}
    assert queued["err"] == "boom" and queued["where"] == "/var/queue"
    assert queued["_message"] == "collide" and queued["nan"] == "nan"
    for dropped in ("password", "smarthost_password", "api_secret_key", "obj", "raw"):
        assert dropped not in queued
    assert not any(key.startswith("log_") for key in queued)

    assert failure["level"] == "critical" and failure["event"] == "pass"
    assert failure["message"] == "queue pass for q1 failed"
    assert "ZeroDivisionError" in failure["traceback"]

    assert plain["level"] == "warn" and "event" not in plain
    assert plain["message"] == "plain message without an event key"


def test_json_observer_reopens_after_rotation(tmp_path):
    path = tmp_path / "mta.jsonl"
    observer = json_file_observer(path)
    log = Logger(observer=observer)
    log.info("first", event="one")
    path.rename(tmp_path / "mta.jsonl.1")
    observer.reopen()
    log.info("second", event="two")
    observer.close()
    log.info("after close is ignored", event="three")
    assert [e["event"] for e in read_lines(tmp_path / "mta.jsonl.1")] == ["one"]
    assert [e["event"] for e in read_lines(path)] == ["two"]


def test_scrubber_ahead_of_the_twistd_text_log():
    """As under twistd: the scrubber is installed before logging begins, so it
    runs before the text observer; buffered early events are replayed scrubbed."""
    publisher = LogPublisher()
    beginner = LogBeginner(publisher, io.StringIO(), SimpleNamespace(stdout=None, stderr=None),
                           SimpleNamespace(showwarning=None))
    out = io.StringIO()
    install_scrubber(publisher)
    try:
        log = Logger(namespace="mta.test", observer=publisher)
        log.info("early event for {user}", user="alice", password=SECRETS[0])
        beginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
        log.info("later event for {user}", user="bob", passwd=SECRETS[1])
        # A format that names the secret cannot format any more, and says so without it.
        log.info("login {user} with {password}", user="carol", password=SECRETS[2])
        log.info("broken format {", token=SECRETS[3])
    finally:
        remove_scrubber(publisher)
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text
    assert "early event for alice" in text and "later event for bob" in text
    assert "Unable to format event" in text


def test_scrub_wrapper_leaves_the_callers_data_alone():
    seen: list[dict] = []
    options = {"host": "relay.test", "password": SECRETS[0]}
    Logger(observer=Scrubbing(seen.append)).info("relay {options}", options=options,
                                                  secret=SECRETS[1])
    (event,) = seen
    assert event["options"] == {"host": "relay.test"} and "secret" not in event
    assert options["password"] == SECRETS[0]  # a copy was cleaned, not the caller's dict
    assert formatEvent(event) == "relay {'host': 'relay.test'}"
    assert scrub({"Token": 1, "n": 2, "log_level": LogLevel.info}) == {"n": 2,
                                                                         "log_level": LogLevel.info}


# --- the server's events, end to end --------------------------------------------------------


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def submission_session(port: int) -> str:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_auth("alice@example.test", "wrong-" + SECRETS[0]))[0] == 535
        assert c.cmd("AUTH PLAIN " + plain_auth("alice@example.test", PASSWORD))[0] == 235
        assert c.cmd("MAIL FROM:<alice@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<info@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: json\r\n\r\nhello\r\n.\r\n")
        code, text = c.read_reply()
        assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
        return text.split()[-1]
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_server_events_in_the_json_log(tmp_path):
    path = tmp_path / "mta.jsonl"
    service = json_log_service(path)
    service.startService()
    running = None
    try:
        running = await start_mta(tmp_path)
        queue_id = await in_thread(submission_session, running.port("submission"))
        await running.stop()
        running = None
    finally:
        if running is not None:
            await running.stop()
        service.stopService()
    Logger().info("after the service stopped", event="late")

    raw = path.read_text(encoding="utf-8")
    assert PASSWORD not in raw and SECRETS[0] not in raw
    lines = read_lines(path)
    by_event: dict[str, list[dict]] = {}
    for line in lines:
        by_event.setdefault(line.get("event", ""), []).append(line)
        # One readable line per event in the text log too: the format always fills in.
        assert "Unable to format" not in line["message"] and "{" not in line["message"]
    assert "late" not in by_event

    auth = by_event["auth"]
    assert [(a["result"], a["user"], a["ip"]) for a in auth] == [
        ("failed", "alice@example.test", "127.0.0.1"), ("ok", "alice@example.test", "127.0.0.1")]
    assert auth[0]["reason"] == "bad_credentials"
    (queued,) = by_event["queued"]
    queued_id = queued["queue_id"]
    assert queued["auth"] == "alice@example.test" and queued["tls"].startswith("TLSv1")
    assert queued_id == queue_id
    assert queued["sender"] == "alice@example.test" and queued["ip"] == "127.0.0.1"
    assert queued["rcpts"] == "bob@example.test,info@example.test"
    assert queued["size"] == running_size(tmp_path, queue_id)
    (session,) = by_event["session"]
    assert session["client_ip"] == "127.0.0.1" and session["helo"] == "client.test"
    assert session["listener"] == "submission" and session["kind"] == "submission"
    assert session["tls"].startswith("TLSv1") and session["auth"] == "alice@example.test"
    assert session["accepted"] == 1 and session["errors"] == 1
    assert 0 <= session["duration"] < 30
    assert session["message"].startswith("session 127.0.0.1 helo=client.test tls=TLSv1")


def running_size(tmp_path: Path, queue_id: str) -> int:
    return load_envelope(tmp_path / "var" / "queue" / "msg", queue_id).size


def test_observer_is_plain_callable_on_a_stream():
    stream = io.StringIO()
    observer = JSONLinesObserver(stream)
    Logger(observer=observer).info("x {n}", n=1, event="e")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["n"] == 1


def test_cached_time_formatter_writes_the_same_lines_as_twistd():
    """The text log's lines are byte for byte those of twisted's own formatter,
    across second boundaries, with failures and multi-line text."""
    events = []
    publisher = LogPublisher(events.append)
    log = Logger(namespace="mta.test", observer=publisher)
    for i, when in enumerate((1700000000.1, 1700000000.9, 1700000001.0, 1700003600.5)):
        log.info("message {n}\nsecond line", n=i)
        events[-1]["log_time"] = when
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("failed {n}", n=9)
    log.emit(LogLevel.warn, "legacy", log_system="-")
    log.info("{t:.3f}s {who!r} {path.name} {n:>4} {d[k]}", t=0.12345, who="x",
             path=Path("/var/q/abc.json"), n=7, d={"k": "v"})
    log.info("call syntax {f()}", f=lambda: "called")
    log.info("missing {nothing}")
    log.info("")
    log.info("{a} and {{braces}}", a=b"bytes")
    twisted_out, ours_out = io.StringIO(), io.StringIO()
    theirs = textFileLogObserver(twisted_out)
    ours = textFileLogObserver(ours_out)
    ours.formatEvent = classic_formatter()
    for event in events:
        theirs(event)
        ours(event)
    assert ours_out.getvalue() == twisted_out.getvalue()
    assert "0.123s 'x' abc.json    7 v" in ours_out.getvalue() and "call syntax called" in ours_out.getvalue()
    stamp = formatTime(1700000000.1)  # local time, as twistd writes it
    assert f"{stamp} [mta.test#info] message 0\n\tsecond line\n" in ours_out.getvalue()


def test_worker_lines_carry_the_worker_in_the_system_field():
    out = io.StringIO()
    events = []
    log = Logger(namespace="mta.smtp.server", observer=LogPublisher(events.append))
    log.info("queued {id}", id="q1")
    log.emit(LogLevel.info, "Starting factory", log_system="-")
    observer = worker_log_observer(3, out)
    for event in events:
        event["log_time"] = 1700000000.0
        observer(event)
    stamp = formatTime(1700000000.0)
    assert out.getvalue() == (f"{stamp} [worker3 mta.smtp.server#info] queued q1\n"
                              f"{stamp} [worker3 mta.smtp.server#info] Starting factory\n")


class _Turns(Clock):
    """A reactor for FlushEachTurn: a clock whose ``advance(0)`` ends a turn."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, f, *args):  # noqa: N802
        self.triggers.append((phase, event, f))


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


def test_log_lines_of_one_reactor_turn_leave_in_one_write():
    reactor, out = _Turns(), _CountingStream()
    observer = textFileLogObserver(FlushEachTurn(out, reactor))
    log = Logger(namespace="mta.test", observer=observer)
    for n in range(5):
        log.info("line {n}", n=n)
    assert out.getvalue() == "" and out.writes == 0  # still in this turn
    reactor.advance(0)
    assert out.writes == 1 and out.flushes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        f"line {n}" for n in range(5)]
    reactor.advance(0)
    assert out.writes == 1  # nothing new, nothing written
    log.info("next turn")
    reactor.advance(0)
    assert out.writes == 2 and out.getvalue().endswith("next turn\n")


def test_log_lines_go_out_at_once_off_the_reactor_thread_when_stopped_and_past_the_limit():
    reactor, out = _Turns(), _CountingStream()
    stream = FlushEachTurn(out, reactor, limit=100)
    observer = textFileLogObserver(stream)
    log = Logger(namespace="mta.test", observer=observer)
    log.info("waits for the turn")
    helper = threading.Thread(target=lambda: log.info("from a helper thread"))
    helper.start()
    helper.join(timeout=10)
    # The helper's line takes the waiting one with it, in order.
    assert out.writes == 1 and "waits for the turn" in out.getvalue()
    assert out.getvalue().index("waits") < out.getvalue().index("helper")
    log.info("x" * 120)  # past the limit: written without waiting for the turn
    assert out.writes == 2
    (shutdown,) = [f for phase, event, f in reactor.triggers if (phase, event) == ("after", "shutdown")]
    log.info("last turn")
    shutdown()
    assert out.writes == 3 and out.getvalue().endswith("last turn\n")
    reactor.running = False  # after the main loop (twistd's "Main loop terminated.")
    log.info("Main loop terminated.")
    assert out.writes == 4 and out.getvalue().endswith("Main loop terminated.\n")
    reactor.advance(0)  # the turn's call, still pending, finds nothing to write
    assert out.writes == 4


def test_scrubber_checks_every_new_field_name_and_remembers_the_harmless_ones():
    assert scrub({"queue_id": "q", "size": 1, "api_token": "t"}) == {"queue_id": "q", "size": 1}
    assert {"queue_id", "size"} <= logs_module._SAFE_KEYS
    assert "api_token" not in logs_module._SAFE_KEYS
    # A harmless name holding a dict with a secret inside: the dict is cleaned
    # (a copy: the caller's stays as it was).
    options = {"port": 25, "Password": "p"}
    assert scrub({"options": options, "size": 2}) == {"options": {"port": 25}, "size": 2}
    assert options == {"port": 25, "Password": "p"}
    assert scrub({"api_token": "again", "queue_id": "q2"}) == {"queue_id": "q2"}


# --- what the lines say ------------------------------------------------------------------


def null_sender_session(port: int) -> None:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<>")[0] == 250
        assert c.cmd("RCPT TO:<nobody@example.test>")[0] == 550
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: bounce\r\n\r\nreport\r\n.\r\n")
        assert c.read_reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


async def events_of(tmp_path: Path, session: Any, listener: str = "mx", **kwargs: Any) -> list[dict]:
    """The events a real MTA logs while ``session(port)`` runs (until it has stopped)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        running = await start_mta(tmp_path, **kwargs)
        try:
            await in_thread(session, running.port(listener))
        finally:
            await running.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


@pytest_twisted.ensureDeferred
async def test_null_sender_is_logged_as_angle_brackets(tmp_path):
    events = await events_of(tmp_path, null_sender_session)
    text = classic_formatter()
    (queued,) = [e for e in events if e.get("event") == "queued"]
    assert queued["sender"] == "<>"
    assert " from=<> to=alice@example.test " in text(queued)
    (rejected,) = [e for e in events if e.get("event") == "rejected"]
    assert rejected["sender"] == "<>" and rejected["recipient"] == "nobody@example.test"
    assert json.loads(event_as_json(rejected))["sender"] == "<>"


class _Boom(Exception):
    pass


def test_no_field_value_can_break_a_text_log_line():
    """CR and LF inside any field value are written as \\r and \\n: each event is one
    line of the text log (and of a worker's), whatever a client or header put in it."""
    events = []
    log = Logger(namespace="mta.test", observer=LogPublisher(events.append))
    log.info("helo={helo} reply={reply}", helo="evil\r\n2026-01-01 [fake#info] queued X",
             reply="550 no\rsuch")
    log.info("err={err} first={d[k]} {p!r}", err=_Boom("line one\nline two"),
             d={"k": "a\nb"}, p="x\ny")
    log.info("call {f()}", f=lambda: "called\r\n")
    try:
        raise _Boom("in a traceback")
    except _Boom:
        log.failure("failed for {who}", who="a\r\nb")
    log.info("plain {n} {t:.1f}", n=7, t=0.25)
    out, worker_out = io.StringIO(), io.StringIO()
    observer = textFileLogObserver(out)
    observer.formatEvent = classic_formatter()
    worker = worker_log_observer(2, worker_out)
    for event in events:
        event["log_time"] = 1700000000.0
        observer(event)
        worker(event)
    lines = [line for line in out.getvalue().split("\n") if not line.startswith("\t")]
    assert "\r" not in out.getvalue() and len(lines) == len(events) + 1 and lines[-1] == ""
    assert lines[0].endswith(
        r"helo=evil\r\n2026-01-01 [fake#info] queued X reply=550 no\rsuch")
    assert lines[1].endswith(r"err=line one\nline two first=a\nb 'x\ny'")
    assert lines[2].endswith(r"call called\r\n")
    assert lines[3].endswith(r"failed for a\r\nb")  # its traceback follows, tab-indented
    assert lines[4].endswith("plain 7 0.2")
    assert "\tTraceback" in out.getvalue()
    assert worker_out.getvalue().count("[worker2 mta.test#") == 5
    assert "\r" not in worker_out.getvalue()
    # The JSON log: one line per event, and the value itself kept exactly.
    stream = io.StringIO()
    json_observer = JSONLinesObserver(stream)
    json_observer(events[0])
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["helo"] == "evil\r\n2026-01-01 [fake#info] queued X"


@pytest_twisted.ensureDeferred
async def test_resolver_lookups_leave_no_udp_port_lines_in_the_logs(dns_server):
    """twisted.names opens and closes a UDP port per question and logs both; the
    MTA's log writers (text, worker, JSON) leave those lines out, and only those."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from mta.delivery.mx import MXResolver
    from mta.system.dns import make_resolver

    dns_server.load({"dst.test": {"MX": [(10, "mx.dst.test")]}, "mx.dst.test": {"A": ["127.0.0.1"]}})
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        resolver = MXResolver(make_resolver(dns_server.dns_config()))
        hosts = await resolver.resolve("dst.test")
        await deferLater(reactor, 0.05, lambda: None)  # the ports close on a later turn
        Logger(namespace="mta.test").info("after the lookups")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [h.name for h in hosts] == ["mx.dst.test"]
    raw = "\n".join(formatEvent(e) for e in events)
    assert "DNSDatagramProtocol starting on" in raw and "Closed)" in raw  # twisted said them
    text, worker, json_out = io.StringIO(), io.StringIO(), io.StringIO()
    observer = textFileLogObserver(text)
    observer.formatEvent = classic_formatter()
    observers = [observer, worker_log_observer(1, worker), JSONLinesObserver(json_out)]
    for event in events:
        for o in observers:
            o(event)
    for out in (text, worker, json_out):
        written = out.getvalue()
        assert "DNSDatagramProtocol" not in written and "UDP Port" not in written, written
        assert "after the lookups" in written


def many_refused_recipients(port: int) -> None:
    c = RawClient(port)
    try:
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@remote.test>")[0] == 250
        for i in range(20):  # a dictionary attack: 550 5.1.1 each
            assert c.cmd(f"RCPT TO:<guess{i}@example.test>")[0] == 550
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
        for i in range(30):  # past limits.max_recipients: 452 4.5.3 each
            assert c.cmd(f"RCPT TO:<more{i}@example.test>")[0] == 452
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_a_session_of_refused_recipients_logs_the_first_ten_then_one_summary(tmp_path):
    from mta.daemon.metrics import Metrics

    events = await events_of(tmp_path, many_refused_recipients,
                             extra={"limits": {"max_recipients": 2, "max_errors": 1000}})
    rejected = [e for e in events if e.get("event") == "rejected"]
    assert [e["recipient"] for e in rejected] == [f"guess{i}@example.test" for i in range(10)]
    (summary,) = [e for e in events if e.get("event") == "rejected_summary"]
    assert summary["count"] == 40 and summary["statuses"] == {"4.5.3": 30, "5.1.1": 10}
    assert summary["sample"] == ",".join(f"guess{i}@example.test" for i in range(10, 15))
    assert classic_formatter()(summary).endswith(
        "rcpt rejected for 127.0.0.1: 40 more recipients refused in this session "
        "(4.5.3 x30, 5.1.1 x10); sample: guess10@example.test,guess11@example.test,"
        "guess12@example.test,guess13@example.test,guess14@example.test\n")
    (session,) = [e for e in events if e.get("event") == "session"]
    assert events.index(summary) < events.index(session)
    # The metrics still count every refusal.
    metrics = Metrics()
    for event in events:
        metrics.observe_event(event)
    counted = sum(metrics.registry.get_sample_value(
        "mta_smtp_rejections_total", {"stage": "rcpt", "enhanced": code}) or 0
        for code in ("5.1.1", "4.5.3"))
    assert counted == 50
