"""A scriptable SMTP (or LMTP) sink for tests: a small Twisted server on 127.0.0.1, port 0.

``sink = await start_sink(**options)`` starts it; ``sink.port`` is where it
listens (``start_sink(unix_path=...)`` listens on a UNIX socket instead;
``sink.endpoint`` is a client endpoint string for either); ``sink.messages`` lists the accepted messages (sender, recipients, the
DATA bytes as they came over the wire and un-stuffed); ``sink.sessions``
records every connection (commands, how they were grouped in reads, TLS, AUTH,
where it stalled); ``await sink.stop()`` closes the port and every connection.

Scripting, all optional:

* ``replies={"greeting": "421 busy", "MAIL": "451 later", "RCPT:bad@x": "550 no",
  "DATA": "554 no", "DATA_END": "452 later"}`` -- a stage's reply (stages:
  greeting, EHLO, HELO, STARTTLS, AUTH, MAIL, RCPT, RCPT:<address>, DATA,
  DATA_END, RSET, QUIT).  Use "\\n" between lines for a multi-line reply.
  Any 421 closes the connection after it is sent.
* ``drop={"MAIL"}`` -- close the connection instead of answering at that stage.
* ``stall={"DATA_END"}`` -- never answer at that stage (``session.stalled_at``).
* extensions: ``pipelining``, ``size`` (None: not offered; 0: no limit),
  ``eightbitmime``, ``smtputf8``, ``enhancedstatuscodes``, ``dsn`` (RFC 3461:
  RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT are accepted only when it is
  offered, else 555); ``tls`` (a
  ``trustme.LeafCert``) offers STARTTLS (``tls_broken``: a handshake that
  always fails); ``auth={"user": "password"}`` offers
  AUTH (``auth_mechanisms``, default PLAIN LOGIN; only under TLS unless
  ``auth_requires_tls=False``);
  ``auth_required`` refuses MAIL before AUTH; ``esmtp=False`` refuses EHLO.
* The stage key ``MAIL:reused`` is a MAIL after the session's first message
  (a reused connection): ``drop={"MAIL:reused"}`` closes it unanswered (a
  server timing out an idle connection just as the client reuses it),
  ``replies={"MAIL:reused": "421 ..."}`` refuses it.
* ``max_recipients=N`` -- 452 4.5.3 for RCPTs past N in a transaction.
* ``max_errors=N`` -- as chasquid: the Nth 4xx/5xx reply of a session is replaced
  by ``421 4.5.0 Too many errors, bye`` and the connection closes.
* ``starttls_inject=b"..."`` -- bytes written right after the 220 to STARTTLS,
  in the same write, before the handshake (a response-injection attacker).
* ``lmtp=True`` -- speak LMTP (RFC 2033): LHLO is answered (stage "LHLO"),
  EHLO and HELO get 500, and after DATA there is one reply per accepted
  recipient in RCPT order, each scriptable as ``"DATA_END:<address>"`` (falling
  back to ``"DATA_END"``; ``stall``/``drop`` take the same keys).  A message
  records the recipients that got a 2xx in ``delivered_to``.
* ``requiretls=True`` offers REQUIRETLS (RFC 8689) after STARTTLS and takes
  its MAIL parameter.
* ``chunking=True`` offers CHUNKING (RFC 3030) and ``binarymime=True``
  BINARYMIME: ``BDAT n [LAST]`` reads exactly n octets; a non-LAST chunk is
  answered at stage "BDAT" (default ``250 2.0.0 n octets received``), the
  LAST one at "DATA_END"; a chunk without MAIL or RCPT gets 503/554 and its
  octets are dropped.  The message's ``data`` and ``raw`` are the chunks'
  octets, ``chunks`` their sizes.  A message over ``MAX_MESSAGE`` octets
  (DATA or BDAT) is refused with 552 and the connection closed.

For tests whose MTA is another process (the twistd daemon of tests/daemon.py,
whose reactor is not the test's), ``python -m tests.sink --listen HOST:PORT
[--tls-ca FILE]`` runs a sink in a process of its own: with ``--tls-ca`` it
offers STARTTLS with a trustme certificate for HOST (a name or an address
literal's IP) and writes the CA certificate that issued it to FILE.  It prints
``ready`` once listening, then one JSON line per accepted message (sender,
recipients, tls, the TLS version, helo, the client's address) as it comes; it
stops at SIGTERM.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

MAX_LINE = 4096
MAX_MESSAGE = 64 * 1024 * 1024  # the sink keeps messages in memory: bounded


@dataclass
class SinkMessage:
    sender: str
    recipients: list[str]
    data: bytes  # un-stuffed, as the message store would keep it (CRLF lines)
    raw: bytes  # exactly what came after the 354, terminator included
    mail_params: list[str]
    tls: bool
    auth_user: str | None
    helo: str
    accepted: bool = True
    delivered_to: list[str] = field(default_factory=list)  # recipients given a 2xx after DATA
    chunks: list[int] = field(default_factory=list)  # BDAT: the size of each chunk (empty: DATA)


@dataclass
class SinkSession:
    commands: list[str] = field(default_factory=list)
    # Commands grouped by the read they arrived in (pipelining shows as groups > 1).
    command_batches: list[list[str]] = field(default_factory=list)
    tls: bool = False
    tls_version: str = ""
    tls_resumed: bool = False  # the handshake resumed an earlier TLS session (RFC 8446 §2.2)
    auth_user: str | None = None
    helo: str = ""
    messages: list[SinkMessage] = field(default_factory=list)  # accepted and rejected
    stalled_at: str | None = None
    dropped_at: str | None = None
    closed: bool = False
    data_bytes_received: int = 0  # grows while DATA is being received
    peer: str = ""  # the client's address (the outbound source address under test)


@dataclass
class SinkOptions:
    hostname: str = "sink.test"
    replies: dict[str, str] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)
    esmtp: bool = True
    pipelining: bool = True
    size: int | None = 0
    eightbitmime: bool = True
    smtputf8: bool = True
    enhancedstatuscodes: bool = True
    dsn: bool = False
    tls: Any = None  # trustme.LeafCert
    tls_broken: bool = False  # answers the ClientHello with plain text: the handshake fails
    auth: dict[str, str] | None = None
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth_requires_tls: bool = True
    auth_required: bool = False
    max_recipients: int | None = None
    max_errors: int | None = None
    starttls_inject: bytes = b""
    lmtp: bool = False
    chunking: bool = False
    binarymime: bool = False
    requiretls: bool = False  # offers REQUIRETLS (RFC 8689) once under TLS


@implementer(IHandshakeListener)
class SinkProtocol(Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.opts = sink.options
        self.session = SinkSession()
        self.lost: Deferred[None] = Deferred()
        self._buffer = bytearray()
        self._data: bytearray | None = None  # starts with b"\r\n" so the end search is uniform
        self._greeted = False
        self._sender: str | None = None
        self._params: list[str] = []
        self._rcpts: list[str] = []
        self._rcpt_count = 0
        self._auth_step: str | None = None
        self._auth_login_user = ""
        self._stalled = False
        self._broken_tls = False
        self._errors = 0
        # BDAT: octets of the current chunk still to come, whether it is LAST,
        # the reply when it is refused (its octets are dropped), and the message so far.
        self._bdat_left: int | None = None
        self._bdat_last = False
        self._bdat_refusal: str | None = None
        self._chunks = bytearray()
        self._chunk_sizes: list[int] = []
        self._chunk_start = 0  # where the current chunk starts in _chunks

    # connection

    def connectionMade(self) -> None:
        self.session.peer = getattr(self.transport.getPeer(), "host", "")  # "" on a UNIX socket
        self.sink.sessions.append(self.session)
        kind = "LMTP" if self.opts.lmtp else "ESMTP"
        self._reply("greeting", f"220 {self.opts.hostname} {kind} sink")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.session.closed = True
        self.sink._connections.discard(self)
        self.lost.callback(None)

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()
        if isinstance(handle, SSL.Connection):
            self.session.tls_version = handle.get_protocol_version_name()
            # pyOpenSSL has no session_reused(): ask OpenSSL through its binding.
            self.session.tls_resumed = bool(_ssl_lib.SSL_session_reused(handle._ssl))

    # input

    def dataReceived(self, data: bytes) -> None:
        if self._stalled:
            return
        if self._broken_tls:  # the client's ClientHello: answer with something that is not TLS
            self.transport.write(b"this is not TLS\r\n")
            self.transport.loseConnection()
            return
        self._buffer += data
        batch: list[str] = []
        while not self._stalled and self.transport.connected and not self.transport.disconnecting:
            if self._data is not None:
                if not self._take_data():
                    break
                continue
            if self._bdat_left is not None:
                if not self._take_chunk():
                    break
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._write(["500 5.5.2 line too long"])
                    self.transport.loseConnection()
                break
            line = bytes(self._buffer[:end]).rstrip(b"\r").decode("utf-8", "surrogateescape")
            del self._buffer[: end + 1]
            batch.append(line)
            self.session.commands.append(line)
            self._command(line)
        if batch:
            self.session.command_batches.append(batch)

    def _take_data(self) -> bool:
        """Move bytes into the DATA buffer; True once the terminator was seen."""
        assert self._data is not None
        start = max(0, len(self._data) - 4)
        self._data += self._buffer
        self.session.data_bytes_received += len(self._buffer)
        self._buffer.clear()
        end = self._data.find(b"\r\n.\r\n", start)
        if end < 0:
            if len(self._data) > MAX_MESSAGE:
                self._write(["552 5.3.4 message too big for the sink"])
                self.transport.loseConnection()
            return False
        raw = bytes(self._data[2 : end + 5])
        self._buffer += self._data[end + 5 :]
        self._data = None
        self._end_of_data(raw)
        return True

    def _take_chunk(self) -> bool:
        """Move a BDAT chunk's octets out of the buffer; True once it is complete."""
        assert self._bdat_left is not None
        take = min(self._bdat_left, len(self._buffer))
        if self._bdat_refusal is None:
            self._chunks += self._buffer[:take]
        del self._buffer[:take]
        self._bdat_left -= take
        self.session.data_bytes_received += take
        if self._bdat_left:
            return False
        self._bdat_left = None
        self._end_of_chunk()
        return True

    # replies

    def _write(self, lines: list[str]) -> None:
        if self._too_many_errors(lines):
            return
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def _too_many_errors(self, lines: list[str]) -> bool:
        """``max_errors``: True (and 421 sent, connection closing) instead of the Nth error."""
        code = lines[-1][:3]
        if self.opts.max_errors is None or not code.isdigit() or int(code) < 400:
            return False
        self._errors += 1
        if self._errors < self.opts.max_errors:
            return False
        self.transport.write(b"421 4.5.0 Too many errors, bye\r\n")
        self.transport.loseConnection()
        return True

    def _reply(self, stage: str, default: str, key: str | None = None, extra: bytes = b"") -> int:
        """Answer at ``stage`` (or stall/drop as scripted); returns the code sent (0: none)."""
        if stage in self.opts.stall or (key and key in self.opts.stall):
            self._stalled = True
            self.session.stalled_at = stage
            return 0
        if stage in self.opts.drop or (key and key in self.opts.drop):
            self.session.dropped_at = stage
            self.transport.loseConnection()
            return 0
        text = self.opts.replies.get(key or "", self.opts.replies.get(stage, default))
        lines = text.split("\n")
        if self._too_many_errors(lines):
            return 421
        self.transport.write(b"".join(x.encode("utf-8") + b"\r\n" for x in lines) + extra)
        code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
        if code == 421:
            self.transport.loseConnection()
        return code

    # commands

    def _command(self, line: str) -> None:
        if self._auth_step is not None:
            self._auth_continue(line)
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler: Callable[[str], None] | None = getattr(self, f"_do_{verb}", None)
        if handler is None:
            self._write(["502 5.5.1 command not implemented"])
            return
        handler(arg)

    def _extensions(self) -> list[str]:
        o = self.opts
        ext = []
        if o.pipelining:
            ext.append("PIPELINING")
        if o.size is not None:
            ext.append(f"SIZE {o.size}" if o.size else "SIZE")
        if o.eightbitmime:
            ext.append("8BITMIME")
        if o.smtputf8:
            ext.append("SMTPUTF8")
        if o.enhancedstatuscodes:
            ext.append("ENHANCEDSTATUSCODES")
        if o.dsn:
            ext.append("DSN")
        if o.chunking:
            ext.append("CHUNKING")
        if o.binarymime:
            ext.append("BINARYMIME")
        if o.tls is not None and not self.session.tls:
            ext.append("STARTTLS")
        if o.requiretls and self.session.tls:
            ext.append("REQUIRETLS")
        if o.auth is not None and (self.session.tls or not o.auth_requires_tls):
            ext.append(" ".join(["AUTH", *o.auth_mechanisms]))
        return ext

    def _hello_refused_by_lmtp(self) -> bool:
        if self.opts.lmtp:  # RFC 2033 §4.1: an LMTP server only knows LHLO
            self._write(["500 5.5.1 this is an LMTP server: use LHLO"])
        return self.opts.lmtp

    def _do_LHLO(self, arg: str) -> None:
        if not self.opts.lmtp:
            self._write(["502 5.5.1 command not implemented"])
            return
        lines = [self.opts.hostname, *self._extensions()]
        default = "\n".join([*(f"250-{x}" for x in lines[:-1]), f"250 {lines[-1]}"])
        if self._reply("LHLO", default) == 250:
            self._greeted, self.session.helo = True, arg
            self._reset()

    def _do_EHLO(self, arg: str) -> None:
        if self._hello_refused_by_lmtp():
            return
        lines = [self.opts.hostname, *self._extensions()]
        default = "\n".join([*(f"250-{x}" for x in lines[:-1]), f"250 {lines[-1]}"])
        if not self.opts.esmtp:
            default = "502 5.5.1 EHLO not implemented"
        if self._reply("EHLO", default) == 250:
            self._greeted, self.session.helo = True, arg
            self._reset()

    def _do_HELO(self, arg: str) -> None:
        if self._hello_refused_by_lmtp():
            return
        if self._reply("HELO", f"250 {self.opts.hostname}") == 250:
            self._greeted, self.session.helo = True, arg
            self._reset()

    def _do_STARTTLS(self, arg: str) -> None:
        if self.opts.tls is None or self.session.tls:
            self._write(["502 5.5.1 STARTTLS not available"])
            return
        if self._reply("STARTTLS", "220 2.0.0 Ready to start TLS", extra=self.opts.starttls_inject) != 220:
            return
        self._buffer.clear()  # anything pipelined after STARTTLS is not to be trusted
        if self.opts.tls_broken:
            self._broken_tls = True
            return
        self.transport.startTLS(self.sink.tls_options())
        self.session.tls = True
        self._greeted = False  # RFC 3207 §4.2: start over
        self._reset()

    def _do_AUTH(self, arg: str) -> None:
        o = self.opts
        if o.auth is None:
            self._write(["502 5.5.1 AUTH not available"])
            return
        if o.auth_requires_tls and not self.session.tls:
            self._write(["538 5.7.11 Encryption required for requested authentication mechanism"])
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in o.auth_mechanisms:
            self._write(["504 5.5.4 unrecognized authentication type"])
        elif mech == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._auth_step = "plain"
                self._write(["334 "])
        elif mech == "LOGIN":
            self._auth_step = "login-user"
            self._write(["334 VXNlcm5hbWU6"])
        else:
            self._write(["504 5.5.4 unrecognized authentication type"])

    def _auth_continue(self, line: str) -> None:
        step, self._auth_step = self._auth_step, None
        if line == "*":
            self._write(["501 5.0.0 AUTH aborted"])
        elif step == "plain":
            self._auth_plain(line)
        elif step == "login-user":
            self._auth_login_user = _unb64(line)
            self._auth_step = "login-password"
            self._write(["334 UGFzc3dvcmQ6"])
        else:
            self._auth_check(self._auth_login_user, _unb64(line))

    def _auth_plain(self, token: str) -> None:
        parts = _unb64(token).split("\0")
        if len(parts) != 3:
            self._write(["501 5.5.2 bad AUTH PLAIN token"])
            return
        self._auth_check(parts[1], parts[2])

    def _auth_check(self, user: str, password: str) -> None:
        assert self.opts.auth is not None
        ok = self.opts.auth.get(user) == password
        if self._reply("AUTH", "235 2.7.0 Authentication successful" if ok
                       else "535 5.7.8 Authentication credentials invalid") == 235:
            self.session.auth_user = user

    def _do_MAIL(self, arg: str) -> None:
        if not self._greeted:
            self._write(["503 5.5.1 send EHLO/HELO first"])
            return
        if self._sender is not None:
            self._write(["503 5.5.1 nested MAIL command"])
            return
        if self.opts.auth_required and self.session.auth_user is None:
            self._write(["530 5.7.0 Authentication required"])
            return
        if not arg.upper().startswith("FROM:<") or ">" not in arg:
            self._write(["501 5.5.4 syntax: MAIL FROM:<address>"])
            return
        path, _, rest = arg[5:].partition(">")
        params = rest.split()
        problem = self._check_params(params)
        if problem:
            self._write([problem])
            return
        if self._reply("MAIL", "250 2.1.0 Ok",
                       key="MAIL:reused" if self.session.messages else None) // 100 == 2:
            self._sender, self._params = path[1:], params

    def _check_params(self, params: list[str]) -> str | None:
        offered = {x.split()[0] for x in self._extensions()}
        for p in params:
            key, _, value = p.partition("=")
            key = key.upper()
            if key == "SIZE" and "SIZE" in offered:
                if self.opts.size and int(value) > self.opts.size:
                    return "552 5.3.4 message size exceeds fixed maximum message size"
            elif key == "BODY" and value.upper() == "BINARYMIME":
                if "BINARYMIME" not in offered:
                    return f"555 5.5.4 unsupported parameter {p}"
            elif key == "BODY" and "8BITMIME" in offered:
                pass
            elif key == "SMTPUTF8" and "SMTPUTF8" in offered:
                pass
            elif key in ("RET", "ENVID") and "DSN" in offered:
                pass
            elif key == "REQUIRETLS" and "REQUIRETLS" in offered and not value:
                pass
            else:
                return f"555 5.5.4 unsupported parameter {p}"
        return None

    def _do_RCPT(self, arg: str) -> None:
        if self._sender is None:
            self._write(["503 5.5.1 need MAIL command"])
            return
        if not arg.upper().startswith("TO:<") or ">" not in arg:
            self._write(["501 5.5.4 syntax: RCPT TO:<address>"])
            return
        address, _, rest = arg[4:].partition(">")
        for p in rest.split():
            if p.partition("=")[0].upper() not in ("NOTIFY", "ORCPT") or not self.opts.dsn:
                self._write([f"555 5.5.4 unsupported parameter {p}"])
                return
        self._rcpt_count += 1
        limit = self.opts.max_recipients
        default = "250 2.1.5 Ok"
        if limit is not None and self._rcpt_count > limit:
            default = "452 4.5.3 Too many recipients"
        if self._reply("RCPT", default, key=f"RCPT:{address}") // 100 == 2:
            self._rcpts.append(address)

    def _do_DATA(self, arg: str) -> None:
        if self._sender is None:
            self._write(["503 5.5.1 need MAIL command"])
            return
        if not self._rcpts:
            self._write(["554 5.5.1 Error: no valid recipients"])
            return
        if self._reply("DATA", "354 End data with <CR><LF>.<CR><LF>") == 354:
            self._data = bytearray(b"\r\n")

    def _do_BDAT(self, arg: str) -> None:
        words = arg.split()
        if (not self.opts.chunking or not 1 <= len(words) <= 2 or not words[0].isdigit()
                or (len(words) == 2 and words[1].upper() != "LAST")):
            self._write(["501 5.5.4 syntax: BDAT size [LAST]"])
            return
        size = int(words[0])
        self._bdat_last = len(words) == 2
        self._bdat_refusal = None
        if self._sender is None:
            self._bdat_refusal = "503 5.5.1 need MAIL command"
        elif not self._rcpts:
            self._bdat_refusal = "554 5.5.1 Error: no valid recipients"
        elif len(self._chunks) + size > MAX_MESSAGE:
            self._write(["552 5.3.4 message too big for the sink"])
            self.transport.loseConnection()
            return
        self._bdat_left, self._chunk_start = size, len(self._chunks)
        if size == 0:
            self._bdat_left = None
            self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        if self._bdat_refusal is not None:
            self._write([self._bdat_refusal])
            return
        self._chunk_sizes.append(len(self._chunks) - self._chunk_start)
        if not self._bdat_last:
            self._reply("BDAT", f"250 2.0.0 {self._chunk_sizes[-1]} octets received")
            return
        data = bytes(self._chunks)
        self._chunks = bytearray()
        self._store_message(data, data)

    def _end_of_data(self, raw: bytes) -> None:
        body = b"" if raw == b".\r\n" else raw[:-3]
        if body.startswith(b"."):
            body = body[1:]
        body = body.replace(b"\r\n.", b"\r\n")  # RFC 5321 §4.5.2: drop the first dot of a line
        self._store_message(body, raw)

    def _store_message(self, body: bytes, raw: bytes) -> None:
        message = SinkMessage(
            sender=self._sender or "", recipients=list(self._rcpts), data=body, raw=raw,
            mail_params=list(self._params), tls=self.session.tls,
            auth_user=self.session.auth_user, helo=self.session.helo,
            chunks=self._chunk_sizes,
        )
        self.session.messages.append(message)
        number = sum(len(s.messages) for s in self.sink.sessions)
        if self.opts.lmtp:
            self._lmtp_replies(message, number)
        else:
            code = self._reply("DATA_END", f"250 2.0.0 Ok: queued as M{number}")
            message.accepted = code // 100 == 2
            message.delivered_to = list(message.recipients) if message.accepted else []
        self._reset()

    def _lmtp_replies(self, message: SinkMessage, number: int) -> None:
        """RFC 2033 §4.2: one reply per accepted recipient, in RCPT order."""
        for address in message.recipients:
            if self._stalled or self.transport.disconnecting:
                break
            code = self._reply("DATA_END", f"250 2.0.0 <{address}> Ok: delivered as M{number}",
                               key=f"DATA_END:{address}")
            if code // 100 == 2:
                message.delivered_to.append(address)
        message.accepted = bool(message.delivered_to)

    def _do_RSET(self, arg: str) -> None:
        self._reply("RSET", "250 2.0.0 Ok")
        self._reset()

    def _do_NOOP(self, arg: str) -> None:
        self._write(["250 2.0.0 Ok"])

    def _do_QUIT(self, arg: str) -> None:
        if self._reply("QUIT", "221 2.0.0 Bye"):
            self.transport.loseConnection()

    def _reset(self) -> None:
        self._sender, self._params, self._rcpts, self._rcpt_count = None, [], [], 0
        self._chunks, self._chunk_sizes = bytearray(), []


