"""The outbound SMTP client: one connection, an explicit state machine, per-recipient results.

:func:`send` connects to one server, speaks RFC 5321 ESMTP to it and runs one or
more mail transactions on the connection.  It never raises for anything the
server or the network does: every outcome is in the returned
:class:`SessionResult`, one :class:`RecipientReply` per recipient that got a
final answer, and ``connection_error`` when the server must be considered
failed (the caller then tries the recipients without an answer on the next
server).

The pieces, from the wire up:

* :class:`ReplyParser` turns received bytes into complete :class:`Reply`
  objects (multi-line replies, code consistency, bounded line length and line
  count; RFC 5321 §4.2).  Nothing is acted upon before a reply is complete.
* :class:`DotStuffer` is the pure DATA encoder: CRLF line endings, dot-stuffing
  with its state carried across chunks (RFC 5321 §4.5.2), the final
  ``CRLF.CRLF``.
* :class:`SMTPClientProtocol` is the I/O half: a reply queue, per-stage timers
  on an injectable clock, STARTTLS, and the message body streamed from disk by
  a pull producer.
* :class:`_Session` is the state machine (:class:`State`, with the allowed
  transitions in ``_TRANSITIONS``) written as one linear coroutine.

Deliberate choices:

* An 8-bit message is sent to a server that does not offer 8BITMIME as it is
  (no downgrade to quoted-printable, RFC 6152 §3 would ask for one); most
  servers accept it.  A message that needs SMTPUTF8 is never sent to a server
  without it: all its recipients fail with 553 5.6.7 (RFC 6531 §3.4).
* RSET is sent before a transaction only when the previous one did not end
  with a DATA reply (RFC 5321 §4.1.1.5); after a completed DATA a new MAIL may
  follow directly.
* To a server that offers CHUNKING the message goes out with BDAT (RFC 3030
  §2), octet for octet, without dot-stuffing: a message of at most
  ``SMALL_BODY`` octets as one ``BDAT n LAST`` (pipelined with MAIL and the
  RCPTs under PIPELINING), a bigger one after the RCPT replies, in
  ``CHUNK_SIZE`` chunks read from the file as they go, at most
  ``BDAT_WINDOW`` chunks unanswered (one without PIPELINING).  A BDAT
  message's transaction ends with an RSET unless its LAST chunk got a 2xx.
  A BODY=BINARYMIME message (RFC 3030 §3) can only go that way: to a server
  without CHUNKING and BINARYMIME all its recipients fail with 554 5.6.3.
  LMTP uses BDAT the same way when offered (RFC 3030 allows it), with the
  LMTP rule for the end: one reply per accepted RCPT after the LAST chunk
  (RFC 2033 §4.2), and no chunk sent before the previous one is answered.
* Credentials are only ever sent under TLS (RFC 4954 §4 and RFC 8314 spirit);
  configured credentials on a plaintext connection fail that server.

LMTP (RFC 2033, ``ClientOptions.lmtp``) is the same dialogue with three
differences: ``LHLO`` instead of EHLO, with no HELO fallback (§4.1); no
STARTTLS unless the TLS policy is "require" or "verify" (an LMTP server is
usually a local socket, so "opportunistic" does not try it); and after the end
of DATA one reply per accepted RCPT, in RCPT order, each deciding that
recipient alone (§4.2).  A connection failure in the middle of those replies
leaves the remaining recipients unanswered.  The same holds for the
replies to a LAST BDAT chunk when the LMTP server offers CHUNKING.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from OpenSSL import SSL
from twisted.internet import interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.delivery.cache import ConnectionCache
from mta.queue.courier import Outcome
from mta.queue.layout import QueuedMessage
from mta.system.netio import send_now

log = Logger()

TLS_POLICIES = ("none", "opportunistic", "require", "verify")
CHUNK_SIZE = 64 * 1024
SMALL_BODY = 16 * 1024  # sent in one write without a producer (fits any socket send buffer)
MAX_REPLY_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512; real servers send longer lines
MAX_REPLY_LINES = 100
BDAT_WINDOW = 2  # BDAT chunks sent and not yet answered, with PIPELINING (RFC 3030 §4.2)
MAX_BDAT_CHUNKS = 1 << 20  # bound of the chunk loop: 64 GiB at CHUNK_SIZE


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each stage (RFC 5321 §4.5.3.2)."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    ehlo: float = 300.0  # EHLO/HELO, STARTTLS, AUTH, RSET: like MAIL, 5 minutes
    tls: float = 300.0  # the TLS handshake
    mail: float = 300.0  # §4.5.3.2.2 MAIL command: 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3 RCPT command: 5 minutes
    data_init: float = 120.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5 data block: 3 minutes
    data_end: float = 600.0  # §4.5.3.2.6 DATA termination: 10 minutes
    quit: float = 10.0  # the 221 to QUIT and the close; the result no longer depends on it


@dataclass
class Transaction:
    """One message for one or more recipients, as MAIL/RCPT/DATA sends it."""

    sender: str  # "" is the null reverse-path <>
    recipients: list[str]
    data_path: Path
    size: int
    body_8bit: bool = False
    smtputf8: bool = False
    # DSN (RFC 3461), sent only to a server that offers it: the MAIL parameters
    # (RET=, ENVID=, already encoded) and, per recipient address, its RCPT
    # parameters (NOTIFY=, ORCPT=); None/empty for mail without DSN.
    dsn_mail: list[str] | None = None
    dsn_rcpt: dict[str, str] | None = None
    binarymime: bool = False  # received with BODY=BINARYMIME: BDAT only (RFC 3030 §3)

    @property
    def needs_smtputf8(self) -> bool:
        return self.smtputf8 or not self.sender.isascii() or not all(r.isascii() for r in self.recipients)


@dataclass
class ClientOptions:
    helo_name: str
    tls_policy: str = "opportunistic"  # one of TLS_POLICIES
    # The name the certificate must match under "verify" (MX host or smarthost name);
    # also sent as SNI when it is a DNS name.
    tls_hostname: str | None = None
    # twisted IOpenSSLTrustRoot or Certificate; None is the platform's trust store.
    trust_root: Any = None
    username: str | None = None
    password: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Speak LMTP (RFC 2033) instead of SMTP: LHLO, and one reply per recipient after DATA.
    lmtp: bool = False

    def __post_init__(self) -> None:
        if self.tls_policy not in TLS_POLICIES:
            raise ValueError(f"tls_policy must be one of {', '.join(TLS_POLICIES)}")


@dataclass(frozen=True)
class RecipientReply:
    """The final answer for one recipient on this server (the server's or our own)."""

    code: int
    enhanced: str
    text: str
    outcome: Outcome

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)


