#!/usr/bin/env python3
"""Many concurrent idle SMTP sessions against one MTA, and its memory while they are open.

  idle_sessions.py --state WORKDIR [--sessions 10000] [--label ours] [--out FILE]
  idle_sessions.py --target 127.0.0.1:32525 --sink 127.0.0.1:32526 --pid PID

Steps, each bounded in time:

1. raise RLIMIT_NOFILE for this process (the MTA needs its own ``ulimit -n``);
2. start smtp-sink on the MTA's relay address (the sink of start_mta.py);
3. open --sessions TCP connections to the MTA, at most --in-flight handshakes at
   a time (so the listen backlog does not overflow; an attempt left without a
   greeting is made again), spread over --sources loopback source addresses
   (127.0.0.2, 127.0.0.3, ...), and read each 220 greeting; then leave them
   idle for --hold seconds;
4. send one normal message with smtplib through a fresh connection and check
   that DATA gets 250 and that the message reaches the sink;
5. send NOOP on every idle session and count the 250 replies (they are still
   served, not only still open);
6. read the MTA's memory (VmRSS, VmHWM of its processes; wrappers such as
   ``timeout`` excluded) before, with all sessions open, and after closing
   them; close every socket; check the MTA still greets a new client.

Prints one JSON line (type ``idle_sessions``; summarize.py shows it). ``ok`` is
true when every session was greeted and answered NOOP, the message got 250 and
reached the sink, and the MTA's peak RSS stayed under --max-rss-mib (1024).
Loopback only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import smtplib
import socket
import sys
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # leave no __pycache__ beside the scripts
import benchlib  # noqa: E402
from run_load import Sink  # noqa: E402

# Linux: choose the source port at connect() time, per destination (ip(7)).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Session:
    """One client connection: connecting, then reading its greeting or a reply."""

    __slots__ = ("sock", "state", "buf", "error", "connected")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = "connecting"  # -> greeting -> idle | failed; idle -> noop -> noop-ok
        self.buf = b""
        self.error = ""
        self.connected = False


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    want = needed if hard == resource.RLIM_INFINITY else max(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        # not root: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def mta_memory(cgroup: str | None, pid: int | None) -> dict[str, int]:
    if cgroup:
        m = benchlib.cgroup_memory(cgroup)
        return {"rss_kb": m["rss_kb"], "hwm_kb": m["hwm_kb_max"], "procs": m["procs"]}
    m = benchlib.proc_memory_kb(pid) if pid else None
    return {"rss_kb": m["rss"], "hwm_kb": m["hwm"], "procs": 1} if m else \
        {"rss_kb": 0, "hwm_kb": 0, "procs": 0}


def complete_reply(buf: bytes) -> bytes | None:
    """The last line of a complete SMTP reply in ``buf`` ("250 ok"), or None."""
    lines = buf.split(b"\r\n")
    for line in lines[:-1]:
        if len(line) >= 4 and line[3:4] == b" ":
            return line
        if len(line) == 3:
            return line
    return None


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs/ACKs dropped because an accept queue was full."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(rows[0], rows[1], strict=False)).get("ListenOverflows", 0))
    except (OSError, IndexError, ValueError):
        return 0


def open_sessions(a: argparse.Namespace, host: str, port: int) -> tuple[list[Session], Counter, float, int]:
    """Connect and read greetings, at most a.in_flight handshakes at a time.

    An attempt without a greeting after --greeting-timeout is closed and made
    again: when the MTA's accept queue overflows, the kernel drops the client's
    ACK, and after its SYN-ACK retries the server forgets a connection that the
    client still believes open (it would wait for a greeting for ever).
    """
    sel = selectors.DefaultSelector()
    sessions: list[Session] = []
    errors: Counter = Counter()
    pending: dict[Session, float] = {}  # attempts in progress -> when they started
    wanted = a.sessions
    started = retries = 0
    t0 = time.monotonic()
    deadline = t0 + a.open_timeout
    sources = [f"127.0.0.{2 + i}" for i in range(a.sources)] if a.sources else [None]

    def finish(sess: Session) -> None:
        sel.unregister(sess.sock)
        del pending[sess]

    while time.monotonic() < deadline:
        while started < wanted and len(pending) < a.in_flight:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            src = sources[started % len(sources)]
            if src:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
            sess = Session(s)
            rc = s.connect_ex((host, port))
            started += 1
            if rc not in (0, errno.EINPROGRESS):
                errors[f"connect: {errno.errorcode.get(rc, rc)}"] += 1
                s.close()
                continue
            sessions.append(sess)
            sel.register(s, selectors.EVENT_WRITE, sess)
            pending[sess] = time.monotonic()
        if not pending and started >= wanted:
            break
        now = time.monotonic()
        for sess, since in list(pending.items()):
            if now - since > a.greeting_timeout and retries < a.sessions:
                finish(sess)
                sess.state, sess.error = "retried", ""
                sess.sock.close()
                retries += 1
                wanted += 1
        for key, _mask in sel.select(timeout=0.5):
            sess = key.data
            if sess not in pending:
                continue
            if sess.state == "connecting":
                err = sess.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sess.state, sess.error = "failed", f"connect: {errno.errorcode.get(err, err)}"
                else:
                    sess.state, sess.connected = "greeting", True
                    sel.modify(sess.sock, selectors.EVENT_READ, sess)
                    continue
            else:
                try:
                    data = sess.sock.recv(4096)
                except OSError as e:
                    data, sess.error = b"", f"recv: {e.strerror}"
                if data:
                    sess.buf += data
                    line = complete_reply(sess.buf)
                    if line is None:
                        continue
                    if line.startswith(b"220"):
                        sess.state, sess.buf = "idle", b""
                    else:
                        sess.state = "failed"
                        sess.error = "greeting: " + line[:60].decode("ascii", "replace")
                else:
                    sess.state = "failed"
                    sess.error = sess.error or "closed before the greeting"
            finish(sess)
    for sess in list(pending):
        sess.state, sess.error = "failed", "timed out waiting for the greeting"
        finish(sess)
    sessions = [s for s in sessions if s.state != "retried"]
    for sess in sessions:
        if sess.state == "failed":
            errors[sess.error] += 1
    sel.close()
    return sessions, errors, time.monotonic() - t0, retries


def noop_all(sessions: list[Session], timeout: float) -> tuple[int, Counter]:
    """NOOP on every idle session; returns how many answered 250."""
    sel = selectors.DefaultSelector()
    errors: Counter = Counter()
    waiting = 0
    for sess in sessions:
        if sess.state != "idle":
            continue
        try:
            sess.sock.send(b"NOOP\r\n")
        except OSError as e:
            errors[f"send NOOP: {e.strerror}"] += 1
            continue
        sess.state, sess.buf = "noop", b""
        sel.register(sess.sock, selectors.EVENT_READ, sess)
        waiting += 1
    ok = 0
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for key, _mask in sel.select(timeout=0.5):
            sess = key.data
            try:
                data = sess.sock.recv(4096)
            except OSError:
                data = b""
            if data:
                sess.buf += data
                line = complete_reply(sess.buf)
                if line is None:
                    continue
                if line.startswith(b"250"):
                    ok += 1
                    sess.state = "idle"
                else:
                    errors["NOOP: " + line[:60].decode("ascii", "replace")] += 1
                    sess.state = "failed"
            else:
                errors["closed instead of answering NOOP"] += 1
                sess.state = "failed"
            sel.unregister(sess.sock)
            waiting -= 1
    if waiting:
        errors["no NOOP reply in time"] += waiting
    sel.close()
    return ok, errors


def send_message(a: argparse.Namespace, host: str, port: int, sink: Sink) -> tuple[str, bool, float]:
    """One message on a fresh connection: (DATA reply, reached the sink, seconds)."""
    base = sink.count
    body = (
        f"From: <{a.sender}>\r\nTo: <{a.recipient}>\r\nSubject: idle sessions probe\r\n"
        f"Message-Id: <idle.{os.getpid()}.{int(time.time())}@src.test>\r\n\r\n"
        + "while many sessions are idle\r\n" * 20
    ).encode()
    t0 = time.monotonic()
    try:
        with smtplib.SMTP(host, port, local_hostname="src.test", timeout=a.message_timeout) as s:
            s.ehlo()
            code, _ = s.mail(a.sender)
            if code != 250:
                return f"MAIL {code}", False, time.monotonic() - t0
            code, _ = s.rcpt(a.recipient)
            if code not in (250, 251):
                return f"RCPT {code}", False, time.monotonic() - t0
            code, msg = s.data(body)
            reply = f"{code} {msg.decode('utf-8', 'replace')}"
    except (smtplib.SMTPException, OSError) as e:
        return f"error: {e!r}", False, time.monotonic() - t0
    got, _ = sink.wait_for(base + 1, time.monotonic() + a.message_timeout)
    return reply, got >= base + 1 and reply.startswith("250"), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", help="start_mta.py WORKDIR: target, sink, recipient and cgroup")
    ap.add_argument("--target", help="host:port of the MTA")
    ap.add_argument("--sink", help="host:port the MTA relays to (smtp-sink is started there)")
    ap.add_argument("--pid", type=int, help="the MTA's pid, for its memory (without --state)")
    ap.add_argument("--label", default="ours")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--sources", type=int, default=4,
                    help="source addresses 127.0.0.2 .. (0: let the kernel choose 127.0.0.1)")
    ap.add_argument("--in-flight", type=int, default=32,
                    help="handshakes in progress at a time (Twisted's default listen backlog is 50)")
    ap.add_argument("--greeting-timeout", type=float, default=10.0,
                    help="seconds before an attempt without a greeting is made again")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to keep the sessions idle")
    ap.add_argument("--open-timeout", type=float, default=180.0)
    ap.add_argument("--message-timeout", type=float, default=60.0)
    ap.add_argument("--max-rss-mib", type=float, default=1024.0)
    ap.add_argument("--sender", default="bench@src.test")
    ap.add_argument("--recipient", default=None, help="default bench@bench.test")
    ap.add_argument("--out", help="also append the JSON line to this file")
    a = ap.parse_args()

    cgroup = None
    if a.state:
        st = benchlib.load_state(a.state)
        a.target = a.target or st["listen"]
        a.sink = a.sink or st["sink"]
        a.recipient = a.recipient or st.get("recipient")
        cgroup = st.get("cgroup")
    a.recipient = a.recipient or "bench@bench.test"
    if not a.target or not a.sink:
        ap.error("--state, or --target and --sink, are required")
    host, port = benchlib.split_hostport(a.target)
    sink_host, sink_port = benchlib.split_hostport(a.sink)
    benchlib.require_loopback(host, "target")
    benchlib.require_loopback(sink_host, "sink")

    limit = raise_nofile(a.sessions + 1024)
    if limit < a.sessions + 64:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {a.sessions} sessions")

    rec: dict[str, Any] = {"type": "idle_sessions", "label": a.label, "target": a.target,
                           "requested": a.sessions, "sources": a.sources}
    sink = Sink(sink_host, sink_port)
    sessions: list[Session] = []
    try:
        before = mta_memory(cgroup, a.pid)
        overflows0 = listen_overflows()
        sessions, errors, open_s, retries = open_sessions(a, host, port)
        overflows = listen_overflows() - overflows0
        greeted = sum(1 for s in sessions if s.state == "idle")
        opened = sum(1 for s in sessions if s.connected)
        time.sleep(a.hold)
        loaded = mta_memory(cgroup, a.pid)
        reply, delivered, msg_s = send_message(a, host, port, sink)
        noop_ok, noop_errors = noop_all(sessions, a.open_timeout)
        peak = mta_memory(cgroup, a.pid)
        for s in sessions:
            s.sock.close()
        sessions = []
        time.sleep(2.0)
        after = mta_memory(cgroup, a.pid)
        alive = benchlib.wait_banner(host, port, 30)
        per_session = (loaded["rss_kb"] - before["rss_kb"]) / greeted if greeted else 0.0
        rec.update(
            opened=opened, greeted=greeted, retried=retries, listen_overflows=overflows, open_errors=dict(errors.most_common(5)), open_s=round(open_s, 2),
            hold_s=a.hold, noop_ok=noop_ok, noop_errors=dict(noop_errors.most_common(5)),
            message_reply=reply[:80], message_delivered=delivered, message_s=round(msg_s, 3),
            rss_kb_before=before["rss_kb"], rss_kb_loaded=loaded["rss_kb"],
            rss_kb_after_noop=peak["rss_kb"], rss_kb_after_close=after["rss_kb"],
            hwm_kb=peak["hwm_kb"], kb_per_session=round(per_session, 1), mta_procs=loaded["procs"],
            greets_after_close=alive, max_rss_mib=a.max_rss_mib,
        )
        rec["ok"] = (greeted == a.sessions and noop_ok == a.sessions and delivered and alive
                     and peak["hwm_kb"] <= a.max_rss_mib * 1024)
    finally:
        for s in sessions:
            s.sock.close()
        sink.stop()
    line = json.dumps(rec)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    if not rec.get("ok"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
