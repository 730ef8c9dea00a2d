#!/usr/bin/env python3
"""Abuse under load: a slowloris attack and a connection flood while a normal client sends mail.

  abuse_load.py --target 127.0.0.1:2525 --pid PID --recipient user@your.domain [options]
  abuse_load.py --spawn WORKDIR [--limit command_timeout=20 ...] [options]

Three workloads against one MTA, at the same time, all on loopback:

* slowloris (a subprocess): --slowloris connections (2000) from --slow-sources
  (127.0.0.2-127.0.0.9), --slow-in-flight handshakes at a time; once greeted,
  each sends one byte of an EHLO command every --slow-interval seconds (5) and
  never gets to its CRLF in time.  A connection the server closes or refuses is
  opened again one interval later (--slow-reconnect), as an attacker would.
  Counted: attempts, greeted (held), refused at connect (their reply: 421 ...),
  closed by the server after the greeting (the last reply before: 421 4.4.2 ...),
  the longest a connection was held, the most held at once.
* flood (a subprocess): for --flood-seconds (60), --flood-concurrency (100)
  connections in flight from --flood-sources (127.0.0.10-127.0.0.20), each
  replaced as soon as it ends, in turn: connect then RST; connect, read the first
  reply, close; connect, read the first reply, send garbage, read to the close.
  Counted: attempted, connected, accepted (first reply 220), refused (421 ...),
  accepted per source address.
* normal (this process): --normal-messages (100) messages from --normal-source
  (127.0.0.100) with smtplib, one connection each, spread evenly over the flood;
  latency = connect .. the reply to the end of DATA.

The slowloris connections are opened first; the flood and the normal client
start once they are (or after --slow-ramp seconds); the slowloris goes on for
--linger seconds after both end.  Memory: VmRSS of --pid sampled every 0.2 s
(before, peak, after the attack's sockets are closed and --settle seconds) and
its VmHWM.  Then a new client must get the 220 greeting.  Prints one JSON line
(type "abuse_load"); exit status 1 when a normal message failed or the MTA no
longer greets.

--spawn WORKDIR starts a throw-away `twistd -n mta` from this checkout for the
run: a loopback-only configuration (no DNS, SPF, DKIM or DMARC lookups), local
domain abuse.test with user "normal" (the default recipient), [limits] from
--limit KEY=VALUE, and RLIMIT_NOFILE raised for it; it is stopped at the end
and the record says how many normal messages reached its Maildir.

Bounded: --time-limit (300 s) for the attack, after which its subprocesses
are killed; with --spawn, the daemon's start, the wait for the Maildir and its
stop take at most 30 s each.  Targets and source addresses must be loopback.
A full run (about 2 minutes):
  python3 bench/abuse_load.py --spawn /tmp/abuse-run --limit command_timeout=10
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import heapq
import ipaddress
import json
import os
import random
import resource
import selectors
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Linux: choose the source port at connect() time, per destination (ip(7)).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SLOW_COMMAND = b"EHLO slowloris.attacker.example\r\n"
# Bare CR/LF and control octets, then unknown commands: 500s until max_errors.
GARBAGE = (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n"
           + b"".join(b"XYZZY %d \xff\xfe junk\r\n" % i for i in range(12)))


@dataclass
class Options:
    """One run; the defaults are the full-size run."""

    target: str = "127.0.0.1:2525"
    pid: int | None = None
    slowloris: int = 2000
    slow_sources: str = "127.0.0.2-127.0.0.9"
    slow_interval: float = 5.0
    slow_in_flight: int = 64
    slow_reconnect: bool = True
    slow_ramp: float = 30.0
    greeting_timeout: float = 10.0
    flood_seconds: float = 60.0
    flood_sources: str = "127.0.0.10-127.0.0.20"
    flood_concurrency: int = 100
    flood_timeout: float = 5.0
    normal_messages: int = 100
    normal_source: str = "127.0.0.100"
    normal_interval: float | None = None  # None: flood_seconds / normal_messages
    normal_timeout: float = 30.0
    sender: str = "normal@client.test"
    recipient: str = "normal@abuse.test"
    linger: float = 5.0
    settle: float = 2.0
    time_limit: float = 300.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return split_hostport(self.target)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.target)[1]


# --- small helpers --------------------------------------------------------------


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def require_loopback(host: str, what: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"{what} {host} is not a loopback address; this test only "
                         "sends traffic within 127.0.0.0/8 or ::1")


def address_range(spec: str) -> list[str]:
    """'127.0.0.2-127.0.0.9', '127.0.0.2-9' or 'a,b,c' -> addresses (loopback only)."""
    out: list[str] = []
    for item in spec.split(","):
        first, sep, last = item.strip().partition("-")
        start = ipaddress.IPv4Address(first)
        if not sep:
            end = start
        elif "." in last:
            end = ipaddress.IPv4Address(last)
        else:
            end = ipaddress.IPv4Address(int(start) & ~0xFF | int(last))
        if end < start or int(end) - int(start) > 4096:
            raise SystemExit(f"bad address range {item!r}")
        for n in range(int(start), int(end) + 1):
            out.append(str(ipaddress.IPv4Address(n)))
    for a in out:
        require_loopback(a, "source")
    return out


def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE to ``needed`` if possible (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    for target in (needed, hard):
        if target == resource.RLIM_INFINITY or target < soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            break
        except (ValueError, OSError):
            continue  # raising the hard limit needs CAP_SYS_RESOURCE: take what there is
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reply_end(buf: bytes) -> tuple[bytes | None, bytes]:
    """The last line of the first complete reply in ``buf`` and what follows it."""
    start = 0
    while True:
        end = buf.find(b"\r\n", start)
        if end < 0:
            return None, buf
        line = buf[start:end]
        start = end + 2
        if len(line) == 3 or line[3:4] == b" ":
            return line, buf[start:]


def reply_key(line: bytes) -> str:
    return line[:72].decode("ascii", "replace")


def connect_socket(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((source, 0))
    return s


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def read_memory_kb(pid: int | None) -> dict[str, int]:
    """VmRSS and VmHWM of one process in KiB (zeros when unknown)."""
    out = {"rss": 0, "hwm": 0}
    if not pid:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


class RSSSampler(threading.Thread):
    """Samples VmRSS every ``interval`` seconds and keeps the peak."""

    def __init__(self, pid: int | None, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = read_memory_kb(pid)["rss"]
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, read_memory_kb(self.pid)["rss"])

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return max(self.peak, read_memory_kb(self.pid)["rss"])


def greets(host: str, port: int, timeout: float = 10.0, source: str = "127.0.0.1") -> bool:
    """A new client gets a 220 greeting (within ``timeout``), then says QUIT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=3, source_address=(source, 0)) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                buf = b""
                line = None
                while line is None and len(buf) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                    line, _ = reply_end(buf)
                if line is not None and line.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