@dataclass
class TransactionResult:
    transaction: Transaction
    replies: dict[str, RecipientReply] = field(default_factory=dict)
    # The server offered DSN (RFC 3461) when the transaction's RCPTs were sent:
    # the DSN parameters went with them, and their notices are now its job.
    dsn: bool = False

    def unanswered(self) -> list[str]:
        """Recipients without a final reply here: to be tried on the next server."""
        return [r for r in dict.fromkeys(self.transaction.recipients) if r not in self.replies]


@dataclass
class SessionResult:
    server: str
    transactions: list[TransactionResult]
    # Set when the server must be considered failed; the recipients in
    # ``unanswered()`` should then be tried on the next server.
    connection_error: str | None = None
    # RFC 3463 status that fits connection_error (for a DSN if nothing else is left).
    error_status: str = ""
    tls: str = ""  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; "" when not encrypted
    tls_verified: bool = False
    # The TLS handshake itself failed (an opportunistic caller may retry in plaintext).
    tls_failed: bool = False


# --- replies -----------------------------------------------------------------------------


class ReplyError(Exception):
    """The server sent something that is not an SMTP reply."""


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)(.*)\Z", re.S)
# RFC 3463 §2 / RFC 2034: class.subject.detail at the start of the text.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |\Z)")


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of each line, after "NNN-" / "NNN "

    @property
    def enhanced(self) -> str:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m is None or m.group(1) != str(self.code)[0]:
            return ""
        return m.group(0).strip()

    @property
    def text(self) -> str:
        enhanced = self.enhanced
        parts = []
        for line in self.lines:
            if enhanced and line.startswith(enhanced):
                line = line[len(enhanced):].lstrip(" ")
            parts.append(line)
        return " ".join(p for p in parts if p)

    @property
    def kind(self) -> int:
        return self.code // 100

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)

    def as_recipient_reply(self, outcome: Outcome) -> RecipientReply:
        return RecipientReply(self.code, self.enhanced, self.text, outcome)


class ReplyParser:
    """Bytes in, complete replies out (RFC 5321 §4.2, §4.2.1 multi-line replies)."""

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._buffer = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []
        self._max_line = max_line
        self._max_lines = max_lines

    @property
    def pending(self) -> bool:
        """True if part of a reply has been received."""
        return bool(self._buffer) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise ReplyError(f"reply line longer than {self._max_line} octets")
                return replies
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > self._max_line:
            raise ReplyError(f"reply line longer than {self._max_line} octets")
        m = _REPLY_LINE.match(line)
        if m is None:
            raise ReplyError(f"malformed reply line {line[:80]!r}")
        code = int(m.group(1))
        if self._code is not None and code != self._code:
            raise ReplyError(f"multi-line reply mixes codes {self._code} and {code}")
        self._code = code
        self._lines.append(m.group(3).decode("utf-8", "replace"))
        if len(self._lines) > self._max_lines:
            raise ReplyError(f"reply longer than {self._max_lines} lines")
        if m.group(2) == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code, self._lines = None, []
        return reply


@dataclass(frozen=True)
class Capabilities:
    """What the EHLO reply offered (RFC 5321 §4.1.1.1); HELO offers nothing."""

    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        keywords: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            key = words[0].upper()
            if key.startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                key, words = "AUTH", ["AUTH", words[0][5:], *words[1:]]
            keywords[key] = tuple(words[1:])
        return cls(keywords)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size_limit(self) -> int:
        """RFC 1870 §4: the declared maximum size, 0 when none is fixed."""
        params = self.keywords.get("SIZE", ())
        return int(params[0]) if params and params[0].isdigit() else 0

    @property
    def auth_mechanisms(self) -> set[str]:
        return {m.upper() for m in self.keywords.get("AUTH", ())}


# --- the DATA encoder --------------------------------------------------------------------


class DotStuffer:
    """Turns message bytes, chunk by chunk, into the DATA stream (RFC 5321 §4.5.2).

    Every line ending becomes CRLF (a bare CR or bare LF too, never CR CR LF), a
    ``.`` at the start of any line is doubled wherever that line starts, also
    right at a chunk boundary, and :meth:`finish` adds ``CRLF`` if needed and the
    terminating ``.CRLF``.  The output of any chunking of the same input is the
    same bytes.
    """

    def __init__(self) -> None:
        self._at_line_start = True  # the DATA command's CRLF precedes the first line
        self._pending_cr = False  # a CR ended the last chunk: CRLF or bare CR, not known yet

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        out = b""
        if self._pending_cr:
            out, self._pending_cr, self._at_line_start = b"\r\n", False, True
        if not self._at_line_start:
            out += b"\r\n"
        self._at_line_start = True
        return out + b".\r\n"


def bdat_command(chunk: bytes, last: bool) -> bytes:
    """``BDAT <size> [LAST]`` and the chunk: the size is exactly the chunk's (RFC 3030 §2)."""
    return b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if last else b"", chunk)


# --- errors that end a session -----------------------------------------------------------


class SessionError(Exception):
    """This server failed: recipients without a final reply go to the next one.

    ``polite``: the connection is still in a known state, so QUIT is sent
    before closing; otherwise the connection is aborted.
    """

    def __init__(self, text: str, status: str = "4.4.2", polite: bool = False) -> None:
        super().__init__(text)
        self.status = status
        self.polite = polite


def _refused(reply: Reply, stage: str) -> SessionError:
    """The server answered, but not in a way that lets us go on with it."""
    status = reply.enhanced if reply.enhanced.startswith("4") else "4.4.2"
    return SessionError(f"{reply} (in reply to {stage})", status, polite=reply.code != 421)


