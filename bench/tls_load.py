#!/usr/bin/env python3
"""An SMTP load generator and a sink that both speak STARTTLS (smtp-source and
smtp-sink cannot), for the TLS and DKIM benchmark modes.

  python3 bench/tls_load.py sink --listen 127.0.0.1:32526 --cert C --key K [--lifetime 3600]
  python3 bench/tls_load.py send --target 127.0.0.1:32525 --messages 2000 --sessions 20 \\
      --size 4096 [--starttls] [--auth user:password] [--timeout 600]

``send`` opens --sessions concurrent connections, each sending its share of
--messages one message per connection (as run_load.py drives smtp-source):
EHLO, STARTTLS (if asked; the certificate is not checked, like Postfix's
``smtp_tls_security_level = encrypt``), EHLO, AUTH PLAIN (if asked; only
under TLS), then MAIL, RCPT and DATA in one write when the server offers
PIPELINING (RFC 2920), the body, QUIT.  It prints one JSON line: messages
accepted, failures (with the first few replies), seconds and msg/s.  Every
read has a timeout and the whole run --timeout.

``sink`` accepts everything (250 to each command, STARTTLS with --cert and
--key, PIPELINING: replies to a batch of commands go out in one write),
keeps nothing (a message must have a body: the end is the first CRLF.CRLF),
and writes the count of accepted messages to --count-file
(each second and at exit); it stops after --lifetime seconds.  Lines are
limited to 1000 octets, a message to --max-size.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import signal
import ssl
import sys
import time
from pathlib import Path

LINE_LIMIT = 1000
READ_TIMEOUT = 60.0


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        raise argparse.ArgumentTypeError(f"{text}: loopback addresses only")
    return host.strip("[]"), int(port)


# --- sink ----------------------------------------------------------------------------


class SinkStats:
    def __init__(self) -> None:
        self.messages = 0
        self.sessions = 0
        self.tls_sessions = 0


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        context: ssl.SSLContext, stats: SinkStats, max_size: int,
                        print_counts: bool) -> None:
    stats.sessions += 1
    out: list[bytes] = [b"220 sink.bench.test ESMTP tls_load\r\n"]
    tls = False
    try:
        while True:
            if out and not reader._buffer:  # type: ignore[attr-defined]  # batch replies (RFC 2920)
                writer.write(b"".join(out))
                out.clear()
                await writer.drain()
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            if not line or len(line) > LINE_LIMIT:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                caps = [b"250-sink.bench.test", b"250-PIPELINING", b"250-8BITMIME",
                        b"250-SIZE %d" % max_size, b"250-AUTH PLAIN"]
                if not tls:
                    caps.append(b"250-STARTTLS")
                out.append(b"\r\n".join(caps) + b"\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"STAR" and not tls:
                writer.write(b"".join(out) + b"220 2.0.0 go ahead\r\n")
                out.clear()
                await writer.drain()
                await writer.start_tls(context)
                tls = True
                stats.tls_sessions += 1
            elif verb == b"AUTH":
                out.append(b"235 2.7.0 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"".join(out) + b"354 go ahead\r\n")
                out.clear()
                await writer.drain()
                # The reader's limit is max_size: a bigger message ends the session.
                await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), READ_TIMEOUT)
                stats.messages += 1
                out.append(b"250 2.0.0 ok\r\n")
                if print_counts:  # the running count, as smtp-sink -c shows it (run_load.py reads it)
                    sys.stdout.write(f"mesg={stats.messages}\n")
                    sys.stdout.flush()
            elif verb == b"QUIT":
                writer.write(b"".join(out) + b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                out.append(b"250 2.0.0 ok\r\n")
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ssl.SSLError):
        return
    finally:
        writer.close()


async def run_sink(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    stats = SinkStats()
    host, port = args.listen
    server = await asyncio.start_server(
        lambda r, w: _sink_session(r, w, context, stats, args.max_size, args.print_counts),
        host, port,
        limit=args.max_size, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    deadline = loop.time() + args.lifetime
    count_file = Path(args.count_file) if args.count_file else None
    async with server:
        while not stop.is_set() and loop.time() < deadline:
            if count_file is not None:
                count_file.write_text(f"{stats.messages}\n")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    if count_file is not None:
        count_file.write_text(f"{stats.messages}\n")
    print(json.dumps({"sink_messages": stats.messages, "sessions": stats.sessions,
                      "tls_sessions": stats.tls_sessions}), flush=True)


# --- send ----------------------------------------------------------------------------


class Failed(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    for _ in range(100):  # bounded multi-line reply
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        if len(line) < 4:
            raise Failed(f"short reply {line!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)
    raise Failed("reply of more than 100 lines")


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> bytes:
    got, text = await _reply(reader)
    if got // 100 != code // 100:
        raise Failed(f"{what}: {text.decode('ascii', 'replace').strip()}")
    return text


def _message(size: int, n: int) -> bytes:
    head = (f"From: load@bench.test\r\nTo: sink@sink.bench.test\r\n"
            f"Subject: tls_load {n}\r\nDate: Tue, 08 Dec 2026 00:00:00 +0000\r\n"
            f"Message-ID: <{n}.{time.monotonic_ns()}@bench.test>\r\n\r\n").encode()
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"


async def _send_one(args: argparse.Namespace, context: ssl.SSLContext, n: int) -> None:
    host, port = args.target
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=LINE_LIMIT * 4), READ_TIMEOUT)
    try:
        await _expect(reader, 220, "greeting")
        writer.write(b"EHLO load.bench.test\r\n")
        caps = await _expect(reader, 250, "EHLO")
        if args.starttls:
            if b"STARTTLS" not in caps.upper():
                raise Failed("STARTTLS not offered")
            writer.write(b"STARTTLS\r\n")
            await _expect(reader, 220, "STARTTLS")
            await writer.start_tls(context)
            writer.write(b"EHLO load.bench.test\r\n")
            caps = await _expect(reader, 250, "EHLO after STARTTLS")
        if args.auth:
            if not args.starttls:
                raise Failed("--auth needs --starttls (no password in clear)")
            user, _, password = args.auth.partition(":")
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await _expect(reader, 235, "AUTH")
        commands = [f"MAIL FROM:<{args.sender}>\r\n".encode(),
                    f"RCPT TO:<{args.recipient}>\r\n".encode(), b"DATA\r\n"]
        if b"PIPELINING" in caps.upper():
            writer.write(b"".join(commands))
            await _expect(reader, 250, "MAIL")
            await _expect(reader, 250, "RCPT")
            await _expect(reader, 354, "DATA")
        else:
            for command, code in zip(commands, (250, 250, 354), strict=True):
                writer.write(command)
                await _expect(reader, code, command.split(b":")[0].decode())
        writer.write(_message(args.size, n))
        await _expect(reader, 250, "end of data")
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def run_send(args: argparse.Namespace) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # encrypt, do not verify (like smtp_tls_security_level = encrypt)
    queue = list(range(args.messages))
    failures: list[str] = []
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        while queue:
            n = queue.pop()
            try:
                await _send_one(args, context, n)
                accepted += 1
            except (TimeoutError, Failed, OSError, asyncio.IncompleteReadError, ssl.SSLError, ValueError) as e:
                failures.append(f"{type(e).__name__}: {e}")

    start = time.monotonic()
    tasks = [asyncio.ensure_future(worker()) for _ in range(args.sessions)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    seconds = time.monotonic() - start
    return {"label": args.label, "size": args.size, "messages": args.messages,
            "accepted": accepted, "failed": len(failures), "failures": failures[:5],
            "timed_out": bool(pending), "seconds": round(seconds, 3),
            "msg_per_s": round(accepted / seconds, 1) if seconds else 0.0,
            "starttls": args.starttls, "auth": bool(args.auth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--listen", type=_address, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--lifetime", type=float, default=3600)
    s.add_argument("--max-size", type=int, default=10 * 1024 * 1024)
    s.add_argument("--count-file")
    s.add_argument("--print-counts", action="store_true", help="mesg=N on stdout per message")
    c = sub.add_parser("send")
    c.add_argument("--target", type=_address, required=True)
    c.add_argument("--messages", type=int, default=2000)
    c.add_argument("--sessions", type=int, default=20)
    c.add_argument("--size", type=int, default=4096)
    c.add_argument("--starttls", action="store_true")
    c.add_argument("--auth", help="user:password for AUTH PLAIN (after STARTTLS)")
    c.add_argument("--sender", default="load@bench.test")
    c.add_argument("--recipient", default="sink@sink.bench.test")
    c.add_argument("--timeout", type=float, default=600)
    c.add_argument("--label", default="")
    args = ap.parse_args()
    if args.command == "sink":
        asyncio.run(run_sink(args))
    else:
        print(json.dumps(asyncio.run(run_send(args))), flush=True)
        sys.exit(0)


if __name__ == "__main__":
    main()
