"""End to end with the real ``twistd -n mta`` process, a loopback DNS server and SMTP sinks.

The daemon runs in a subprocess; the DNS server and the receiving SMTP sinks run
in this test's reactor; clients run in threads.  Each MX host has its own
loopback address (127.0.0.x) so one port number serves every "remote" domain.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mta.queue.layout import list_ids, load_envelope
from tests.daemon import Daemon, free_port
from tests.dnsserver import LoopbackDNS
from tests.harness import (
    PASSWORD,
    client_tls_context,
    in_thread,
    message_files,
    shared_ca,
    write_domain,
)
from tests.sink import start_sink
from tests.test_workers import CONFIG as WORKERS_CONFIG

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"

[listeners.mx]
endpoint = "tcp:{mx_port}:interface=127.0.0.1"
kind = "mx"

[listeners.submission]
endpoint = "tcp:{submission_port}:interface=127.0.0.1"
kind = "submission"

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[spf]
enabled = false

[dns]
servers = ["{dns}"]
timeout = 2

[delivery]
mx_port = {sink_port}
retry_schedule = [1]
retry_jitter = 0
"""


def free_port_on(hosts: list[str]) -> int:
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def write_daemon_config(root: Path, dns: tuple[str, int], sink_port: int) -> tuple[Path, int, int]:
    write_domain(root / "domains", "example.test", {"alice": PASSWORD, "bob": PASSWORD})
    cert = shared_ca().issue_cert("mx.example.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    mx_port, submission_port = free_port(), free_port()
    path = root / "mta.toml"
    path.write_text(CONFIG.format(mx_port=mx_port, submission_port=submission_port,
                                  dns=f"{dns[0]}:{dns[1]}", sink_port=sink_port))
    return path, mx_port, submission_port


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


def maildir_files(root: Path, user: str) -> list[Path]:
    new = root / "var" / "mail" / "example.test" / user / "new"
    return sorted(new.iterdir()) if new.exists() else []


@pytest_twisted.ensureDeferred
async def test_submission_to_remote_mx_and_local_maildir(tmp_path):
    dns = LoopbackDNS({
        "remote.test": {"MX": [(10, "mx.remote.test")]},
        "mx.remote.test": {"A": ["127.0.0.2"]},
    })
    await dns.start()
    sink_port = free_port_on(["127.0.0.2"])
    sink = await start_sink(interface="127.0.0.2", port=sink_port)
    config, _, submission_port = write_daemon_config(tmp_path, dns.address, sink_port)
    daemon = Daemon(tmp_path, config, submission_port)
    try:
        await in_thread(daemon.start)

        def submit():
            t0 = time.monotonic()
            with smtplib.SMTP("127.0.0.1", submission_port, timeout=10) as s:
                s.starttls(context=client_tls_context())
                s.login("alice@example.test", PASSWORD)
                s.sendmail("alice@example.test", ["friend@remote.test", "bob@example.test"],
                           b"Subject: end to end\r\n\r\nhello\r\n.dotted\r\n")
            return time.monotonic() - t0

        accept_time = await in_thread(submit)
        t0 = time.monotonic()
        await wait_for(lambda: sink.messages and maildir_files(tmp_path, "bob"), what="delivery")
        e2e_time = time.monotonic() - t0 + accept_time
        print(f"\nend-to-end: accepted in {accept_time * 1000:.1f} ms, "
              f"delivered to MX and Maildir in {e2e_time * 1000:.1f} ms")
        (msg,) = sink.messages
        assert msg.sender == "alice@example.test"
        assert msg.recipients == ["friend@remote.test"]
        assert msg.data.endswith(b"\r\n\r\nhello\r\n.dotted\r\n")
        assert b"with ESMTPSA id" in msg.data
        (local,) = maildir_files(tmp_path, "bob")
        content = local.read_bytes()
        assert content.startswith(b"Return-Path: <alice@example.test>\nDelivered-To: bob@example.test\n")
        assert content.endswith(b"\n\nhello\n.dotted\n")
        await wait_for(lambda: not message_files(tmp_path / "var" / "queue" / "msg"),
                       what="queue to empty")
    finally:
        await in_thread(daemon.kill)
        await sink.stop()
        await dns.stop()


@pytest_twisted.ensureDeferred
async def test_sigkill_during_multi_recipient_delivery_delivers_each_once(tmp_path):
    """Kill the daemon while one destination stalls; after restart nothing is lost or repeated."""
    hosts = {"d1.test": "127.0.0.11", "d2.test": "127.0.0.12", "d3.test": "127.0.0.13"}
    zone = {}
    for domain, ip in hosts.items():
        zone[domain] = {"MX": [(10, f"mx.{domain}")]}
        zone[f"mx.{domain}"] = {"A": [ip]}
    dns = LoopbackDNS(zone)
    await dns.start()
    port = free_port_on(list(hosts.values()))
    sinks = {
        "d1.test": await start_sink(interface=hosts["d1.test"], port=port),
        "d2.test": await start_sink(interface=hosts["d2.test"], port=port),
        # d3's server takes the message and never answers the end of DATA.
        "d3.test": await start_sink(interface=hosts["d3.test"], port=port, stall={"DATA_END"}),
    }
    config, mx_port, _ = write_daemon_config(tmp_path, dns.address, port)
    text = config.read_text().replace('local_domains = ["example.test"]',
                                      'local_domains = ["example.test"]\nrelay_networks = ["127.0.0.1/32"]')
    config.write_text(text)
    daemon = Daemon(tmp_path, config, mx_port)
    envelope_dir = tmp_path / "var" / "queue" / "msg"
    try:
        await in_thread(daemon.start)

        def send():
            with smtplib.SMTP("127.0.0.1", mx_port, timeout=10) as s:
                s.sendmail("sender@remote.test",
                           ["a@d1.test", "b@d2.test", "c@d3.test", "alice@example.test"],
                           b"Subject: crash\r\n\r\nonce only\r\n")

        await in_thread(send)

        def recorded() -> dict[str, str]:
            states = {}
            for queue_id in list_ids(envelope_dir):
                try:
                    for r in load_envelope(envelope_dir, queue_id).recipients:
                        states[r.address] = str(r.state)
                except (OSError, ValueError):
                    return {}
            return states

        def ready() -> bool:
            s = recorded()
            return (s.get("a@d1.test") == "delivered" and s.get("b@d2.test") == "delivered"
                    and s.get("alice@example.test") == "delivered"
                    and sinks["d3.test"].sessions and sinks["d3.test"].sessions[0].stalled_at)

        await wait_for(ready, what="d1, d2 and local delivered while d3 stalls")
        before = recorded()
        await in_thread(daemon.kill)
        assert before["c@d3.test"] == "pending"

        # d3 recovers; the daemon restarts and finishes from its envelope.
        await sinks["d3.test"].stop()
        sinks["d3.test"] = await start_sink(interface=hosts["d3.test"], port=port)
        await in_thread(daemon.start)
        await wait_for(lambda: sinks["d3.test"].messages, what="d3 delivery after restart")
        await wait_for(lambda: not message_files(envelope_dir), what="queue to empty")
        accepted = {d: [m for m in s.messages if m.accepted] for d, s in sinks.items()}
        assert len(accepted["d1.test"]) == 1 and accepted["d1.test"][0].recipients == ["a@d1.test"]
        assert len(accepted["d2.test"]) == 1 and accepted["d2.test"][0].recipients == ["b@d2.test"]
        assert len(accepted["d3.test"]) == 1 and accepted["d3.test"][0].recipients == ["c@d3.test"]
        assert len(maildir_files(tmp_path, "alice")) == 1
    finally:
        await in_thread(daemon.kill)
        for s in sinks.values():
            await s.stop()
        await dns.stop()


# test_workers' two-process configuration, relaying for the test's clients.
LOAD_CONFIG = WORKERS_CONFIG.replace('local_domains = ["example.test"]',
                                     'local_domains = ["example.test"]\nrelay_networks = ["127.0.0.1/32"]')


@pytest_twisted.ensureDeferred
async def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path):
    """Four clients keep sending (a new connection per message) to two processes
    while the smarthost stalls at its greeting; SIGKILL mid-stream.  After a
    restart with the smarthost answering, every message that got its 250 arrives,
    and none arrives twice (the queue files, spares included, hold no surprise)."""
    sink = await start_sink(stall={"greeting"})
    sink_port = sink.port
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    mx_port = free_port()
    config = tmp_path / "mta.toml"
    config.write_text(LOAD_CONFIG.format(port=mx_port, dead_port=sink_port))
    daemon = Daemon(tmp_path, config, mx_port)
    acknowledged: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(1000):  # bounded; ends long before, at the kill
            if stop.is_set():
                return
            token = f"token-{n}-{i}"
            try:
                with smtplib.SMTP("127.0.0.1", mx_port, timeout=5) as s:
                    s.sendmail("s@remote.test", ["friend@remote.test"],
                               f"Subject: {token}\r\n\r\n{token}\r\n".encode())
                    acknowledged.append(token)  # the 250 is in: it must arrive
            except (smtplib.SMTPException, OSError):
                return

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    try:
        await in_thread(daemon.start)
        for t in threads:
            t.start()
        await wait_for(lambda: len(acknowledged) >= 120, timeout=60, what="120 messages accepted")
        await in_thread(daemon.kill)  # SIGKILL, clients in mid-transaction
        stop.set()
        for t in threads:
            await in_thread(t.join, 10)
        assert not any(t.is_alive() for t in threads)
        await sink.stop()
        sink = await start_sink(port=sink_port)
        await in_thread(daemon.start)
        expected = set(acknowledged)
        got = lambda: {m.data.decode().rsplit("\r\n\r\n", 1)[1].strip() for m in sink.messages}  # noqa: E731
        await wait_for(lambda: expected <= got(), timeout=60, what="every acknowledged message")
        await wait_for(lambda: not message_files(tmp_path / "var" / "queue" / "msg"),
                       timeout=30, what="queue to empty")
        tokens = [m.data.decode().rsplit("\r\n\r\n", 1)[1].strip() for m in sink.messages]
        assert len(tokens) == len(set(tokens)), "a message arrived twice"
        assert expected <= set(tokens)
    finally:
        stop.set()
        await in_thread(daemon.kill)
        await sink.stop()