# --- the I/O half ------------------------------------------------------------------------


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Streams the message file through a :class:`DotStuffer`, one chunk per pull.

    The transport asks for the next chunk when its buffer has drained, so only
    a chunk or two of the message is ever in memory.  A pull that does not
    come for ``block_timeout`` seconds means the server stopped reading
    (RFC 5321 §4.5.3.2.5 data block timeout).
    """

    def __init__(self, proto: SMTPClientProtocol, path: Path, block_timeout: float,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self._proto = proto
        self._file: BinaryIO | None = QueuedMessage(path).open()  # closed in _close
        self._stuffer = DotStuffer()
        self._block_timeout = block_timeout
        self._chunk_size = chunk_size
        self._timer: interfaces.IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._arm()
        self._proto.transport.registerProducer(self, False)

    def _read_chunk(self) -> bytes:
        assert self._file is not None
        return self._file.read(self._chunk_size)

    def resumeProducing(self) -> None:
        if self._file is None:
            return
        self._arm()
        while True:  # ends: every pass reads the file further or reaches its end
            chunk = self._read_chunk()
            if not chunk:
                self._finish()
                return
            out = self._stuffer.feed(chunk)
            if out:
                self._proto.transport.write(out)
                return

    def stopProducing(self) -> None:
        self.abort(SessionError("connection lost while sending the message data"))

    def abort(self, error: SessionError) -> None:
        if self._close() and not self.done.called:
            self.done.errback(Failure(error))

    def _finish(self) -> None:
        self._proto.transport.write(self._stuffer.finish())
        self._close()
        self._proto.transport.unregisterProducer()
        if not self.done.called:
            self.done.callback(None)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._proto.clock.callLater(self._block_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._proto.fail(SessionError(
            f"timeout after {self._block_timeout:g}s sending the message data (server not reading)"))

    def _close(self) -> bool:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._file is None:
            return False
        self._file.close()
        self._file = None
        return True


@implementer(interfaces.IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """Replies in, commands out; one waiter at a time with a timer on ``clock``."""

    def __init__(self, clock: interfaces.IReactorTime) -> None:
        self.clock = clock
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiter: Deferred[Any] | None = None
        self._waiting_for = ""  # "reply", "tls" or "" (nothing awaited)
        self._waiting_for_text = ""
        self._timer: interfaces.IDelayedCall | None = None
        self._timeout = 0.0  # of the current wait
        self._failure: SessionError | None = None
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        self._body: _BodyProducer | None = None
        self.tls_active = False

    # twisted callbacks

    def connectionMade(self) -> None:
        if interfaces.ITCPTransport.providedBy(self.transport):
            try:
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass  # a UNIX socket (LMTP) says ITCPTransport but has no Nagle to turn off

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            replies = self._parser.feed(data)
        except ReplyError as e:
            self.fail(SessionError(f"protocol error: {e}"))
            return
        self._replies.extend(replies)
        if self._replies and self._waiting_for == "reply":
            self._resolve(self._replies.popleft())

    def handshakeCompleted(self) -> None:
        self.tls_active = True
        if self._waiting_for == "tls" and not self.transport.disconnecting:
            self._resolve(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._stop_timer()
        why = reason.getErrorMessage()
        error = SessionError(f"lost connection{self._while()}: {why}")
        if self._failure is None:
            self._failure = error
        if self._body is not None:
            self._body.abort(self._failure)
        self._reject(self._failure)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    # what the session uses

    @property
    def alive(self) -> bool:
        return not self._lost and self._failure is None

    @property
    def idle(self) -> bool:
        """Open, with nothing received that was not asked for: fit to start a new command."""
        return self.alive and not self._replies and not self._parser.pending and self._waiter is None

    def _while(self) -> str:
        return f" while waiting for {self._waiting_for_text}" if self._waiting_for else ""

    def write_lines(self, lines: list[str], tail: bytes = b"") -> None:
        """Send commands (one write, so a pipelined group leaves in one segment);
        ``tail``: bytes that follow them in the same write (a BDAT chunk)."""
        self.ensure_idle()
        send_now(self.transport, b"".join(line.encode("utf-8") + b"\r\n" for line in lines) + tail)

    def write_chunk(self, chunk: bytes, last: bool) -> None:
        """Send one BDAT command with its octets (RFC 3030 §2), in one write.

        Replies to earlier chunks may be waiting (they are read later): no idle check."""
        if self._failure is not None:
            raise self._failure
        send_now(self.transport, bdat_command(chunk, last))

    def ensure_idle(self) -> None:
        """Nothing may have arrived that we did not ask for (RFC 5321 §4.2: a reply per command)."""
        if self._replies:
            extra = self._replies[0]
            if extra.code == 421:
                raise _refused(extra, "nothing (unsolicited)")
            raise SessionError(f"protocol error: unexpected reply {extra}")
        if self._parser.pending:
            raise SessionError("protocol error: unexpected data from the server")

    def read_reply(self, timeout: float, what: str) -> Deferred[Reply]:
        if self._replies:
            return succeed(self._replies.popleft())
        if self._failure is not None:
            return fail(self._failure)
        return self._wait("reply", timeout, what)

    def take_reply(self) -> Reply | None:
        """A reply that is already here, if any (a server may answer before the end of DATA)."""
        return self._replies.popleft() if self._replies else None

    def start_tls(self, creator: Any, timeout: float) -> Deferred[None]:
        """Start the handshake; bytes already received in plaintext are an error.

        Anything after the 220 to STARTTLS and before the handshake was not
        protected and must not be taken as a reply (RFC 3207 §4.2; the
        CVE-2011-0411 class of response injection).
        """
        self.ensure_idle()
        self._parser = ReplyParser()
        d = self._wait("tls", timeout, "the TLS handshake")
        self.transport.startTLS(creator)
        return d

    def tls_description(self) -> str:
        handle = self.transport.getHandle()
        if not isinstance(handle, SSL.Connection):
            return ""
        return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"

    def send_body(self, path: Path, block_timeout: float) -> Deferred[None]:
        """Send the message file as DATA, with its end.

        A message of at most ``SMALL_BODY`` octets (most mail) goes out in one
        write, which the socket's send buffer takes at once; a bigger one is
        streamed by a :class:`_BodyProducer` as the server reads it.
        """
        if self._failure is not None:
            return fail(self._failure)
        head = QueuedMessage(path).read_start(SMALL_BODY + 1)
        if len(head) <= SMALL_BODY:
            stuffer = DotStuffer()
            send_now(self.transport, stuffer.feed(head) + stuffer.finish())
            return succeed(None)
        self._body = _BodyProducer(self, path, block_timeout)
        self._body.start()
        return self._body.done

    def fail(self, error: SessionError) -> None:
        """Give up on this connection: abort it and wake the waiter with ``error``."""
        if self._failure is None:
            self._failure = error
        if self._body is not None:
            self._body.abort(self._failure)
        self._reject(self._failure)
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()

    def close(self, timeout: float) -> Deferred[None]:
        """Close (abort after ``timeout``); fires once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
            return d
        self._closed_waiters.append(d)
        timer = self.clock.callLater(timeout, self.transport.abortConnection)

        def closed(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(closed)
        self.transport.loseConnection()
        return d

    # waiting

    def _wait(self, kind: str, timeout: float, what: str) -> Deferred[Any]:
        assert self._waiter is None, "one waiter at a time"
        d: Deferred[Any] = Deferred()
        self._waiter, self._waiting_for, self._waiting_for_text = d, kind, what
        self._timeout = timeout
        # One timer per connection, moved to each wait's deadline (a new
        # DelayedCall per reply, cancelled when it came, cost more than the
        # rest of reading that reply).  Between waits it may run out: then
        # nothing was awaited and _timed_out does nothing.
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)
        return d

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiter is not None:
            self.fail(SessionError(f"timeout after {self._timeout:g}s waiting for "
                                   f"{self._waiting_for_text}"))

    def _take_waiter(self) -> Deferred[Any] | None:
        d, self._waiter, self._waiting_for = self._waiter, None, ""
        return d

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _resolve(self, value: Any) -> None:
        d = self._take_waiter()
        if d is not None:
            d.callback(value)

    def _reject(self, error: SessionError) -> None:
        d = self._take_waiter()
        if d is not None:
            d.errback(Failure(error))


