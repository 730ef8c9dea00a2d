"""Run the real ``twistd -n mta`` daemon in a subprocess for black-box tests.

``Daemon(tmp_path, config_text)`` writes the configuration, starts twistd with
ephemeral-free fixed ports chosen by the test, waits (bounded) for the greeting,
and can be killed with SIGKILL or stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# The end of every daemon configuration the tests write: no SPF/DKIM/DMARC
# lookups and DNS pointed at a dead loopback port (tests never use the
# machine's resolver), and remote mail parked at a smarthost nobody listens on.
# A format string: the caller fills {dead_port} (free_port()).
QUIET_TAIL = """
[spf]
enabled = false

[dns]
servers = ["127.0.0.1:9"]
timeout = 1

[dkim]
verify = false

[dmarc]
enabled = false

[delivery]
# Nothing listens here: remote mail stays queued.
smarthosts = ["127.0.0.1:{dead_port}"]
retry_schedule = [3600]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


class Daemon:
    def __init__(self, root: Path, config_path: Path, port: int,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = env or {}  # added to the daemon's environment (SSL_CERT_FILE, ...)
        self.config_path = config_path
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log = root / "twistd.log"

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        env.update(self.env)
        self.proc = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "-l", str(self.log), "mta", "--config", str(self.config_path)],
            cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"twistd exited {self.proc.returncode}: {out}\n{self.read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("twistd did not greet in time:\n" + self.read_log())

    def read_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close()
        return code

    def _close(self) -> None:
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
