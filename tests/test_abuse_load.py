"""Abuse under load against the real ``twistd -n mta``: slowloris, connection flood, normal mail.

A small version of ``bench/abuse_load.py`` (its core, imported from the file):
300 slowloris connections from 127.0.0.2-9 trickling one byte a second (faster
than the 2 s command timeout), a 5 s connection flood from 127.0.0.10-20 and 20
normal messages from 127.0.0.100, all at once, against a daemon with tight
limits.  What a user would see: every normal message gets 250 and lands in the
Maildir; the attackers get 421s; the daemon's memory stays bounded, it logs no
traceback and it still greets afterwards.

Blocking and subprocess-based like test_daemon.py: no reactor code runs here.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, write_domain

ROOT = Path(__file__).resolve().parent.parent

COMMAND_TIMEOUT = 2.0
PER_IP = 20
RATE_PER_IP = 50  # per minute: the whole test is shorter than the window
MAX_CONNECTIONS = 600
SLOW_SOURCES = 8  # 127.0.0.2-9
FLOOD_SOURCES = 11  # 127.0.0.10-20
MESSAGES = 20

# The daemon's memory bound.  Idle, the twistd process is ~60 MB (Python,
# Twisted, cryptography, dkimpy).  At most MAX_CONNECTIONS sessions exist at
# once; a session (protocol object, transport, its buffers bounded by
# max_command_length, timers) is well under 64 KiB, so 600 of them add < 40 MB.
# Everything else the attack does (refused connections, garbage) must not
# accumulate.  So: growth during the attack < 100 MiB, and peak < 250 MiB.
MAX_GROWTH_KB = 100 * 1024
MAX_PEAK_KB = 250 * 1024

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
command_timeout = {command_timeout}
max_connections_per_ip = {per_ip}
connection_rate_per_ip = {rate}
max_connections = {max_connections}
""" + QUIET_TAIL


def load_abuse_load() -> ModuleType:
    """bench/ is not a package: load bench/abuse_load.py by its path."""
    name = "abuse_load"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "abuse_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def write_config(root: Path, port: int) -> Path:
    write_domain(root / "domains", "example.test", {"alice": PASSWORD})
    path = root / "mta.toml"
    path.write_text(CONFIG.format(port=port, command_timeout=COMMAND_TIMEOUT, per_ip=PER_IP,
                                  rate=RATE_PER_IP, max_connections=MAX_CONNECTIONS,
                                  dead_port=free_port()))
    return path


def maildir_count(root: Path) -> int:
    new = root / "var" / "mail" / "example.test" / "alice" / "new"
    return len(list(new.iterdir())) if new.exists() else 0


def wait_for_maildir(root: Path, count: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while maildir_count(root) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return maildir_count(root)


def test_normal_mail_flows_during_slowloris_and_flood(tmp_path):
    abuse = load_abuse_load()
    # Sockets of the attack (in subprocesses) and of the daemon: both inherit
    # this process's limit, which the daemon needs for MAX_CONNECTIONS sessions.
    assert abuse.raise_nofile(4096) >= MAX_CONNECTIONS + 512
    port = free_port()
    daemon = Daemon(tmp_path, write_config(tmp_path, port), port)
    daemon.start()
    try:
        options = abuse.Options(
            target=f"127.0.0.1:{port}", pid=daemon.proc.pid,
            slowloris=300, slow_interval=1.0, slow_ramp=5.0,
            flood_seconds=5.0, flood_concurrency=50, flood_timeout=3.0,
            normal_messages=MESSAGES, normal_timeout=15.0,
            sender="someone@remote.test", recipient="alice@example.test",
            linger=COMMAND_TIMEOUT + 1.5, settle=1.0, time_limit=60.0,
        )
        record = abuse.run(options)
        delivered = wait_for_maildir(tmp_path, MESSAGES)
        # A clean stop in time (twistd re-raises the SIGTERM it handled on its way out).
        assert daemon.terminate() in (0, -signal.SIGTERM)
    finally:
        daemon.kill()
    print("\n" + repr(record))
    normal, slow, flood, rss = record["normal"], record["slowloris"], record["flood"], record["rss_kb"]

    # Every normal message got 250 (after DATA) and reached the Maildir.
    assert (normal["sent"], normal["ok"], normal["failed"]) == (MESSAGES, MESSAGES, 0), normal
    assert delivered == MESSAGES

    # Slowloris: the first wave was opened; past PER_IP connections per source
    # address they were refused with 421 4.7.0; a held one never finished its
    # command, so the command timeout closed it with 421 4.4.2 at the latest
    # COMMAND_TIMEOUT after the greeting (plus scheduling slack under load),
    # although it sent a byte every second.
    assert "error" not in slow and slow["ready"], slow
    assert slow["greeted"] >= SLOW_SOURCES * PER_IP
    assert slow["held_max_at_once"] <= SLOW_SOURCES * PER_IP
    assert slow["refused"] >= slow["requested"] - SLOW_SOURCES * PER_IP
    assert all(r.startswith("421 4.7.0") for r in slow["refused_replies"]), slow
    assert slow["closed_by_server"] >= SLOW_SOURCES * PER_IP
    assert list(slow["closed_after_reply"]) == ["421 4.4.2 Timeout waiting for a command, closing connection"], slow
    assert slow["hold_s_max_closed"] <= COMMAND_TIMEOUT + 1.5, slow
    assert slow["hold_s_max_open"] is None or slow["hold_s_max_open"] <= COMMAND_TIMEOUT + 1.5, slow
    assert not slow["errors"], slow

    # Flood: each connection that read its first reply got 220 or a 421 4.7.0
    # refusal; no source got more than its per-minute allowance accepted.
    assert "error" not in flood, flood
    assert flood["attempted"] > FLOOD_SOURCES * RATE_PER_IP
    assert flood["refused"] > 0
    assert all(re.match(r"220 |421 4\.7\.0 ", r) for r in flood["first_replies"]), flood
    assert max(flood["accepted_by_source"].values()) <= RATE_PER_IP, flood
    assert flood["accepted"] <= FLOOD_SOURCES * RATE_PER_IP

    # Memory stayed bounded; the daemon still greets; nothing went wrong inside.
    assert rss["before"] > 0 and rss["peak"] - rss["before"] <= MAX_GROWTH_KB, rss
    assert rss["peak"] <= MAX_PEAK_KB, rss
    assert record["alive_after"]
    # twistd rotates its log every MB (the flood fills several): read every segment.
    segments = sorted(tmp_path.glob("twistd.log*"))
    assert segments
    for segment in segments:
        log = segment.read_text(errors="replace")
        assert "Traceback" not in log and "Unhandled" not in log, (segment, log[-5000:])