# --- slowloris ---------------------------------------------------------------------


class SlowConn:
    __slots__ = ("sock", "source", "state", "buf", "opened", "greeted", "pos", "last_reply")

    def __init__(self, sock: socket.socket, source: str, now: float) -> None:
        self.sock = sock
        self.source = source
        self.state = "connecting"  # -> greeting -> held -> closed
        self.buf = b""
        self.opened = now
        self.greeted = 0.0
        self.pos = 0
        self.last_reply = ""


def run_slowloris(o: Options, budget: float, stop_fd: int | None = None,
                  ready: Any = None) -> dict[str, Any]:
    """Hold --slowloris connections, trickling bytes, until ``stop_fd`` reads EOF or
    ``budget`` seconds pass.  ``ready()`` is called once the first wave is opened."""
    t0 = time.monotonic()
    deadline = t0 + budget
    host, port = o.host, o.port
    sources = address_range(o.slow_sources)
    sel = selectors.DefaultSelector()
    if stop_fd is not None:
        sel.register(stop_fd, selectors.EVENT_READ, None)
    to_open: deque[float] = deque([t0] * o.slowloris)
    in_flight: dict[SlowConn, float] = {}
    held: set[SlowConn] = set()
    sends: list[tuple[float, int, SlowConn]] = []
    seq = 0
    attempts = greeted = max_held = 0
    refused: Counter = Counter()
    closed_after: Counter = Counter()  # last reply before the server closed a held connection
    replies: Counter = Counter()  # every reply after the greeting
    errors: Counter = Counter()
    holds_closed: list[float] = []
    first_wave_done = False
    stopping = False

    def finish(c: SlowConn, now: float) -> None:
        in_flight.pop(c, None)
        held.discard(c)
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.state = "closed"
        if o.slow_reconnect and not stopping:
            to_open.append(now + o.slow_interval)

    def open_one(now: float) -> None:
        nonlocal attempts
        source = sources[attempts % len(sources)]
        attempts += 1
        s = connect_socket(source)
        rc = s.connect_ex((host, port))
        c = SlowConn(s, source, now)
        if rc not in (0, errno.EINPROGRESS):
            errors[f"connect: {errname(rc)}"] += 1
            finish(c, now)
            return
        in_flight[c] = now
        sel.register(s, selectors.EVENT_WRITE, c)

    def readable(c: SlowConn, now: float) -> None:
        nonlocal greeted, max_held, seq
        try:
            data = c.sock.recv(4096)
        except OSError as e:
            data = b""
            errors[f"recv: {errname(e.errno or 0)}"] += 1
        if not data:
            if c.state == "held":
                holds_closed.append(now - c.greeted)
                closed_after[c.last_reply or "(closed without a reply)"] += 1
            else:
                errors["closed before the greeting"] += 1
            finish(c, now)
            return
        c.buf += data
        while True:
            line, c.buf = reply_end(c.buf)
            if line is None:
                return
            if c.state == "greeting":
                if line.startswith(b"220"):
                    c.state, c.greeted = "held", now
                    greeted += 1
                    in_flight.pop(c, None)
                    held.add(c)
                    max_held = max(max_held, len(held))
                    seq += 1
                    heapq.heappush(sends, (now + random.uniform(0, o.slow_interval), seq, c))
                else:
                    refused[reply_key(line)] += 1
                    finish(c, now)
                    return
            else:
                c.last_reply = reply_key(line)
                replies[c.last_reply] += 1

    while True:
        now = time.monotonic()
        if now >= deadline or stopping:
            break
        while to_open and to_open[0] <= now and len(in_flight) < o.slow_in_flight:
            to_open.popleft()
            try:
                open_one(now)
            except OSError as e:
                errors[f"socket: {errname(e.errno or 0)}"] += 1
        if not first_wave_done and (attempts >= o.slowloris and not in_flight
                                    or now - t0 > o.slow_ramp):
            first_wave_done = True
            if ready is not None:
                ready()
        waits = [0.2, deadline - now]
        if sends:
            waits.append(sends[0][0] - now)
        if to_open and len(in_flight) < o.slow_in_flight:
            waits.append(to_open[0] - now)
        for key, _mask in sel.select(max(0.0, min(waits))):
            c = key.data
            if c is None:
                if not os.read(stop_fd, 64):
                    stopping = True
                continue
            now = time.monotonic()
            if c.state == "connecting":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    errors[f"connect: {errname(err)}"] += 1
                    finish(c, now)
                else:
                    c.state = "greeting"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            elif c.state != "closed":
                readable(c, now)
        now = time.monotonic()
        while sends and sends[0][0] <= now:
            _, _, c = heapq.heappop(sends)
            if c.state != "held":
                continue
            try:
                c.sock.send(SLOW_COMMAND[c.pos : c.pos + 1])
                c.pos = (c.pos + 1) % len(SLOW_COMMAND)
            except OSError as e:
                if c.state == "held":
                    holds_closed.append(now - c.greeted)
                    closed_after[c.last_reply or f"(send: {errname(e.errno or 0)})"] += 1
                finish(c, now)
                continue
            seq += 1
            heapq.heappush(sends, (now + o.slow_interval, seq, c))
        for c, since in list(in_flight.items()):
            if now - since > o.greeting_timeout:
                errors["no greeting in time"] += 1
                finish(c, now)
    stopping = True
    end = time.monotonic()
    open_holds = [end - c.greeted for c in held]
    for c in list(held) + list(in_flight):
        finish(c, end)
    sel.close()
    return {
        "requested": o.slowloris, "interval_s": o.slow_interval, "attempts": attempts,
        "greeted": greeted, "held_max_at_once": max_held, "open_at_end": len(open_holds),
        "refused": sum(refused.values()), "refused_replies": dict(refused.most_common(8)),
        "closed_by_server": len(holds_closed), "closed_after_reply": dict(closed_after.most_common(8)),
        "replies_while_held": dict(replies.most_common(8)),
        "hold_s_max_closed": round(max(holds_closed), 2) if holds_closed else None,
        "hold_s_p50_closed": round(percentile(holds_closed, 0.5), 2) if holds_closed else None,
        "hold_s_max_open": round(max(open_holds), 2) if open_holds else None,
        "errors": dict(errors.most_common(8)), "seconds": round(end - t0, 2),
    }


