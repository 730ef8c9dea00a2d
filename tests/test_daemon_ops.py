"""Operations, black-box: the real ``twistd -n mta`` process reloading on SIGHUP,
shutting down on SIGTERM while a client is in DATA, serving Prometheus metrics
over HTTP and writing its JSON log.

These tests are blocking and talk to a subprocess, so they run no reactor code.
Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mta.policy.auth import add_user
from mta.queue.layout import open_message
from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, RawClient, message_files, write_domain

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
relay_networks = ["127.0.0.0/8"]
{top}

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
connection_rate_per_ip = 0   # the tests poll with many short connections
{limits}
""" + QUIET_TAIL


def start_daemon(root: Path, top: str = "", limits: str = "") -> Daemon:
    write_domain(root / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    path = root / "mta.toml"
    path.write_text(CONFIG.format(port=port, top=top, limits=limits, dead_port=free_port()))
    daemon = Daemon(root, path, port)
    daemon.start()
    return daemon


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def session(port: int) -> RawClient:
    """A raw client that has read the greeting and said EHLO."""
    client = RawClient(port)
    assert client.read_reply()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    return client


def rcpt_code(port: int, recipient: str) -> int:
    """The reply code a new connection gets for ``RCPT TO:<recipient>``."""
    client = session(port)
    try:
        assert client.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        return client.cmd(f"RCPT TO:<{recipient}>")[0]
    finally:
        client.cmd("QUIT")
        client.close()


def queue_files(root: Path, sub: str) -> list[str]:
    """The files in the queue's ``sub``/ (for msg/: the messages, not the spares)."""
    d = root / "var" / "queue" / sub
    if sub == "msg":
        return message_files(d)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def assert_stops_cleanly(daemon: Daemon, timeout: float = 20.0, send: bool = False) -> None:
    """The daemon ends its main loop after SIGTERM and exits within ``timeout``.

    twistd re-raises the signal that stopped the reactor once it has shut down
    cleanly (twisted.scripts.twistd.runApp → app._exitWithSignal), so a graceful
    stop ends with status -SIGTERM, not 0; systemd counts that as a clean exit.
    """
    assert daemon.proc is not None
    if send:
        daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout) == -signal.SIGTERM
    log = daemon.read_log()
    assert "Main loop terminated." in log, log
    assert "Traceback" not in log and "Unhandled" not in log, log


def log_lines(daemon: Daemon, text: str) -> list[str]:
    return [line for line in daemon.read_log().splitlines() if text in line]


# --- reload on SIGHUP -----------------------------------------------------------------


def test_sighup_reloads_users_and_aliases_while_a_client_is_connected(tmp_path):
    daemon = start_daemon(tmp_path)
    port = daemon.port
    held: RawClient | None = None
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        held = session(port)
        domain = tmp_path / "domains" / "example.test"
        add_user(domain / "users", "newuser", PASSWORD)
        (domain / "aliases").write_text("helpdesk: newuser\n")
        # Files changed, no signal yet: the running policy does not know them.
        assert rcpt_code(port, "newuser@example.test") == 550
        assert rcpt_code(port, "helpdesk@example.test") == 550

        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: rcpt_code(port, "newuser@example.test") == 250, what="new user accepted")
        assert rcpt_code(port, "helpdesk@example.test") == 250
        wait_until(lambda: log_lines(daemon, "configuration reloaded"), what="reload log line")

        # The session opened before the reload is still served and can send mail.
        assert held.cmd("NOOP")[0] == 250
        assert held.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        assert held.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert held.cmd("DATA")[0] == 354
        code, text = held.cmd(b"Subject: held\r\n\r\nsent across a reload\r\n.")
        assert code == 250, text
        assert held.cmd("QUIT")[0] == 221

        # A broken aliases file: the reload fails, the previous policy stays.
        (domain / "aliases").write_text("helpdesk newuser\n")
        os.kill(pid, signal.SIGHUP)
        (failed,) = wait_until(lambda: log_lines(daemon, "reload failed"), what="reload failure log")
        assert "aliases:1" in failed and "expected 'name: target" in failed, failed
        assert daemon.proc.poll() is None
        assert rcpt_code(port, "newuser@example.test") == 250
        assert rcpt_code(port, "helpdesk@example.test") == 250
        assert rcpt_code(port, "nobody@example.test") == 550
        assert_stops_cleanly(daemon, send=True)
    finally:
        if held is not None:
            held.close()
        daemon.kill()


# --- SIGTERM ----------------------------------------------------------------------------


def start_data(port: int) -> RawClient:
    """A client inside DATA that has sent the first half of a message."""
    client = session(port)
    assert client.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    assert client.cmd("RCPT TO:<friend@remote.test>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: shutdown\r\n\r\nfirst half\r\n")
    return client