def _unb64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except ValueError:
        return ""


class _SinkFactory(Factory):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        proto = SinkProtocol(self.sink)
        self.sink._connections.add(proto)
        return proto


class Sink:
    def __init__(self, options: SinkOptions) -> None:
        self.options = options
        self.sessions: list[SinkSession] = []
        self._tls_options: CertificateOptions | None = None
        self._connections: set[SinkProtocol] = set()
        self._port: Any = None
        self.port = 0
        self.unix_path: str | None = None

    def tls_options(self) -> CertificateOptions:
        """The server TLS context, one per sink (so, like a real server, it keeps one
        session cache and can resume a client's earlier session)."""
        if self._tls_options is None:
            tls = self.options.tls
            server = PrivateCertificate.loadPEM(tls.private_key_and_cert_chain_pem.bytes())
            # The intermediates too (a DANE-TA record may name one of them).
            extra = [Certificate.loadPEM(p.bytes()).original for p in tls.cert_chain_pems[1:]]
            self._tls_options = CertificateOptions(
                privateKey=server.privateKey.original, certificate=server.original,
                extraCertChain=extra, enableSessions=True)
        return self._tls_options

    @property
    def endpoint(self) -> str:
        """A client endpoint description that reaches this sink."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"tcp:{self._port.getHost().host}:{self.port}"

    @property
    def messages(self) -> list[SinkMessage]:
        """The accepted messages, in the order they were received."""
        return [m for s in self.sessions for m in s.messages if m.accepted]

    async def stop(self) -> None:
        """Stop listening and close every connection; returns once all are gone."""
        waits = [p.lost for p in list(self._connections)]
        for proto in list(self._connections):
            proto.transport.abortConnection()
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        await gatherResults(waits)


async def start_sink(interface: str = "127.0.0.1", port: int = 0, unix_path: str | None = None,
                     **options: Any) -> Sink:
    """Listen on ``interface:port`` (another 127.x address and a fixed port let several
    sinks share one port, as MX hosts do), or on the UNIX socket ``unix_path``."""
    sink = Sink(SinkOptions(**options))
    if unix_path is not None:
        sink._port = reactor.listenUNIX(unix_path, _SinkFactory(sink))
        sink.unix_path = unix_path
        return sink
    sink._port = reactor.listenTCP(port, _SinkFactory(sink), interface=interface)
    sink.port = sink._port.getHost().port
    return sink


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on the real reactor until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)


def main(argv: list[str] | None = None) -> None:
    """The sink in a process of its own (see the module's docstring)."""
    import argparse
    import json

    from twisted.internet.task import LoopingCall

    parser = argparse.ArgumentParser(prog="python -m tests.sink")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--tls-ca", metavar="FILE", help="offer STARTTLS; write the CA here")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    options: dict[str, Any] = {}
    if args.tls_ca:
        import trustme

        ca = trustme.CA()
        options["tls"] = ca.issue_cert(host)
        ca.cert_pem.write_to_path(args.tls_ca)
    started: list[Sink] = []
    reported: set[int] = set()

    def report() -> None:
        for sink in started:
            for session in sink.sessions:
                for m in session.messages:
                    if m.accepted and id(m) not in reported:
                        reported.add(id(m))
                        print(json.dumps({"sender": m.sender, "recipients": m.recipients,
                                          "tls": m.tls, "tls_version": session.tls_version,
                                          "helo": m.helo, "peer": session.peer}), flush=True)

    async def start() -> None:
        started.append(await start_sink(host, int(port), **options))
        LoopingCall(report).start(0.05)
        print("ready", flush=True)

    def failed(failure: Failure) -> None:
        print(f"failed: {failure.value}", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()).addErrback(failed))
    reactor.run()


if __name__ == "__main__":
    main()