class _OneProtocolFactory(Factory):
    noisy = False  # no "Starting factory" log line per outbound connection

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._proto


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Encrypt without checking the certificate (opportunistic/require, RFC 7435).

    Still sends SNI for a DNS name, like optionsForClientTLS does.
    """

    def __init__(self, hostname: str | None) -> None:
        self._options = CertificateOptions()  # verify=False by default
        self._sni = None
        if hostname and not isIPAddress(hostname) and not isIPv6Address(hostname):
            try:
                self._sni = hostname.encode("idna")
            except UnicodeError:
                self._sni = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


# --- the state machine -------------------------------------------------------------------


class State(Enum):
    CONNECTING = "connecting"
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    LHLO = "LHLO"  # RFC 2033 §4.1, instead of EHLO
    STARTTLS = "STARTTLS"
    TLS_HANDSHAKE = "TLS handshake"
    EHLO_AFTER_TLS = "EHLO after STARTTLS"
    LHLO_AFTER_TLS = "LHLO after STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DATA_BODY = "message data"
    DATA_DONE = "end of data"
    BDAT = "BDAT"  # RFC 3030: chunks sent, their replies coming
    BDAT_DONE = "end of BDAT"  # the LAST chunk got a 2xx: the transaction is over
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSED = "closed"


S = State
# Who may follow whom.  A transaction refused before MAIL (SMTPUTF8, SIZE) sends
# nothing and leaves the state as it was.  Any state may go to CLOSED.
_TRANSITIONS: dict[State, frozenset[State]] = {
    S.CONNECTING: frozenset({S.GREETING}),
    S.GREETING: frozenset({S.EHLO, S.LHLO, S.QUIT}),
    S.EHLO: frozenset({S.HELO, S.STARTTLS, S.AUTH, S.MAIL, S.QUIT}),
    S.HELO: frozenset({S.AUTH, S.MAIL, S.QUIT}),
    S.LHLO: frozenset({S.STARTTLS, S.AUTH, S.MAIL, S.QUIT}),  # no HELO fallback
    S.STARTTLS: frozenset({S.TLS_HANDSHAKE, S.AUTH, S.MAIL, S.QUIT}),  # plaintext if refused
    S.TLS_HANDSHAKE: frozenset({S.EHLO_AFTER_TLS, S.LHLO_AFTER_TLS}),
    S.EHLO_AFTER_TLS: frozenset({S.AUTH, S.MAIL, S.QUIT}),
    S.LHLO_AFTER_TLS: frozenset({S.AUTH, S.MAIL, S.QUIT}),
    S.AUTH: frozenset({S.MAIL, S.QUIT}),
    S.MAIL: frozenset({S.RCPT, S.RSET, S.QUIT}),
    S.RCPT: frozenset({S.DATA, S.BDAT, S.RSET, S.QUIT}),
    S.DATA: frozenset({S.DATA_BODY, S.DATA_DONE, S.RSET, S.QUIT}),
    S.DATA_BODY: frozenset({S.DATA_DONE}),
    S.DATA_DONE: frozenset({S.MAIL, S.RSET, S.QUIT}),
    S.BDAT: frozenset({S.BDAT_DONE, S.RSET, S.QUIT}),
    S.BDAT_DONE: frozenset({S.MAIL, S.RSET, S.QUIT}),
    S.RSET: frozenset({S.MAIL, S.QUIT}),
    S.QUIT: frozenset(),
    S.CLOSED: frozenset(),
}
_TRANSITIONS = {state: nexts | {S.CLOSED} for state, nexts in _TRANSITIONS.items()}


class _Session:
    """One connection's dialogue, written as a linear coroutine over :class:`State`."""

    def __init__(self, proto: SMTPClientProtocol, options: ClientOptions, result: SessionResult,
                 tls_creator: Any) -> None:
        self.proto = proto
        self.options = options
        self.t = options.timeouts
        self.result = result
        self.state = State.CONNECTING
        self.caps = Capabilities()
        self._tls_creator = tls_creator
        self.opened_at = proto.clock.seconds()
        self.body_started = False  # the message data began to go out (this transaction set)

    @property
    def reusable(self) -> bool:
        """Still open, idle and between transactions (for :class:`ConnectionCache`)."""
        return self.state in (State.DATA_DONE, State.BDAT_DONE, State.RSET) and self.proto.idle

    def _enter(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"SMTP client: no transition {self.state.name} -> {state.name}")
        self.state = state

    async def run(self, transactions: list[TransactionResult], *, reused: bool = False,
                  keep: bool = False) -> bool:
        """Run ``transactions`` (after the opening unless ``reused``) and QUIT.

        With ``keep`` a connection whose last transaction ended cleanly (a
        reply to the end of DATA, or to RSET) is left open instead, and True is
        returned: the caller may hand it to a :class:`ConnectionCache`.
        """
        kept = False
        try:
            if not reused:
                await self._open()
            await self._transactions(transactions)
            if keep and self.reusable:
                kept = True
                return True
            await self._quit()
        except SessionError as e:
            self.result.connection_error = str(e)
            self.result.error_status = e.status
            if self.state is State.TLS_HANDSHAKE:
                self.result.tls_failed = True
            if e.polite and self.proto.alive:
                await self._quit()
            else:
                self.proto.fail(e)
        finally:
            if not kept:
                await self.proto.close(self.t.quit)
                self._enter(State.CLOSED)
        return False

    async def finish(self) -> None:
        """QUIT and close a connection left open by ``run(keep=True)``."""
        try:
            await self._quit()
        finally:
            await self.proto.close(self.t.quit)
            self._enter(State.CLOSED)

    # commands and replies

    async def _read(self, timeout: float, stage: str) -> Reply:
        reply = await self.proto.read_reply(timeout, f"the reply to {stage}")
        if reply.code == 421:  # RFC 5321 §3.8: the server is closing the channel
            raise _refused(reply, stage)
        return reply

    async def _read_any(self, timeout: float, stage: str) -> Reply:
        """A reply, 421 included: for the transaction's replies, where those that came
        before a 421 must still be applied (the 421 ends the session afterwards)."""
        return await self.proto.read_reply(timeout, f"the reply to {stage}")

    async def _command(self, line: str, timeout: float, stage: str | None = None) -> Reply:
        self.proto.write_lines([line])
        return await self._read(timeout, stage or line.split(" ", 1)[0])

    # opening: greeting, EHLO, STARTTLS, AUTH

    async def _open(self) -> None:
        self._enter(State.GREETING)
        greeting = await self._read(self.t.greeting, "the greeting")
        if greeting.code != 220:  # RFC 5321 §3.1: 554 means no service here
            raise _refused(greeting, "the greeting")
        self.caps = await self._hello(State.LHLO if self.options.lmtp else State.EHLO)
        if self._want_tls():
            await self._starttls()
        if self.options.username is not None:
            await self._auth()

    async def _hello(self, state: State) -> Capabilities:
        self._enter(state)
        verb = "LHLO" if self.options.lmtp else "EHLO"
        reply = await self._command(f"{verb} {self.options.helo_name}", self.t.ehlo)
        if reply.code == 250:
            return Capabilities.from_ehlo(reply)
        if reply.kind == 5 and state is State.EHLO:  # RFC 5321 §4.1.4: fall back to HELO
            self._enter(State.HELO)
            reply = await self._command(f"HELO {self.options.helo_name}", self.t.ehlo)
            if reply.code == 250:
                return Capabilities()
        raise _refused(reply, state.value)

    def _want_tls(self) -> bool:
        policy = self.options.tls_policy
        if policy == "none" or (self.options.lmtp and policy == "opportunistic"):
            return False  # LMTP: only when asked for (RFC 2033: a local, trusted link)
        if self.caps.has("STARTTLS"):
            return True
        if policy == "opportunistic":
            return False
        raise SessionError(f"TLS is required (policy {policy}) but the server does not offer STARTTLS",
                           "4.7.10", polite=True)

    async def _starttls(self) -> None:
        self._enter(State.STARTTLS)
        reply = await self._command("STARTTLS", self.t.ehlo)
        if reply.code != 220:
            if self.options.tls_policy == "opportunistic":  # RFC 3207 §4: may go on in plaintext
                return
            raise SessionError(f"STARTTLS refused: {reply}", "4.7.10", polite=True)
        self._check_nothing_after_starttls()
        self._enter(State.TLS_HANDSHAKE)
        try:
            await self.proto.start_tls(self._tls_creator, self.t.tls)
        except SessionError as e:
            raise SessionError(f"TLS handshake failed: {e}", "4.7.5") from None
        self.result.tls = self.proto.tls_description()
        self.result.tls_verified = self.options.tls_policy == "verify"
        # RFC 3207 §4.2: forget everything learned before TLS and ask again.
        self.caps = await self._hello(State.LHLO_AFTER_TLS if self.options.lmtp
                                      else State.EHLO_AFTER_TLS)

    def _check_nothing_after_starttls(self) -> None:
        try:
            self.proto.ensure_idle()
        except SessionError:
            raise SessionError("protocol error: the server sent data after its STARTTLS reply, "
                               "before the TLS handshake (possible response injection)") from None

    async def _auth(self) -> None:
        self._enter(State.AUTH)
        if not self.proto.tls_active:
            raise SessionError("credentials are configured but the connection is not encrypted; "
                               "not sending the password in clear", "4.7.10", polite=True)
        user, password = self.options.username or "", self.options.password or ""
        mechanisms = self.caps.auth_mechanisms
        if "PLAIN" in mechanisms:  # RFC 4616 §2: authzid NUL authcid NUL passwd
            token = _b64(f"\0{user}\0{password}")
            reply = await self._command(f"AUTH PLAIN {token}", self.t.ehlo, "AUTH PLAIN")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", self.t.ehlo)
            if reply.code == 334:
                reply = await self._command(_b64(user), self.t.ehlo, "AUTH LOGIN username")
            if reply.code == 334:
                reply = await self._command(_b64(password), self.t.ehlo, "AUTH LOGIN password")
        else:
            offered = " ".join(sorted(mechanisms)) or "no AUTH"
            raise SessionError(f"no usable AUTH mechanism (server offers {offered})", "4.7.8",
                               polite=True)
        if reply.code != 235:
            raise SessionError(f"authentication failed: {reply}", reply.enhanced or "4.7.8",
                               polite=reply.code != 421)

    # transactions

    async def _transactions(self, results: list[TransactionResult]) -> None:
        todo = deque((tr, list(dict.fromkeys(tr.transaction.recipients))) for tr in results)
        need_rset = False
        for _ in range(10_000):  # bound; each retry round delivers at least one recipient
            if not todo:
                return
            tr, recipients = todo.popleft()
            if need_rset:
                self._enter(State.RSET)
                reply = await self._command("RSET", self.t.ehlo)
                if reply.code != 250:
                    raise _refused(reply, "RSET")
            completed, retry = await self._transaction(tr, recipients)
            need_rset = not completed
            if retry:  # RFC 5321 §4.5.3.1.10: the rest go in a new transaction
                todo.appendleft((tr, retry))
        raise RuntimeError("SMTP client: transaction loop did not end")

    def _refuse_locally(self, tr: TransactionResult, recipients: list[str]) -> bool:
        """Checks before MAIL; True if the whole transaction was refused here."""
        tx = tr.transaction
        reason: RecipientReply | None = None
        if tx.needs_smtputf8 and not self.caps.has("SMTPUTF8"):
            reason = RecipientReply(553, "5.6.7", f"the message needs SMTPUTF8 but {self.result.server} "
                                    "does not offer it (RFC 6531 §3.4)", Outcome.FAILED)
        elif self.caps.size_limit and tx.size > self.caps.size_limit:
            reason = RecipientReply(552, "5.3.4", f"message size {tx.size} exceeds the limit "
                                    f"{self.caps.size_limit} of {self.result.server} (RFC 1870)",
                                    Outcome.FAILED)
        elif tx.binarymime and not (self._chunking and self.caps.has("BINARYMIME")):
            # RFC 3030 §3: no downgrade of binary content; RFC 3463 5.6.3.
            reason = RecipientReply(554, "5.6.3", f"conversion required but not supported: the "
                                    f"message is BINARYMIME and {self.result.server} does not "
                                    "offer CHUNKING and BINARYMIME (RFC 3030)", Outcome.FAILED)
        if reason is None:
            return False
        for r in recipients:
            tr.replies[r] = reason
        return True

    def _mail_command(self, tx: Transaction) -> str:
        params = []
        if self.caps.has("SIZE"):
            params.append(f"SIZE={tx.size}")  # RFC 1870 §5
        if tx.binarymime:
            params.append("BODY=BINARYMIME")  # RFC 3030 §3 (only sent with CHUNKING)
        elif tx.body_8bit and self.caps.has("8BITMIME"):
            params.append("BODY=8BITMIME")  # RFC 6152 §2
        if tx.needs_smtputf8:
            params.append("SMTPUTF8")  # RFC 6531 §3.4
        if tx.dsn_mail and self.caps.has("DSN"):
            params.extend(tx.dsn_mail)  # RFC 3461 §4.3, §4.4
        return " ".join([f"MAIL FROM:<{tx.sender}>", *params])

    async def _transaction(self, tr: TransactionResult, recipients: list[str]) -> tuple[bool, list[str]]:
        """Run MAIL/RCPT/DATA; returns (ended with a DATA reply, recipients to retry).

        A 421 among the MAIL/RCPT/DATA replies (RFC 5321 §3.8: the server closes, as
        chasquid does after three errors) ends the reading there; every reply that came
        before it is still applied (a 5xx MAIL fails every recipient, a 5xx/4xx RCPT
        fails/defers its recipient), and only then does the 421 end the session, with
        the recipients still open left unanswered (for the next server or a retry).
        """
        if not recipients or self._refuse_locally(tr, recipients):
            return True, []
        tx = tr.transaction
        mail_line = self._mail_command(tx)
        rcpt_lines = [f"RCPT TO:<{r}>" for r in recipients]
        if tx.dsn_rcpt and self.caps.has("DSN"):  # RFC 3461 §4.1, §4.2
            tr.dsn = True
            rcpt_lines = [f"{line} {tx.dsn_rcpt[r]}" if tx.dsn_rcpt.get(r) else line
                          for line, r in zip(rcpt_lines, recipients, strict=True)]
        pipelined = self.caps.has("PIPELINING")
        closing: tuple[Reply, str] | None = None  # a 421 and what it answered
        rcpt_replies: list[Reply] = []
        data: Reply | None = None
        chunked = self._chunking
        small = self._small_chunk(tx) if chunked and pipelined else None
        last: Reply | None = None  # the reply to a pipelined BDAT LAST
        self._enter(State.MAIL)
        if pipelined:  # RFC 2920 §3.1: MAIL, the RCPTs and DATA (or a small BDAT LAST) in one group
            self.proto.write_lines([mail_line, *rcpt_lines, *(() if chunked else ("DATA",))],
                                   tail=small or b"")
            mail = await self._read(self.t.mail, "MAIL FROM")
            self._enter(State.RCPT)
            for _ in recipients:
                reply = await self._read_any(self.t.rcpt, "RCPT TO")
                if reply.code == 421:
                    closing = (reply, "RCPT TO")
                    break
                rcpt_replies.append(reply)
            if closing is None and small is not None:
                last = await self._read_pipelined_last()
                if last.code == 421:
                    closing, last = (last, "BDAT LAST"), None
            elif closing is None and not chunked:
                self._enter(State.DATA)
                data = await self._read_any(self.t.data_init, "DATA")
                if data.code == 421:
                    closing, data = (data, "DATA"), None
        else:
            mail = await self._command(mail_line, self.t.mail, "MAIL FROM")
            if mail.kind == 2:
                self._enter(State.RCPT)
                for line in rcpt_lines:
                    self.proto.write_lines([line])
                    reply = await self._read_any(self.t.rcpt, "RCPT TO")
                    if reply.code == 421:
                        closing = (reply, "RCPT TO")
                        break
                    rcpt_replies.append(reply)

        if mail.kind != 2:
            if mail.kind == 5:  # the whole transaction fails
                for r in recipients:
                    tr.replies[r] = mail.as_recipient_reply(Outcome.FAILED)
            if closing is not None:
                raise _refused(*closing)
            await self._drain_unwanted_data(data)
            if mail.kind == 5:
                return False, []
            raise _refused(mail, "MAIL FROM")

        accepted, retry = self._sort_rcpt_replies(tr, recipients[:len(rcpt_replies)], rcpt_replies)
        if closing is not None:  # the accepted and the unread stay unanswered
            raise _refused(*closing)
        if not accepted:  # RFC 2920 §3.1: DATA then gets 503/554
            await self._drain_unwanted_data(data)
            return False, retry
        if chunked:
            return await self._bdat(tr, accepted, last), retry
        if data is None:
            self._enter(State.DATA)
            data = await self._command("DATA", self.t.data_init)
        if data.code != 354:
            self._final(tr, accepted, data, "DATA")
            return False, retry

        self._enter(State.DATA_BODY)
        early = await self._send_body(tx)
        if early is not None:  # the server answered the message as a whole, before its end
            self._final(tr, accepted, early, "end of data")
        elif self.options.lmtp:
            await self._lmtp_replies(tr, accepted)
        else:
            self._final(tr, accepted, await self._read(self.t.data_end, "end of data"), "end of data")
        return True, retry

    def _sort_rcpt_replies(self, tr: TransactionResult, recipients: list[str],
                           replies: list[Reply]) -> tuple[list[str], list[str]]:
        accepted: list[str] = []
        too_many: list[tuple[str, Reply]] = []
        for r, reply in zip(recipients, replies, strict=True):
            if reply.kind == 2:
                accepted.append(r)
            elif reply.code == 452:  # too many recipients (RFC 5321 §4.5.3.1.10)
                too_many.append((r, reply))
            elif reply.kind == 4:
                tr.replies[r] = reply.as_recipient_reply(Outcome.DEFERRED)
            elif reply.kind == 5:
                tr.replies[r] = reply.as_recipient_reply(Outcome.FAILED)
            else:
                raise SessionError(f"protocol error: {reply} in reply to RCPT TO")
        if accepted:
            return accepted, [r for r, _ in too_many]
        for r, reply in too_many:  # nothing went through: no point in trying again now
            tr.replies[r] = reply.as_recipient_reply(Outcome.DEFERRED)
        return accepted, []

    async def _drain_unwanted_data(self, data: Reply | None) -> None:
        """A pipelined DATA that was accepted though there is nothing to send: end it empty."""
        if data is not None and data.code == 354:
            self._enter(State.DATA_DONE)
            self.proto.transport.write(b".\r\n")
            await self._read(self.t.data_end, "end of data")

    def _final(self, tr: TransactionResult, accepted: list[str], reply: Reply, stage: str) -> None:
        if reply.kind == 2:
            outcome = Outcome.DELIVERED
        elif reply.kind == 4:
            outcome = Outcome.DEFERRED
        elif reply.kind == 5:
            outcome = Outcome.FAILED
        else:
            raise SessionError(f"protocol error: {reply} in reply to {stage}")
        for r in accepted:
            tr.replies[r] = reply.as_recipient_reply(outcome)

    async def _lmtp_replies(self, tr: TransactionResult, accepted: list[str]) -> None:
        """RFC 2033 §4.2: one reply per accepted RCPT, in RCPT order, each for that recipient.

        A failure on the way (lost connection, timeout, 421) ends the session:
        the recipients not answered yet stay unanswered.
        """
        for r in accepted:
            reply = await self._read(self.t.data_end, f"end of data for <{r}>")
            self._final(tr, [r], reply, f"end of data for <{r}>")

    async def _send_body(self, tx: Transaction) -> Reply | None:
        """Stream the message and its end; a reply only if the server answered before the end."""
        self.body_started = True
        try:
            await self.proto.send_body(tx.data_path, self.t.data_block)
        except SessionError:
            early = self.proto.take_reply()  # the server may have answered and closed
            if early is None:
                raise
            self._enter(State.DATA_DONE)
            if early.code == 421:
                raise _refused(early, "the message data") from None
            return early
        except OSError as e:  # the queue file could not be read: not the server's fault
            raise SessionError(f"cannot read the message file: {e.strerror}", "4.3.0") from None
        self._enter(State.DATA_DONE)
        return None

    # BDAT (CHUNKING, RFC 3030)

    @property
    def _chunking(self) -> bool:
        """Send with BDAT: the server (SMTP or LMTP) offers CHUNKING."""
        return self.caps.has("CHUNKING")

    def _small_chunk(self, tx: Transaction) -> bytes | None:
        """The whole message as one ``BDAT n LAST``, if it is at most SMALL_BODY octets."""
        try:
            head = QueuedMessage(tx.data_path).read_start(SMALL_BODY + 1)
        except OSError as e:  # not the server's fault; nothing was sent yet
            raise SessionError(f"cannot read the message file: {e.strerror}", "4.3.0",
                               polite=True) from None
        return bdat_command(head, True) if len(head) <= SMALL_BODY else None

    async def _read_pipelined_last(self) -> Reply:
        """The reply to the BDAT LAST sent with MAIL and the RCPTs (whatever theirs were:
        the server read and answered it in any case, RFC 3030 §2); a 421 is returned
        too, for the caller to apply the replies before it first."""
        self.body_started = True
        self._enter(State.BDAT)
        return await self._read_any(self.t.data_end, "BDAT LAST")

    async def _bdat(self, tr: TransactionResult, accepted: list[str], last: Reply | None) -> bool:
        """Send the message with BDAT (unless a pipelined BDAT LAST already carried
        it: ``last``) and give the accepted recipients its result.  True when the
        LAST chunk got a 2xx (the transaction is over; otherwise RSET follows).

        LMTP: the LAST chunk is answered once per accepted recipient, in RCPT
        order (RFC 2033 §4.2); ``last`` is then the first of those replies, and
        the transaction is over whatever they say."""
        answered_last = True
        if last is None:
            self._enter(State.BDAT)
            last, answered_last = await self._send_chunks(tr.transaction)
        if self.options.lmtp and answered_last:
            self._final(tr, accepted[:1], last, f"BDAT LAST for <{accepted[0]}>")
            await self._lmtp_replies(tr, accepted[1:])
            self._enter(State.BDAT_DONE)
            return True
        self._final(tr, accepted, last, "BDAT")
        if last.kind != 2:
            return False
        self._enter(State.BDAT_DONE)
        return True

    async def _send_chunks(self, tx: Transaction) -> tuple[Reply, bool]:
        """Stream the file as BDAT chunks; the reply that decides the message: the
        LAST chunk's (with True), or the first refusal of a chunk (with False; no
        more are sent then).  LMTP waits for each chunk's reply before the next
        one, so its LAST is only sent once every other chunk was accepted.

        Each chunk is one read of the file, its size exact; a chunk is read
        ahead to know which one is LAST (an empty message is ``BDAT 0 LAST``).
        Every chunk sent has its reply read before this returns, so the
        session stays in step.  Non-LAST replies wait ``data_block`` at most,
        the LAST one ``data_end`` (RFC 5321 §4.5.3.2.5-6)."""
        self.body_started = True
        window = BDAT_WINDOW if self.caps.has("PIPELINING") and not self.options.lmtp else 1
        due = 0  # chunks sent whose reply has not been read
        refusal: Reply | None = None
        try:
            with QueuedMessage(tx.data_path).open() as f:
                chunk = f.read(CHUNK_SIZE)
                for _ in range(MAX_BDAT_CHUNKS):
                    following = f.read(CHUNK_SIZE) if chunk else b""
                    self.proto.write_chunk(chunk, not following)
                    due += 1
                    if not following:
                        break
                    chunk = following
                    while due >= window and refusal is None:
                        reply = await self._read(self.t.data_block, "BDAT")
                        due -= 1
                        if reply.kind != 2:
                            refusal = reply
                    if refusal is not None:
                        break
                else:
                    raise RuntimeError("SMTP client: BDAT chunk loop did not end")
        except OSError as e:  # the queue file could not be read: not the server's fault
            raise SessionError(f"cannot read the message file: {e.strerror}", "4.3.0") from None
        except SessionError:
            early = self._early_refusal(due)  # a server that refused a chunk and closed
            if early is None:
                raise
            return early, False
        if refusal is not None:  # no LAST was sent: the replies due, to stay in step
            for _ in range(due):
                await self._read(self.t.data_block, "BDAT")
            return refusal, False
        for _ in range(due - 1):
            reply = await self._read(self.t.data_block, "BDAT")
            if reply.kind != 2 and refusal is None:
                refusal = reply
        final = await self._read(self.t.data_end, "BDAT LAST")
        return (refusal, False) if refusal is not None else (final, True)

    def _early_refusal(self, due: int) -> Reply | None:
        """After the connection failed while sending chunks: a refusal among the
        (at most ``due``) replies already received, if any."""
        for _ in range(due):
            reply = self.proto.take_reply()
            if reply is None:
                return None
            if reply.code == 421:
                raise _refused(reply, "BDAT")
            if reply.kind != 2:
                return reply
        return None

    async def _quit(self) -> None:
        if not self.proto.alive:
            return
        self._enter(State.QUIT)
        try:
            self.proto.write_lines(["QUIT"])
            await self.proto.read_reply(self.t.quit, "the reply to QUIT")
        except SessionError:
            pass  # the result no longer depends on the server


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# --- entry point -------------------------------------------------------------------------


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> interfaces.IStreamClientEndpoint:
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _tls_creator(options: ClientOptions, server: str) -> Any:
    if options.tls_policy == "verify":
        # RFC 7672-style verification is out of scope; this is the certificate checked
        # with service_identity against the MX / smarthost name (RFC 6125).
        name = options.tls_hostname or server
        return optionsForClientTLS(name, trustRoot=options.trust_root)
    return _UnverifiedClientTLS(options.tls_hostname)