# --- flood -------------------------------------------------------------------------


class FloodConn:
    __slots__ = ("sock", "source", "mode", "state", "buf", "started")

    def __init__(self, sock: socket.socket, source: str, mode: str, now: float) -> None:
        self.sock = sock
        self.source = source
        self.mode = mode  # rst | greet | garbage
        self.state = "connecting"  # -> first -> garbage
        self.buf = b""
        self.started = now


def run_flood(o: Options, budget: float) -> dict[str, Any]:
    """Open connections as fast as they complete for --flood-seconds."""
    t0 = time.monotonic()
    end = t0 + min(o.flood_seconds, budget)
    hard_end = t0 + min(budget, o.flood_seconds + o.flood_timeout + 1)
    host, port = o.host, o.port
    sources = address_range(o.flood_sources)
    modes = ("rst", "greet", "garbage")
    sel = selectors.DefaultSelector()
    live: dict[FloodConn, None] = {}
    c_ = Counter()  # attempted, connected, accepted, refused, rst, ...
    first: Counter = Counter()
    last_after_garbage: Counter = Counter()
    errors: Counter = Counter()
    accepted_by: Counter = Counter()
    refused_by: Counter = Counter()
    next_expiry = t0 + 0.5

    def close(c: FloodConn, rst: bool = False) -> None:
        live.pop(c, None)
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        if rst:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.sock.close()

    def open_one(now: float) -> None:
        n = c_["attempted"]
        c_["attempted"] += 1
        source = sources[n % len(sources)]
        s = connect_socket(source)
        c = FloodConn(s, source, modes[(n // len(sources)) % len(modes)], now)
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            errors[f"connect: {errname(rc)}"] += 1
            s.close()
            return
        live[c] = None
        sel.register(s, selectors.EVENT_WRITE, c)

    def on_event(c: FloodConn) -> None:
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                errors[f"connect: {errname(err)}"] += 1
                close(c)
                return
            c_["connected"] += 1
            if c.mode == "rst":
                c_["reset_after_connect"] += 1
                close(c, rst=True)
                return
            c.state = "first"
            sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        try:
            data = c.sock.recv(4096)
        except OSError as e:
            data = b""
            errors[f"recv ({c.state}): {errname(e.errno or 0)}"] += 1
        if not data:
            if c.state == "first":
                errors["closed before the first reply"] += 1
            else:
                c_["garbage_closed_by_server"] += 1
            close(c)
            return
        c.buf += data
        while True:
            line, c.buf = reply_end(c.buf)
            if line is None:
                return
            if c.state == "first":
                first[reply_key(line)] += 1
                if line.startswith(b"220"):
                    c_["accepted"] += 1
                    accepted_by[c.source] += 1
                    if c.mode == "greet":
                        close(c)
                        return
                    c.state = "garbage"
                    try:
                        c.sock.send(GARBAGE)
                    except OSError as e:
                        errors[f"send garbage: {errname(e.errno or 0)}"] += 1
                        close(c)
                        return
                else:
                    c_["refused"] += 1
                    refused_by[c.source] += 1
                    close(c)
                    return
            else:
                last_after_garbage[reply_key(line)] += 1

    while True:
        now = time.monotonic()
        if now >= hard_end or (now >= end and not live):
            break
        if now < end:
            while len(live) < o.flood_concurrency:
                try:
                    open_one(now)
                except OSError as e:
                    errors[f"socket: {errname(e.errno or 0)}"] += 1
                    break
        for key, _mask in sel.select(0.05):
            if key.data in live:
                on_event(key.data)
        if now >= next_expiry:
            next_expiry = now + 0.5
            for c in list(live):
                if now - c.started > o.flood_timeout:
                    errors[f"timed out ({c.state})"] += 1
                    close(c)
    for c in list(live):
        errors[f"unfinished ({c.state})"] += 1
        close(c)
    sel.close()
    seconds = time.monotonic() - t0
    return {
        "seconds": round(seconds, 2), "concurrency": o.flood_concurrency,
        "attempted": c_["attempted"], "rate_per_s": round(c_["attempted"] / max(seconds, 1e-9), 1),
        "connected": c_["connected"], "reset_after_connect": c_["reset_after_connect"],
        "read_first_reply": c_["accepted"] + c_["refused"],
        "accepted": c_["accepted"], "refused": c_["refused"],
        "first_replies": dict(first.most_common(8)),
        "replies_after_garbage": dict(last_after_garbage.most_common(8)),
        "garbage_closed_by_server": c_["garbage_closed_by_server"],
        "accepted_by_source": dict(sorted(accepted_by.items())),
        "refused_by_source": dict(sorted(refused_by.items())),
        "errors": dict(errors.most_common(8)),
    }


# --- normal client -----------------------------------------------------------------


def send_one(o: Options, i: int, timeout: float) -> str:
    """One message on a fresh connection; returns "250" or what went wrong."""
    body = (f"From: <{o.sender}>\r\nTo: <{o.recipient}>\r\nSubject: abuse_load normal {i}\r\n"
            f"Message-Id: <abuse.{os.getpid()}.{i}.{int(time.time())}@client.test>\r\n\r\n"
            + "a normal message while the server is under attack\r\n" * 10).encode()
    with smtplib.SMTP(o.host, o.port, local_hostname="normal.client.test", timeout=timeout,
                      source_address=(o.normal_source, 0)) as s:
        code, _ = s.ehlo()
        if code != 250:
            return f"EHLO {code}"
        code, text = s.mail(o.sender)
        if code != 250:
            return f"MAIL {code} {text[:60].decode('ascii', 'replace')}"
        code, text = s.rcpt(o.recipient)
        if code not in (250, 251):
            return f"RCPT {code} {text[:60].decode('ascii', 'replace')}"
        code, text = s.data(body)
        return "250" if code == 250 else f"DATA {code} {text[:60].decode('ascii', 'replace')}"


def run_normal(o: Options, budget: float) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = t0 + budget
    n = o.normal_messages
    interval = o.normal_interval if o.normal_interval is not None else o.flood_seconds / max(n, 1)
    latencies: list[float] = []
    failures: Counter = Counter()
    sent = 0
    for i in range(n):
        pause = t0 + i * interval - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if left <= 1:
            failures["not sent: time limit"] += n - i
            break
        sent += 1
        start = time.monotonic()
        try:
            outcome = send_one(o, i, min(o.normal_timeout, left))
        except (smtplib.SMTPException, OSError) as e:
            outcome = f"{type(e).__name__}: {e}"[:80]
        if outcome == "250":
            latencies.append(time.monotonic() - start)
        else:
            failures[outcome] += 1
    ms = [x * 1000 for x in latencies]
    return {
        "messages": n, "sent": sent, "ok": len(latencies), "failed": n - len(latencies),
        "failures": dict(failures.most_common(8)),
        "latency_ms": {"p50": _round(percentile(ms, 0.5)), "p90": _round(percentile(ms, 0.9)),
                       "max": _round(max(ms) if ms else None)},
        "seconds": round(time.monotonic() - t0, 2),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# --- the run -----------------------------------------------------------------------


def _spawn_role(role: str, o: Options, budget: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--role", role,
         "--role-options", json.dumps(asdict(o)), "--role-budget", str(budget)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _collect(proc: subprocess.Popen, timeout: float, what: str) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        return {"error": f"{what} killed at the time limit"}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"{what} exited {proc.returncode} without a result"}


def _wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait (bounded) for the slowloris subprocess to say its first wave is open."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # read the raw pipe: communicate() reads it later
    deadline = time.monotonic() + timeout
    got = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while not got.endswith(b"\n") and len(got) < 6:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                return False
            chunk = os.read(fd, 6 - len(got))
            if not chunk:
                return False
            got += chunk
        return got == b"ready\n"
    finally:
        sel.close()


def run(o: Options) -> dict[str, Any]:
    """The whole attack against ``o.target``; returns the record printed as JSON."""
    require_loopback(o.host, "target")
    require_loopback(o.normal_source, "normal source")
    for spec in (o.slow_sources, o.flood_sources):
        address_range(spec)
    nofile = raise_nofile(o.slowloris + o.flood_concurrency + 512)
    t0 = time.monotonic()
    deadline = t0 + o.time_limit
    sampler = RSSSampler(o.pid)
    before = read_memory_kb(o.pid)
    sampler.start()
    slow = _spawn_role("slowloris", o, o.time_limit - 5)
    flood: subprocess.Popen | None = None
    try:
        ready = _wait_ready(slow, min(o.slow_ramp + 10, deadline - time.monotonic()))
        ramp_s = time.monotonic() - t0
        flood = _spawn_role("flood", o, max(1.0, deadline - time.monotonic() - 5))
        normal = run_normal(o, max(1.0, deadline - time.monotonic() - 10))
        flood_rec = _collect(flood, deadline - time.monotonic(), "flood")
        time.sleep(max(0.0, min(o.linger, deadline - time.monotonic() - 5)))
        # communicate() closes its stdin: on that EOF the slowloris subprocess
        # closes its sockets and reports.
        slow_rec = _collect(slow, deadline - time.monotonic(), "slowloris")
    finally:
        for p in (slow, flood):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    peak = sampler.stop()
    time.sleep(max(0.0, min(o.settle, deadline - time.monotonic())))
    after = read_memory_kb(o.pid)
    alive = greets(o.host, o.port, timeout=max(1.0, min(15.0, deadline - time.monotonic())))
    slow_rec["ramp_s"] = round(ramp_s, 2)
    slow_rec["ready"] = ready
    return {
        "type": "abuse_load", "target": o.target, "nofile": nofile,
        "normal": normal, "slowloris": slow_rec, "flood": flood_rec,
        "rss_kb": {"before": before["rss"], "peak": max(peak, after["rss"]), "after": after["rss"],
                   "hwm": after["hwm"]},
        "alive_after": alive, "seconds": round(time.monotonic() - t0, 2),
        **o.extra,
    }


def _role_main(role: str, options: str, budget: float) -> None:
    o = Options(**json.loads(options))
    raise_nofile(o.slowloris + o.flood_concurrency + 512)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (EOF on stdin)
    if role == "slowloris":
        def ready() -> None:
            os.write(sys.stdout.fileno(), b"ready\n")  # one write: print() may make two

        rec = run_slowloris(o, budget, stop_fd=sys.stdin.fileno(), ready=ready)
    else:
        rec = run_flood(o, budget)
    print(json.dumps(rec), flush=True)


# --- --spawn: a throw-away daemon ---------------------------------------------------

SPAWN_CONFIG = """\
hostname = "abuse-mta.test"
local_domains = ["abuse.test"]
data_dir = "var"
domains_dir = "domains"

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
{limits}

[spf]
enabled = false

[dns]
servers = ["127.0.0.1:9"]   # nothing leaves the machine
timeout = 1

[dkim]
verify = false

[dmarc]
enabled = false

[delivery]
smarthosts = ["127.0.0.1:9"]
retry_schedule = [3600]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the daemon if this script dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def spawn_daemon(workdir: Path, limits: dict[str, str], nofile: int) -> tuple[subprocess.Popen, int]:
    """Start ``twistd -n mta`` from this checkout in ``workdir``; wait for its greeting."""
    sys.path.insert(0, str(ROOT))
    from mta.policy.auth import add_user

    marker = workdir / ".abuse_load-workdir"
    if workdir.exists() and any(workdir.iterdir()):
        if not marker.exists():
            raise SystemExit(f"--spawn {workdir}: not empty and not made by abuse_load.py; "
                             "give a new directory")
        shutil.rmtree(workdir)  # a previous run's: start afresh
    (workdir / "domains" / "abuse.test").mkdir(parents=True)
    marker.touch()
    add_user(workdir / "domains" / "abuse.test" / "users", "normal", "not-used-here")
    port = _free_port()
    (workdir / "mta.toml").write_text(SPAWN_CONFIG.format(
        port=port, limits="\n".join(f"{k} = {v}" for k, v in limits.items())))
    raise_nofile(nofile)
    twistd = Path(sys.executable).parent / "twistd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(workdir / "stdout.log", "wb")
    proc = subprocess.Popen(
        [str(twistd) if twistd.exists() else "twistd", "-n", "--pidfile=", "-l", "twistd.log",
         "mta", "--config", "mta.toml"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    log.close()
    if not greets("127.0.0.1", port, timeout=30):
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"the spawned daemon did not greet; see {workdir}/twistd.log")
    return proc, port


def maildir_count(workdir: Path) -> int:
    new = workdir / "var" / "mail" / "abuse.test" / "normal" / "new"
    return len(list(new.iterdir())) if new.exists() else 0


def main() -> None:
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="host:port of the MTA (loopback)")
    ap.add_argument("--pid", type=int, help="the MTA's pid, for its memory")
    ap.add_argument("--spawn", metavar="WORKDIR", help="start a throw-away twistd -n mta there")
    ap.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                    help="[limits] of the spawned daemon (repeatable)")
    ap.add_argument("--slowloris", type=int, default=d.slowloris)
    ap.add_argument("--slow-sources", default=d.slow_sources)
    ap.add_argument("--slow-interval", type=float, default=d.slow_interval)
    ap.add_argument("--slow-in-flight", type=int, default=d.slow_in_flight)
    ap.add_argument("--slow-reconnect", action=argparse.BooleanOptionalAction, default=d.slow_reconnect)
    ap.add_argument("--slow-ramp", type=float, default=d.slow_ramp)
    ap.add_argument("--flood-seconds", type=float, default=d.flood_seconds)
    ap.add_argument("--flood-sources", default=d.flood_sources)
    ap.add_argument("--flood-concurrency", type=int, default=d.flood_concurrency)
    ap.add_argument("--flood-timeout", type=float, default=d.flood_timeout)
    ap.add_argument("--normal-messages", type=int, default=d.normal_messages)
    ap.add_argument("--normal-source", default=d.normal_source)
    ap.add_argument("--normal-interval", type=float, default=None)
    ap.add_argument("--normal-timeout", type=float, default=d.normal_timeout)
    ap.add_argument("--sender", default=d.sender)
    ap.add_argument("--recipient", default=d.recipient)
    ap.add_argument("--linger", type=float, default=d.linger)
    ap.add_argument("--settle", type=float, default=d.settle)
    ap.add_argument("--time-limit", type=float, default=d.time_limit)
    ap.add_argument("--out", help="also append the JSON line to this file")
    ap.add_argument("--role", choices=("slowloris", "flood"), help=argparse.SUPPRESS)
    ap.add_argument("--role-options", help=argparse.SUPPRESS)
    ap.add_argument("--role-budget", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        _role_main(a.role, a.role_options, a.role_budget)
        return
    if not a.spawn and not a.target:
        ap.error("--target (and --pid) or --spawn WORKDIR is required")
    o = Options(
        target=a.target or "", pid=a.pid, slowloris=a.slowloris, slow_sources=a.slow_sources,
        slow_interval=a.slow_interval, slow_in_flight=a.slow_in_flight,
        slow_reconnect=a.slow_reconnect, slow_ramp=a.slow_ramp, flood_seconds=a.flood_seconds,
        flood_sources=a.flood_sources, flood_concurrency=a.flood_concurrency,
        flood_timeout=a.flood_timeout, normal_messages=a.normal_messages,
        normal_source=a.normal_source, normal_interval=a.normal_interval,
        normal_timeout=a.normal_timeout, sender=a.sender, recipient=a.recipient,
        linger=a.linger, settle=a.settle, time_limit=a.time_limit,
    )
    if a.target:
        require_loopback(o.host, "target")
    daemon: subprocess.Popen | None = None
    workdir = Path(a.spawn).resolve() if a.spawn else None
    try:
        if workdir is not None:
            limits = dict(item.split("=", 1) for item in a.limit)
            daemon, port = spawn_daemon(workdir, limits, o.slowloris + o.flood_concurrency + 4096)
            o.target, o.pid = f"127.0.0.1:{port}", daemon.pid
            o.extra = {"spawned": {"workdir": str(workdir), "limits": limits}}
        rec = run(o)
        if workdir is not None:
            deadline = time.monotonic() + 30
            while maildir_count(workdir) < rec["normal"]["ok"] and time.monotonic() < deadline:
                time.sleep(0.2)
            rec["normal"]["delivered_to_maildir"] = maildir_count(workdir)
            # twistd rotates its log every MB: read every segment.
            logs = sorted(workdir.glob("twistd.log*"))
            rec["spawned"]["log_files"] = len(logs)
            rec["spawned"]["log_tracebacks"] = sum(
                f.read_text(errors="replace").count("Traceback") for f in logs)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
    line = json.dumps(rec)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    if rec["normal"]["failed"] or not rec["alive_after"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