def test_sigterm_during_data_lets_the_transaction_finish(tmp_path):
    daemon = start_daemon(tmp_path, limits="shutdown_timeout = 10")
    clients: list[RawClient] = []
    try:
        assert daemon.proc is not None
        in_data = start_data(daemon.port)
        clients.append(in_data)
        idle = session(daemon.port)
        clients.append(idle)
        daemon.proc.send_signal(signal.SIGTERM)

        # The idle session is told at once.
        code, text = idle.read_reply()
        assert (code, text[4:9]) == (421, "4.3.2"), text
        assert idle.is_closed()

        in_data.send(b"second half\r\n.\r\n")
        code, text = in_data.read_reply()
        msg_files = queue_files(tmp_path, "msg")
        if code == 250:
            # Accepted means durably queued (the smarthost is dead: it stays there),
            # and the session is then closed with 421.
            queue_id = text.split()[-1]
            assert sorted(msg_files) == [f"{queue_id}.msg"], msg_files
            with open_message(tmp_path / "var" / "queue" / "msg" / f"{queue_id}.msg") as f:
                data = f.read()
            assert data.endswith(b"Subject: shutdown\r\n\r\nfirst half\r\nsecond half\r\n")
            code, text = in_data.read_reply()
        else:
            assert msg_files == [], msg_files
        assert (code, text[4:9]) == (421, "4.3.2"), text
        assert in_data.is_closed()
        # Within shutdown_timeout the message must have been allowed to finish.
        assert msg_files, "the transaction in DATA was not allowed to finish"

        assert_stops_cleanly(daemon, timeout=20)
        assert queue_files(tmp_path, "tmp") == []
    finally:
        for c in clients:
            c.close()
        daemon.kill()


def test_sigterm_with_unfinished_data_gives_up_after_shutdown_timeout(tmp_path):
    daemon = start_daemon(tmp_path, limits="shutdown_timeout = 1")
    in_data: RawClient | None = None
    try:
        assert daemon.proc is not None
        in_data = start_data(daemon.port)
        time.sleep(0.2)  # let the server read the first half
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code, text = in_data.read_reply()
        waited = time.monotonic() - t0
        assert (code, text[4:9]) == (421, "4.3.2"), text
        assert waited >= 0.9, f"421 after {waited:.2f}s: the grace time was not given"
        assert in_data.is_closed()
        assert_stops_cleanly(daemon, timeout=8)
        assert time.monotonic() - t0 < 6
        assert queue_files(tmp_path, "msg") == []
        assert queue_files(tmp_path, "tmp") == []
    finally:
        if in_data is not None:
            in_data.close()
        daemon.kill()


# --- metrics ----------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_when_idle(port: int) -> dict[tuple[str, frozenset], float]:
    """A scrape taken once no SMTP session is open (so every ended session is counted)."""
    def idle() -> dict | None:
        try:
            samples = scrape(port)
        except OSError:  # urllib's URLError included: not listening yet
            return None
        active = samples.get(("mta_smtp_sessions_active", frozenset()))
        return samples if active == 0 else None

    return wait_until(idle, what="no SMTP session open")


def test_metrics_scraped_from_the_daemon(tmp_path):
    metrics_port = free_port()
    daemon = start_daemon(tmp_path, top=f'metrics = "tcp:{metrics_port}:interface=127.0.0.1"')
    try:
        # The start-up probe's session must have ended before the baseline is taken.
        before = scrape_when_idle(metrics_port)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            assert s.rcpt("nobody@example.test")[0] == 550
            assert s.rcpt("friend@remote.test")[0] == 250
            assert s.data(b"Subject: metrics\r\n\r\ncount me\r\n")[0] == 250
        after = scrape_when_idle(metrics_port)
        # The baseline counts Daemon.start's probe connection; ours adds one.
        assert (sample(after, "mta_smtp_sessions_total", kind="mx", tls="no")
                == sample(before, "mta_smtp_sessions_total", kind="mx", tls="no") + 1)
        assert (sample(after, "mta_smtp_connections_total", kind="mx")
                == sample(before, "mta_smtp_connections_total", kind="mx") + 1)
        assert sample(after, "mta_messages_accepted_total") == 1
        assert sample(after, "mta_smtp_rejections_total", stage="rcpt", enhanced="5.1.1") == 1
        assert sum(v for (name, _), v in after.items() if name == "mta_smtp_rejections_total") == 1
        assert sample(after, "mta_smtp_replies_total", code="550", enhanced="5.1.1") == 1
        assert sample(after, "mta_queue_messages") == 1
        assert sample(after, "mta_message_size_bytes_count") == 1
        assert_stops_cleanly(daemon, send=True)
    finally:
        daemon.kill()


# --- JSON log ---------------------------------------------------------------------------


def test_json_log_file_has_the_queued_event(tmp_path):
    daemon = start_daemon(tmp_path, top='log_json = "mta.jsonl"')
    path = tmp_path / "mta.jsonl"
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            s.rcpt("friend@remote.test")
            code, text = s.data(b"Subject: json\r\n\r\nlog me\r\n")
        assert code == 250
        queue_id = text.decode().split()[-1]

        def events() -> list[dict]:
            return [json.loads(line) for line in path.read_text().splitlines()]

        def has_session_end() -> bool:
            return any(e.get("event") == "session" and e.get("accepted") == 1 for e in events())

        wait_until(has_session_end, what="session event in the JSON log")
        assert_stops_cleanly(daemon, send=True)
        # After a clean stop every line is complete JSON.
        lines = path.read_text().splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
        queued = [e for e in events() if e.get("event") == "queued"]
        assert [e["queue_id"] for e in queued] == [queue_id]
        assert queued[0]["sender"] == "sender@remote.test"
        assert queued[0]["level"] == "info" and queued[0]["time"].endswith("Z")
    finally:
        daemon.kill()
