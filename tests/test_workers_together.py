"""The features built apart, under ``workers = 2`` (a real twistd with a worker
process): the hold queue, and TLS reporting, each seen across both processes."""

from __future__ import annotations

import re
import signal
import smtplib
import time
from pathlib import Path

import pytest

from mta.admin.control import call
from tests.daemon import Daemon, free_port
from tests.harness import PASSWORD, write_domain
from tests.test_cli import sock_dir  # noqa: F401 (fixture)
from tests.test_hold import HOLD_CHECKS
from tests.test_metrics import scrape, value
from tests.test_workers import CONFIG, children_of

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def start_two(tmp_path: Path, top: str = "", tail: str = "") -> Daemon:
    """twistd with ``workers = 2``, alice@example.test local, once its worker
    adopted the socket; ``top``: more top-level settings, ``tail``: more tables."""
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    config = tmp_path / "mta.toml"
    text = CONFIG.replace("workers = 2\n", "workers = 2\n" + top).format(
        port=port, dead_port=free_port())
    config.write_text(text + tail)
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
            not children_of(daemon.proc.pid)
            or "SMTPFactory starting" not in daemon.read_log().split("started worker 1", 1)[-1]):
        time.sleep(0.1)
    assert children_of(daemon.proc.pid), daemon.read_log()[-2000:]
    return daemon


def send(port: int, subject: str, rcpt: str = "alice@example.test") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("friend@remote.test")
        s.rcpt(rcpt)
        code, text = s.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_message_a_worker_quarantined_is_held_counted_and_released_by_the_main_process(
        tmp_path, sock_dir):  # noqa: F811
    metrics = free_port()
    sock = sock_dir / "control.sock"
    daemon = start_two(tmp_path, f'control_socket = "{sock}"\n'
                       f'metrics = "tcp:{metrics}:interface=127.0.0.1"\n', HOLD_CHECKS)
    new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
    try:
        kept: list[str] = []
        by_worker: set[str] = set()
        for i in range(40):  # until the worker has taken a few (the kernel spreads accepts)
            kept.append(send(daemon.port, f"[quarantine] {i}"))
            by_worker = set(re.findall(r"\[worker1 mta\.smtp\.server#info\] queued (\w+)",
                                       daemon.read_log())) & set(kept)
            if len(by_worker) >= 2 and len(by_worker) < len(kept):
                break
        assert by_worker and by_worker != set(kept), daemon.read_log()[-3000:]
        plain = send(daemon.port, "lunch")
        wait(lambda: new.exists() and len(list(new.iterdir())) == 1)
        time.sleep(0.5)  # a first pass that would deliver a held one has had time
        assert [b"Subject: lunch" in p.read_bytes() for p in new.iterdir()] == [True]
        # Every held message is counted by the main process, whichever took it.
        wait(lambda: value(scrape(metrics)[1], "mta_queue_held_messages") == len(kept))
        assert call(sock, "status")["held"] == len(kept)
        assert plain not in kept
        for queue_id in sorted(by_worker):
            call(sock, "release", id=queue_id)
        wait(lambda: len(list(new.iterdir())) == 1 + len(by_worker))
        wait(lambda: value(scrape(metrics)[1], "mta_queue_held_messages")
             == len(kept) - len(by_worker))
        subjects = sorted(p.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0]
                          for p in new.iterdir())
        assert subjects == sorted([b"lunch"] + [b"[quarantine] %d" % kept.index(q)
                                                for q in by_worker])
        assert daemon.terminate() in (0, -signal.SIGTERM)
        log = daemon.read_log()
        assert "Unhandled error" not in log and "Traceback" not in log, log[-2000:]
    finally:
        daemon.kill()