def cache_key(host: str, port: int, server: str, options: ClientOptions) -> tuple[Any, ...]:
    """What a cached connection is kept under: the server and every option the
    session was opened with (a connection is reused only with the same ones)."""
    return (host, port, server, options.tls_policy, options.tls_hostname, options.username,
            options.password, options.lmtp, options.helo_name)


async def send(reactor: Any, destination: interfaces.IStreamClientEndpoint | tuple[str, int],
               transactions: list[Transaction], options: ClientOptions, *,
               clock: interfaces.IReactorTime | None = None,
               server: str | None = None, cache: ConnectionCache | None = None) -> SessionResult:
    """Connect to one server and run ``transactions`` on it; never raises for network errors.

    ``destination`` is an endpoint or ``(host, port)``; ``server`` names the
    server in results and logs (default: the host).  Every timer runs on
    ``clock`` (default: ``reactor``).  With a ``cache`` (and a ``(host, port)``
    destination) an open connection to the same server with the same options
    is reused, and this one is left open in the cache afterwards.
    """
    clock = clock or reactor
    key: tuple[Any, ...] | None = None
    if isinstance(destination, tuple):
        host, port = destination
        endpoint = _endpoint(reactor, host, port, options.timeouts.connect)
        server = server or host
        if cache is not None and cache.enabled:
            key = cache_key(host, port, server, options)
    else:
        endpoint = destination
        server = server or str(destination)

    def new_result() -> SessionResult:
        return SessionResult(server=server, transactions=[TransactionResult(tx) for tx in transactions])

    result = new_result()
    session: _Session | None = cache.take(key) if cache is not None and key is not None else None  # type: ignore[assignment]
    if session is not None:
        result.tls, result.tls_verified = session.result.tls, session.result.tls_verified
        session.result = result
        session.body_started = False
        if await session.run(result.transactions, reused=True, keep=True):
            cache.put(key, session)  # type: ignore[union-attr]
        elif (result.connection_error is not None and not session.body_started
              and not any(tr.replies for tr in result.transactions)):
            # The reused connection failed before any recipient was answered and
            # before the message data went out (closed while idle, or a 421 to
            # MAIL from a server that limits messages per connection): nothing
            # was taken there, so a new connection gets the whole transaction.
            result, session = new_result(), None
    if session is None:
        proto = SMTPClientProtocol(clock)
        if await _connect(clock, endpoint, proto, options.timeouts.connect, result):
            session = _Session(proto, options, result, _tls_creator(options, server))
            if await session.run(result.transactions, keep=key is not None):
                cache.put(key, session)  # type: ignore[union-attr]
    _log_result(result, "LMTP" if options.lmtp else "SMTP")
    return result


