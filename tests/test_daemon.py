"""The real ``twistd -n mta`` process: start-up, configuration errors, durability.

These tests are blocking and talk to a subprocess, so they run no reactor code.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from pathlib import Path

from mta.queue.layout import load_envelope
from tests.daemon import QUIET_TAIL, Daemon, free_port, twistd
from tests.harness import PASSWORD, write_domain

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
{extra}

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"
""" + QUIET_TAIL


def write_config(root: Path, port: int, extra: str = "") -> Path:
    write_domain(root / "domains", "example.test", {"alice": PASSWORD})
    path = root / "mta.toml"
    path.write_text(CONFIG.format(port=port, extra=extra, dead_port=free_port()))
    return path


def run_twistd(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run([twistd(), "-n", "--pidfile=", "mta", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_bad_configuration_names_the_key_without_traceback(tmp_path):
    path = write_config(tmp_path, free_port())
    path.write_text(path.read_text().replace("max_message_size", "x") + "\n[limits]\nmax_recipients = -1\n")
    result = run_twistd(tmp_path, "--config", str(path))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "limits.max_recipients: must be greater than zero" in output
    assert "Traceback" not in output


def test_unknown_key_and_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('hostname = "x"\nlisteners = 3\n')
    result = run_twistd(tmp_path, "--config", str(path))
    assert "listeners: must be a table" in result.stderr and "Traceback" not in result.stderr
    path.write_text('hostname = "x\n')
    result = run_twistd(tmp_path, "--config", str(path))
    assert "not valid TOML" in result.stderr and "Traceback" not in result.stderr
    path.write_text('hostnme = "x"\n')
    result = run_twistd(tmp_path, "--config", str(path))
    assert "hostnme: unknown key" in result.stderr


def test_message_survives_sigkill_right_after_250(tmp_path):
    port = free_port()
    # A relayed recipient whose smarthost is down: the message must stay queued.
    config = write_config(tmp_path, port, extra='relay_networks = ["127.0.0.0/8"]')
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            s.rcpt("friend@remote.test")
            code, text = s.data(b"Subject: durable\r\n\r\nkeep me\r\n")
            # SIGKILL the moment the 250 is read: no chance to flush anything.
            daemon.kill()
        assert code == 250
        queue_id = text.decode().split()[-1]
    finally:
        daemon.kill()
    msg = tmp_path / "var" / "queue" / "msg"
    assert load_envelope(msg, queue_id).recipients[0].address == "friend@remote.test"
    assert (msg / f"{queue_id}.msg").read_bytes().endswith(b"Subject: durable\r\n\r\nkeep me\r\n")
    # A restarted daemon finds it in its queue (and leftover tmp files are cleaned).
    (tmp_path / "var" / "queue" / "tmp" / "leftover.msg").write_bytes(b"half")
    daemon.start()
    try:
        assert (msg / f"{queue_id}.msg").exists()
        # (Not "tmp/ is empty": the restarted daemon's first delivery attempt may
        # be writing the message's new state there by now.)
        assert not (tmp_path / "var" / "queue" / "tmp" / "leftover.msg").exists()
    finally:
        daemon.kill()


def test_embedded_demo_configuration_starts(tmp_path):
    """What `make run` starts: no --config, everything under ./var."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    # Use other ports than the demo's defaults so a running demo does not interfere.
    ports = {name: free_port() for name in ("mx", "submission", "submissions")}
    args = [twistd(), "-n", "--pidfile=", "-l", "twistd.log", "mta"]
    for name, port in ports.items():
        args += ["--listen", f"{name}=tcp:{port}:interface=127.0.0.1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    daemon = Daemon(tmp_path, tmp_path / "unused", ports["mx"])
    daemon.proc = proc
    try:
        import socket
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", ports["mx"]), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=10) as s:
            s.sendmail("someone@remote.test", ["demo@demo.test"], b"Subject: demo\r\n\r\nhello\r\n")
        password = (tmp_path / "var" / "demo-password.txt").read_text().strip()
        import ssl

        ctx = ssl.create_default_context(cafile=str(tmp_path / "var" / "tls" / "cert.pem"))
        ctx.check_hostname = False
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as s:
            s.starttls(context=ctx)
            s.login("demo@demo.test", password)
        assert (tmp_path / "var" / "queue" / "msg").exists()
    finally:
        daemon.kill()
    assert sys.executable
