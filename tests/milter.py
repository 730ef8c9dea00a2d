"""Milters for the tests: a scripted one (any answer, any fault) and the real ones.

:class:`ScriptedMilter` is a small milter server in a thread on loopback that
speaks the wire format itself (independently of mta.policy.milter.codec): it
negotiates the actions and protocol flags a test gives, records every packet
it is sent (``commands``), and answers each command as the test's ``script``
says (by command letter: a list of replies, a callable, or a fault: "close",
"garbage", ("sleep", seconds)).

:func:`start_rspamd` and :func:`start_opendkim` start the Debian packages'
daemons with a minimal configuration in a temporary folder, on loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ALL_ACTIONS = 0x1FF


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def z(*values: str | bytes) -> bytes:
    return b"".join((v.encode() if isinstance(v, str) else v) + b"\0" for v in values)


CONTINUE = pkt(b"c")
ACCEPT = pkt(b"a")
REJECT = pkt(b"r")
TEMPFAIL = pkt(b"t")
DISCARD = pkt(b"d")


def replycode(text: str) -> bytes:
    return pkt(b"y", z(text))


def add_header(name: str, value: str) -> bytes:
    return pkt(b"h", z(name, value))


def change_header(index: int, name: str, value: str) -> bytes:
    return pkt(b"m", struct.pack("!I", index) + z(name, value))


def insert_header(index: int, name: str, value: str) -> bytes:
    return pkt(b"i", struct.pack("!I", index) + z(name, value))


def replace_body(data: bytes) -> bytes:
    return pkt(b"b", data)


def add_rcpt(address: str) -> bytes:
    return pkt(b"+", z(f"<{address}>"))


def del_rcpt(address: str) -> bytes:
    return pkt(b"-", z(f"<{address}>"))


def change_from(address: str) -> bytes:
    return pkt(b"e", z(f"<{address}>"))


def quarantine(reason: str) -> bytes:
    return pkt(b"q", z(reason))


class ScriptedMilter:
    """A milter that answers as scripted (see the module docstring)."""

    def __init__(self, script: dict[bytes, Any] | None = None, actions: int = ALL_ACTIONS,
                 protocol: int = 0, optneg: Any = None, unix: Path | None = None) -> None:
        self.script = script or {}
        self.actions, self.protocol, self.optneg = actions, protocol, optneg
        self.commands: list[tuple[bytes, bytes]] = []  # every packet received, all connections
        self.connections = 0
        self.progress = (0, 0.0)
        self.body = b""
        self.keep_body = True  # else only counted: body_size, chunk_sizes, body_hash
        self.body_size = 0
        self.chunk_sizes: set[int] = set()
        import hashlib

        self.body_hash = hashlib.sha256()
        if unix is not None:  # a Unix socket at that path: socket = "unix:/path"
            self._sock = socket.socket(socket.AF_UNIX)
            self._sock.bind(str(unix))
            self.port = 0
            self.socket = f"unix:{unix}"
        else:
            self._sock = socket.socket()
            self._sock.bind(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]
            self.socket = f"inet:127.0.0.1:{self.port}"
        self._sock.listen(16)
        self._stop = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[bytes]:
        return [c for c, _ in self.commands]

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while len(buf) < 4 or len(buf) - 4 < struct.unpack("!I", buf[:4])[0]:
                    data = conn.recv(1 << 20)
                    if not data:
                        return
                    buf += data
                (n,) = struct.unpack("!I", buf[:4])
                cmd, data, buf = buf[4:5], buf[5 : 4 + n], buf[4 + n :]
                self.commands.append((cmd, data if cmd != b"B" or self.keep_body else b""))
                if cmd == b"B":
                    if self.keep_body:
                        self.body += data
                    self.body_size += len(data)
                    self.chunk_sizes.add(len(data))
                    self.body_hash.update(data)
                if cmd == b"O":
                    if self.optneg is not None:
                        conn.sendall(self.optneg)
                    else:
                        conn.sendall(pkt(b"O", struct.pack("!III", 6, self.actions, self.protocol)))
                    continue
                if cmd in (b"D", b"A"):
                    continue  # macros and abort: no reply
                if cmd == b"Q":
                    return
                if not self._answer(conn, cmd, data):
                    return

    def _answer(self, conn: socket.socket, cmd: bytes, data: bytes) -> bool:
        action = self.script.get(cmd)
        if callable(action):
            action = action(data)
        if action is None:
            if self._no_reply(cmd):
                return True
            action = [CONTINUE]
        if action == "close":
            conn.close()
            return False
        if action == "garbage":
            conn.sendall(b"\xff\xff\xff\xffjunk")
            return True
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            action = [CONTINUE]
        if action == "silent":
            return True
        if action == "progress":  # SMFIR_PROGRESS every `every` s, `count` times, then CONTINUE
            count, every = self.progress
            for _ in range(count):
                time.sleep(every)
                conn.sendall(pkt(b"p"))
            action = [CONTINUE]
        conn.sendall(b"".join(action))
        return True

    def _no_reply(self, cmd: bytes) -> bool:
        flags = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
                 b"N": 0x40000, b"B": 0x80000, b"L": 0x80}
        return bool(self.protocol & flags.get(cmd, 0))

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            # (shutdown first: a close alone leaves the thread's accept() taking connections)
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} in {timeout}s")


class Daemon:
    """A started external milter: its socket (Postfix syntax), stopped by stop()."""

    def __init__(self, proc: subprocess.Popen, port: int, folder: Path) -> None:
        self.proc, self.port, self.folder = proc, port, folder
        self.socket = f"inet:127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# The Debian package's /etc/rspamd/rspamd.conf, with LOCAL_CONFDIR (and the run,
# log and database folders) pointed at a temporary folder whose local.d and
# override.d put every worker on loopback and turn off what needs Redis or DNS.
RSPAMD_LOCAL = {
    "override.d/worker-proxy.inc": (
        'bind_socket = "127.0.0.1:{port}";\nmilter = yes;\ntimeout = 120s;\ncount = 1;\n'
        'upstream "local" {{ default = yes; self_scan = yes; }}\n'),
    "override.d/worker-normal.inc": 'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n',
    "override.d/worker-controller.inc": 'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n',
    "override.d/logging.inc": 'type = "file";\nfilename = "{d}/rspamd.log";\nlevel = "info";\n',
    "local.d/options.inc": ('dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; '
                            'retransmits = 0; }}\nhs_cache_dir = "{d}/db";\n'
                            # A short public suffix list: the full one takes rspamd half a
                            # minute to compile at every start.
                            'url_tld = "{d}/tld.dat";\n'),
    "local.d/milter_headers.conf": (
        'use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", "x-spam-level", '
        '"x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n'),
    # The tests' mail comes from loopback: nothing is refused or skipped for that.
    "local.d/rbl.conf": "enabled = false;\n",
    "local.d/greylist.conf": "enabled = false;\n",
    "local.d/ratelimit.conf": "enabled = false;\n",
    "local.d/replies.conf": "enabled = false;\n",
}


def start_rspamd(folder: Path) -> Daemon:
    """rspamd with its proxy worker in milter mode (self-scan, no Redis), on loopback."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("db", "run", "local.d", "override.d"):
        (folder / sub).mkdir(exist_ok=True)
    ports = {"port": free_port(), "normal": free_port(), "controller": free_port(),
             "dns_port": free_port()}
    (folder / "tld.dat").write_text("com\norg\nnet\ntest\n")
    for name, text in RSPAMD_LOCAL.items():
        (folder / name).write_text(text.format(d=folder, **ports))
    proc = subprocess.Popen(
        ["rspamd", "-f", "-u", _user(), "-g", _group(), "--insecure",
         "-c", "/etc/rspamd/rspamd.conf", "--var", f"LOCAL_CONFDIR={folder}",
         "--var", f"DBDIR={folder}/db", "--var", f"RUNDIR={folder}/run",
         "--var", f"LOGDIR={folder}"],
        stdout=open(folder / "stdout.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_for_port(ports["port"], proc, "rspamd", timeout=60)
    return Daemon(proc, ports["port"], folder)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _group() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def start_opendkim(folder: Path, domain: str, selector: str) -> tuple[Daemon, str]:
    """OpenDKIM signing ``domain`` with a key made by opendkim-genkey; returns the
    daemon and the DNS TXT record's text for ``selector._domainkey.domain``."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["opendkim-genkey", "-b", "2048", "-d", domain, "-s", selector, "-D", str(folder)],
                   check=True)
    txt = (folder / f"{selector}.txt").read_text()
    record = "".join(part for part in txt.split('"')[1::2])
    port = free_port()
    conf = folder / "opendkim.conf"
    conf.write_text(
        f"Domain {domain}\nSelector {selector}\nKeyFile {folder}/{selector}.private\n"
        f"Socket inet:{port}@127.0.0.1\nMode sv\nCanonicalization relaxed/relaxed\n"
        f"PidFile {folder}/opendkim.pid\nUserID {_user()}\nSyslog no\nLogWhy yes\n"
        "InternalHosts 127.0.0.1\nRequireSafeKeys no\nBackground no\n")
    os.chmod(folder / f"{selector}.private", 0o600)
    proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)],
                            stdout=open(folder / "stdout.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_for_port(port, proc, "opendkim")
    return Daemon(proc, port, folder), record


def have(tool: str) -> bool:
    return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None


# --- one rspamd and one OpenDKIM per test session ------------------------------------

import pytest  # noqa: E402

DKIM_DOMAIN = "example.test"
DKIM_SELECTOR = "mta"


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory):
    daemon = start_rspamd(tmp_path_factory.mktemp("rspamd"))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def opendkim(tmp_path_factory):
    """(daemon, DNS TXT record of its key) for DKIM_SELECTOR._domainkey.DKIM_DOMAIN."""
    daemon, record = start_opendkim(tmp_path_factory.mktemp("opendkim"), DKIM_DOMAIN, DKIM_SELECTOR)
    yield daemon, record
    daemon.stop()