async def _connect(clock: interfaces.IReactorTime, endpoint: interfaces.IStreamClientEndpoint,
                   proto: SMTPClientProtocol, timeout: float, result: SessionResult) -> bool:
    d = endpoint.connect(_OneProtocolFactory(proto))
    timer = clock.callLater(timeout, d.cancel)
    try:
        await d
        return True
    except CancelledError:
        reason = f"timeout after {timeout:g}s"
    except Exception as e:
        reason = str(e) or type(e).__name__
    finally:
        if timer.active():
            timer.cancel()
    result.connection_error = f"connect to {result.server} failed: {reason}"
    result.error_status = "4.4.1"  # RFC 3463: no answer from host
    return False


def _log_result(result: SessionResult, protocol: str) -> None:
    """One line per transaction on a server that failed; the queue runner logs every
    recipient's outcome anyway (``delivery ...``), so a session that went well adds none."""
    if result.connection_error is None:
        return
    for tr in result.transactions:
        tx = tr.transaction
        outcomes = ", ".join(f"{r}={tr.replies[r].outcome}" if r in tr.replies else f"{r}=unanswered"
                             for r in dict.fromkeys(tx.recipients))
        log.info(
            "{protocol} to {server} ({tls}): from={sender} {outcomes}{error}",
            protocol=protocol,
            server=result.server,
            tls=result.tls or "no TLS",
            sender=tx.sender or "<>",
            outcomes=outcomes,
            error=f"; server failed: {result.connection_error}" if result.connection_error else "",
            replies={r: str(reply) for r, reply in tr.replies.items()},
            connection_error=result.connection_error,
            size=tx.size,
        )
