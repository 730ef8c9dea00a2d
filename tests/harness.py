"""Test harness: a real MTA server on loopback ports, and blocking clients run in threads.

``start_mta(tmp_path, ...)`` builds a configuration in a temporary directory
(users, aliases, a trustme certificate), starts :class:`mta.daemon.service.MTAService`
on ephemeral 127.0.0.1 ports and returns a :class:`RunningMTA`.  Clients
(smtplib, raw sockets, swaks) are blocking, so tests run them with
``deferToThread`` while the reactor serves the MTA.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from mta.config import Config, config_from_dict
from mta.daemon.service import MTAService
from mta.queue.layout import open_message

PASSWORD = "correct horse battery staple"
DOMAIN = "example.test"

_CA: trustme.CA | None = None


def shared_ca() -> trustme.CA:
    global _CA
    if _CA is None:
        _CA = trustme.CA()
    return _CA


def client_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    shared_ca().configure_trust(ctx)
    return ctx


def write_domain(domains_dir: Path, domain: str, users: dict[str, str], aliases: str = "") -> None:
    from mta.policy.auth import add_user

    d = domains_dir / domain
    d.mkdir(parents=True, exist_ok=True)
    for user, password in users.items():
        add_user(d / "users", user, password)
    if aliases:
        (d / "aliases").write_text(aliases)


@dataclass
class RunningMTA:
    service: MTAService
    config: Config
    root: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def store(self):
        return self.service.context.store

    @property
    def context(self):
        return self.service.context

    def port(self, name: str = "mx") -> int:
        return self.ports[name]

    def queued(self) -> list[Any]:
        return list(self.store.envelopes())

    def message_bytes(self, queue_id: str) -> bytes:
        with open_message(self.store.data_path(queue_id)) as f:
            return f.read()

    async def stop(self) -> None:
        await self.service.stopService()
        # Let closing connections finish.
        deadline = time.monotonic() + 2
        while self.context.sessions and time.monotonic() < deadline:
            for s in list(self.context.sessions):
                s.transport.abortConnection()
            from twisted.internet.task import deferLater

            await deferLater(reactor, 0.01, lambda: None)


DEFAULT_ALIASES = """\
# test aliases
info: alice
team: alice, bob
outside: friend@remote.test
loop1: loop2
loop2: loop1
"""


def make_config(tmp_path: Path, **kwargs: Any) -> Config:
    return config_from_dict(make_raw_config(tmp_path, **kwargs), tmp_path)


def make_raw_config(tmp_path: Path, tls: bool = True, extra: dict[str, Any] | None = None,
                    aliases: str = DEFAULT_ALIASES, users: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the domain files and certificate; return the configuration as a dict."""
    domains = tmp_path / "domains"
    users = users if users is not None else {"alice": PASSWORD, "bob": PASSWORD}
    write_domain(domains, DOMAIN, users, aliases)
    raw: dict[str, Any] = {
        "hostname": "mx.example.test",
        "local_domains": [DOMAIN],
        "data_dir": str(tmp_path / "var"),
        "domains_dir": str(domains),
        "listeners": {
            "mx": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "mx"},
            "submission": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "submission"},
        },
        "spf": {"enabled": False},
        # Tests never query the machine's resolver: DNS goes to a dead loopback port
        # unless a test starts its own loopback DNS server.
        "dns": {"servers": ["127.0.0.1:9"], "timeout": 1.0},
        "dkim": {"verify": False},
        "dmarc": {"enabled": False},
        "limits": {"auth_failure_delay": 0.05, "command_timeout": 30.0},
    }
    if tls:
        cert = shared_ca().issue_cert("mx.example.test", "localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        for extra_pem in cert.cert_chain_pems[1:]:
            extra_pem.write_to_path(str(tmp_path / "cert.pem"), append=True)
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        raw["tls"] = {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")}
        raw["listeners"]["submissions"] = {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "submissions"}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


async def start_mta(tmp_path: Path, runner: Any = False, **kwargs: Any) -> RunningMTA:
    """Start the MTA in this process. ``runner=False`` keeps delivery off (queue only)."""
    raw = make_raw_config(tmp_path, **kwargs)
    config = config_from_dict(raw, tmp_path)
    service = MTAService(config, reactor=reactor, runner=runner,
                         loader=lambda: config_from_dict(raw, tmp_path))
    service.startService()
    await service.listening
    running = RunningMTA(service, config, tmp_path)
    for listener, port in zip(config.listeners, service.ports, strict=True):
        running.ports[listener.name] = port.getHost().port
    return running


# --- a blocking raw client, for byte-exact dialogs ----------------------------------


class RawClient:
    """A plain socket speaking bytes; read_reply() returns (code, full text)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 source: str | None = None) -> None:
        # ``source``: another loopback address (127.0.0.2, ...) to connect from.
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffered {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.read_line()
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.read_reply()

    def is_closed(self, wait: float = 2.0) -> bool:
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        self.buf += data
        return data == b""

    def starttls(self, hostname: str = "mx.example.test") -> None:
        self.sock = client_tls_context().wrap_socket(self.sock, server_hostname=hostname)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def message_files(msg_dir: Path) -> list[str]:
    """Names of the files in a queue's msg/ that are messages: not the store's
    spares (empty files it makes ahead of time, mode 0200), sorted."""
    names = []
    for p in msg_dir.iterdir() if msg_dir.exists() else ():
        try:
            if p.stat().st_mode & 0o400:
                names.append(p.name)
        except FileNotFoundError:
            pass  # removed meanwhile (a running daemon's queue)
    return sorted(names)


def in_thread(fn, *args, **kwargs):
    return deferToThread(fn, *args, **kwargs)
