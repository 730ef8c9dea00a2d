"""The SMTP server session (RFC 5321 with ESMTP extensions), one per connection.

One method per verb (``smtp_EHLO``, ``smtp_MAIL`` ...) takes the argument text
and returns a :class:`~mta.mail.replies.Reply`, or a Deferred that fires with
one when the answer needs I/O (SPF, password checks, the queue's fsync).  While
such a Deferred is pending the session processes no further pipelined input,
so replies always go out in command order (RFC 2920 §3); what arrives
meanwhile is kept, and reading stops once ``BUSY_READ_LIMIT`` octets wait (not
before: most clients wait for the reply, and pausing and resuming the socket
would cost two epoll changes per message).

Input handling is strict and bounded:

* command lines end only at CRLF; a bare CR or LF in a command is refused;
* an over-long command line is discarded as it arrives (memory and CPU stay
  linear) and answered with 500 once its CRLF comes;
* after STARTTLS, everything the client sent before the handshake is thrown
  away and the session starts over (RFC 3207 §4.2);
* the DATA phase is handled by :class:`mta.mail.reader.DataReader`;
* BDAT (CHUNKING, RFC 3030) reads exactly the announced octets after its
  line, whatever the reply, into a :class:`mta.mail.reader.ChunkReader` (the
  same checks, no dot-unstuffing; BODY=BINARYMIME skips the body's line rules).

Decisions (connection limits, the HELO name, sender binding, SPF, who may
relay, which recipients exist, header fixes, DKIM/DMARC, SRS) are the checks
of the staged pipeline (:mod:`mta.smtp.pipeline`, configured in ``[checks]``);
the session asks it at each stage (:class:`~mta.mail.checks.Stage`) and
replies.  What stays here are the protocol's own rules (syntax, command
order, the limits on sizes, lines and recipients, the early-talker wait,
which is about the protocol's framing, not a decision about the client).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.config import Config, Listener
from mta.mail import replies as R
from mta.mail.address import (
    Address,
    AddressError,
    DuplicateParameter,
    parse_path,
    split_path_and_params,
)
from mta.mail.checks import ACCEPT, EMPTY, Action, Stage, Verdict
from mta.mail.reader import ChunkReader, DataError, DataReader
from mta.mail.replies import Reply
from mta.policy.received import TraceInfo, received_header
from mta.policy.relay import relay_allowed
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.store import MessageWriter, QueueError, QueueStore
from mta.smtp import dsnparams
from mta.system.netio import send_now

log = Logger()

HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "CONNECT", "OPTIONS", "PATCH", "TRACE"})
# RFC 4954 §4: an AUTH response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# Octets of unprocessed input kept while a reply is pending; past it the
# session stops reading until the reply has gone out.
BUSY_READ_LIMIT = 64 * 1024
# Refused recipients logged one by one per session; past that they are counted
# and logged in one line when the session ends (an enumeration or dictionary
# attack must not write a line per guess), with this many of them as a sample.
RCPT_REFUSALS_LOGGED = 10
RCPT_REFUSAL_SAMPLE = 5
# RFC 3030 §2: "BDAT" SP chunk-size [SP "LAST"]; at most 20 digits (the size is
# bounded: whatever it is, that many octets are read before the reply).
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?: (LAST))? *", re.IGNORECASE)


class Phase(Enum):
    COMMAND = "command"
    AUTH = "auth"  # waiting for a SASL response line
    DATA = "data"
    BDAT = "bdat"  # reading the octets of a BDAT chunk (RFC 3030)
    CLOSED = "closed"


@dataclass
class ServerContext:
    """What every session of the process shares: configuration and policy objects.

    ``users``, ``aliases`` and ``tls`` may be replaced on reload; a session reads
    them when it needs them.
    """

    config: Config
    store: QueueStore
    users: Any  # mta.policy.auth.UserDB
    aliases: Any  # mta.policy.aliases.AliasResolver
    clock: interfaces.IReactorTime
    tls: Any = None  # a server context factory, or None
    spf: Any = None  # mta.policy.spf.SPFChecker, or None
    abuse: Any = None  # mta.policy.limits.AbuseLimits
    srs: Any = None  # mta.policy.srs.SRSRewriter
    authenticator: Any = None  # mta.policy.msgauth.MessageAuthenticator, or None
    identities: Any = None  # mta.policy.identities.Identities
    connections: dict[str, int] = field(default_factory=dict)
    sessions: set[SMTPSession] = field(default_factory=set)
    accepting: bool = True
    # Called with (session, reply) for metrics; optional.
    observer: Any = None
    # The check pipeline (mta.smtp.pipeline); made from config.checks when not given.
    pipeline: Any = None

    def __post_init__(self) -> None:
        if self.pipeline is None:
            from mta.smtp.pipeline import build_pipeline

            self.pipeline = build_pipeline(self.config, self, self.clock)

    @property
    def total_connections(self) -> int:
        return len(self.sessions)


@dataclass
class Transaction:
    """One mail transaction: MAIL FROM to the end of DATA (RFC 5321 §3.3)."""

    sender: Address | None
    body_8bit: bool = False
    binarymime: bool = False  # BODY=BINARYMIME (RFC 3030 §3): BDAT only
    smtputf8: bool = False
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    rcpt_addresses: list[str] = field(default_factory=list)
    # What the checks of MAIL and RCPT added: headers for just above our Received
    # (Received-SPF), Authentication-Results entries, facts for later checks.
    trace_headers: tuple[bytes, ...] = ()
    top_headers: tuple[bytes, ...] = ()  # from HEADERS: on top, with Authentication-Results
    auth_results: tuple[Any, ...] = ()
    facts: Any = None  # Mapping[str, Any] once a check said something
    header_lines: list[bytes] = field(default_factory=list)  # the message's header section
    # DSN (RFC 3461): RET and ENVID from MAIL; dsn is set by any DSN parameter.
    ret: str = ""
    envid: str = ""
    dsn: bool = False

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else str(self.sender)

    def add(self, verdict: Verdict, top: bool = False) -> None:
        """Keep what a verdict of MAIL or RCPT (or, ``top``, HEADERS) added."""
        if verdict.headers and top:
            self.top_headers += verdict.headers
        elif verdict.headers:
            self.trace_headers += verdict.headers
        if verdict.auth_results:
            self.auth_results += verdict.auth_results
        if verdict.facts:
            self.facts = {**(self.facts or EMPTY), **verdict.facts}


class SessionView:
    """The read-only view of a session that its checks get (:class:`mta.mail.checks.CheckState`).

    One per session; it reads through to the session, so it is never stale.
    The stage's subject is set by the session before it asks the pipeline:
    ``recipient`` at RCPT, ``header_lines`` at HEADERS (the pipeline also
    writes the checks' rewrites there), ``message`` at MESSAGE.
    """

    __slots__ = ("_s", "recipient", "header_lines", "message")

    def __init__(self, session: SMTPSession) -> None:
        self._s = session
        self.recipient: Address | None = None
        self.header_lines: Sequence[bytes] = ()
        self.message: bytes | None = None

    @property
    def client_ip(self) -> str:
        return self._s.client_ip

    @property
    def trusted(self) -> bool:
        return self._s._trusted

    @property
    def listener_kind(self) -> str:
        return self._s.listener.kind

    @property
    def helo(self) -> str:
        return self._s.helo or ""

    @property
    def esmtp(self) -> bool:
        return self._s.esmtp

    @property
    def tls_active(self) -> bool:
        return self._s.tls_active

    @property
    def auth_user(self) -> str | None:
        return self._s.auth_user

    @property
    def sender(self) -> str | None:
        txn = self._s.txn
        return None if txn is None else txn.sender_text

    @property
    def recipients(self) -> list[str]:
        txn = self._s.txn
        return [] if txn is None else txn.rcpt_addresses

    @property
    def expanded(self) -> list[Recipient]:
        txn = self._s.txn
        return [] if txn is None else txn.recipients

    @property
    def facts(self) -> Any:
        txn = self._s.txn
        return EMPTY if txn is None or txn.facts is None else txn.facts


@implementer(interfaces.IHandshakeListener)
class SMTPSession(Protocol):
    def __init__(self, context: ServerContext, listener: Listener) -> None:
        self.ctx = context
        self.config = context.config
        self.pipeline = context.pipeline
        self.view = SessionView(self)
        self.limits = context.config.limits
        self.listener = listener
        self.phase = Phase.COMMAND
        self._buf = b""
        self._pos = 0
        self._scan = 0  # where to resume looking for CRLF in _buf
        self._discarding = False  # inside an over-long command line
        self._busy = False
        self._paused = False  # reading stopped while busy (BUSY_READ_LIMIT)
        self._idle_timer: Any = None
        self._life_timer: Any = None
        self.client_ip = ""
        self._trusted = False
        self.helo: str | None = None
        self.esmtp = False
        self.tls_version = ""
        self.tls_cipher = ""
        self.tls_active = False
        self.auth_user: str | None = None
        self.auth_failures = 0
        self.errors = 0
        self._rcpt_refusals = 0  # refused RCPTs in this session (see _rcpt_rejected)
        self._unlogged_refusals: dict[str, int] = {}  # past the first few: by RFC 3463 code
        self._refusal_sample: list[str] = []
        self.txn: Transaction | None = None
        self._auth_step: Any = None
        self._data: DataReader | None = None
        self._writer: MessageWriter | None = None
        # The next message's queue writer with its trace headers, made right after
        # the 354 went out, while the client sends the message (see _prepare_writer).
        self._ready_writer: MessageWriter | None = None
        self._ready_trace = b""  # its trace headers, written by _open_writer
        self._prepare_after_flush = False
        self._after_reply: list[Any] = []  # done once an asynchronous reply has gone out
        self._queue_id = ""
        self._header_refusal: Verdict | None = None  # a HEADERS check refused: said at the end
        self.started = 0.0
        self.accepted = 0
        self._greeted = False
        self._greeting_timer: Any = None
        self._closing_after_reply = False
        self._chunks: list[bytes] | None = []  # the message held in memory during DATA
        self._held = 0
        self._trace: TraceInfo | None = None
        self._out: list[bytes] | None = None  # replies batched while input is processed
        # The BDAT chunk being read (RFC 3030): octets still to come, whether it
        # is the LAST one, the refusal decided at the command (its octets are
        # then dropped), and the octets of this message's chunks so far.
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._bdat_octets = 0

    # --- connection -------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "") or "unknown"
        # A client in relay_networks is one of our own systems: it may relay, is
        # exempt from per-address limits, and its mail is neither checked nor given A-R.
        self._trusted = relay_allowed(None, self.client_ip, self.config.relay_networks)
        self.started = self.ctx.clock.seconds()
        if not self.ctx.accepting:
            self._send(R.SHUTTING_DOWN)
            return
        verdict = self.pipeline.run(Stage.CONNECT, self.view)
        if isinstance(verdict, Deferred):
            # A check needs I/O: the session counts from now on, and the greeting
            # waits for the verdict (a client that talks meanwhile is an early talker).
            self._start_session()
            if self.listener.kind == "submissions":
                # The client's TLS hello must reach TLS, not the command reader:
                # it stays in the socket until the verdict.
                self.transport.pauseProducing()
            verdict.addCallback(self._connect_decided)
            return
        if verdict.action is not Action.ACCEPT:
            self._refuse_connection(verdict)
            return
        self._start_session()
        self._open()

    def _start_session(self) -> None:
        self.ctx.connections[self.client_ip] = self.ctx.connections.get(self.client_ip, 0) + 1
        self.ctx.sessions.add(self)
        self._life_timer = self.ctx.clock.callLater(self.limits.session_timeout, self._session_expired)
        self._reset_idle_timer()

    def _refuse_connection(self, verdict: Verdict) -> None:
        """A CONNECT check refused: its reply, then the connection is closed."""
        reply = verdict.reply or R.CHECK_FAILED_CONNECT
        if not verdict.quiet:
            self._rejected("connect", reply, **({"reason": verdict.reason} if verdict.reason else {}))
        self._send(reply)
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self.transport.loseConnection()

    def _connect_decided(self, verdict: Verdict) -> None:
        if self.phase is Phase.CLOSED:
            return
        if verdict.action is not Action.ACCEPT:
            self._refuse_connection(verdict)
            return
        self._open()
        if self.listener.kind == "submissions":
            self.transport.resumeProducing()

    def _open(self) -> None:
        """Start the conversation: TLS first on an implicit-TLS listener, else the greeting."""
        if self.listener.kind == "submissions":
            # Implicit TLS (RFC 8314 §3.3): the greeting goes out inside TLS.
            self.transport.startTLS(self.ctx.tls)
        elif self.limits.greeting_delay > 0:
            # Early-talker check: an honest client waits for the greeting (RFC 5321 §4.3.1).
            self._greeting_timer = self.ctx.clock.callLater(self.limits.greeting_delay, self._greet)
            return
        self._greet()

    def _greet(self) -> None:
        self._greeting_timer = None
        self._greeted = True
        self._send(R.greeting(self.config.hostname))

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        # A connection refused at once (limits) was logged as refused: no session line.
        was_session = self in self.ctx.sessions
        if was_session:
            self.ctx.sessions.discard(self)
            n = self.ctx.connections.get(self.client_ip, 1) - 1
            if n > 0:
                self.ctx.connections[self.client_ip] = n
            else:
                self.ctx.connections.pop(self.client_ip, None)
        self.phase = Phase.CLOSED
        for timer in (self._idle_timer, self._life_timer, self._greeting_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._abort_message()
        if was_session and self._unlogged_refusals:
            self._log_refusal_summary()
        if was_session:
            log.info(
                "session {client_ip} helo={helo} tls={tls} auth={auth} accepted={accepted} "
                "errors={errors} duration={duration:.3f}s",
                client_ip=self.client_ip, helo=self.helo or "-", tls=self.tls_version or "no",
                auth=self.auth_user or "-", accepted=self.accepted, errors=self.errors,
                duration=self.ctx.clock.seconds() - self.started, event="session",
                listener=self.listener.name, kind=self.listener.kind,
            )

    def handshakeCompleted(self) -> None:  # noqa: N802
        from mta.system.tls import describe_tls

        self.tls_active = True
        self.tls_version, self.tls_cipher = describe_tls(self.transport)

    def _reset_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.limits.command_timeout)
        else:
            self._idle_timer = self.ctx.clock.callLater(self.limits.command_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._send(R.TIMEOUT)

    def _session_expired(self) -> None:
        self._send(R.SESSION_TOO_LONG)

    def shutdown(self) -> None:
        """Graceful stop: a session between commands is told 421 and closed at once;
        one in DATA or waiting for a check gets its reply first, then the 421."""
        if self.phase in (Phase.COMMAND, Phase.AUTH) and not self._busy:
            self._send(R.SHUTTING_DOWN)
        else:
            self._closing_after_reply = True

    def force_close(self) -> None:
        """The shutdown grace time is over: abandon any message in progress."""
        self._abort_message()
        self._send(R.SHUTTING_DOWN)

    # --- output -----------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._write(reply.format())
        if self.ctx.observer is not None:
            self.ctx.observer(self, reply)
        if reply.close:
            self.phase = Phase.CLOSED
            self._flush()
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        """Replies made while reading one segment of input leave together, in one
        write (RFC 2920 §3.2: a pipelined group's replies may be batched); others at once."""
        if self._out is not None:
            self._out.append(data)
        else:
            send_now(self.transport, data)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            send_now(self.transport, b"".join(out))

    def _rejected(self, stage: str, reply: Reply, **fields: Any) -> Reply:
        """Log a refused step of a mail transaction (event "rejected"); returns ``reply``."""
        log.info("{stage} rejected for {ip} auth={auth}: {reply}", stage=stage, reply=str(reply),
                 code=reply.code, enhanced=reply.enhanced, ip=self.client_ip,
                 helo=self.helo or "-", auth=self.auth_user or "-", event="rejected", **fields)
        return reply

    def _refused(self, stage: str, verdict: Verdict, **fields: Any) -> Reply:
        """The reply to a step a check refused, logged as :meth:`_rejected` says
        (with the verdict's reason) unless the check logged it itself."""
        reply = verdict.reply
        assert reply is not None
        if verdict.reason:
            fields["reason"] = verdict.reason
        if verdict.quiet:
            return reply
        return self._rejected(stage, reply, **fields)

    def _rcpt_rejected(self, reply: Reply, recipient: str, **fields: Any) -> Reply:
        """A refused RCPT: logged like any refused step (:meth:`_rejected`) for the
        first RCPT_REFUSALS_LOGGED of the session, then only counted, by RFC 3463
        code, for the one summary line at its end (event ``rejected_summary``).

        limits.max_errors closes the session after that many 5xx replies, so a
        dictionary attack meets the 421 after ten 550s by default; 4xx refusals
        (452 4.5.3 past limits.max_recipients) are not errors and have no such
        bound, and max_errors may be set high: hence the summary."""
        self._rcpt_refusals += 1
        if self._rcpt_refusals <= RCPT_REFUSALS_LOGGED:
            return self._rejected("rcpt", reply, recipient=recipient, **fields)
        self._unlogged_refusals[reply.enhanced] = self._unlogged_refusals.get(reply.enhanced, 0) + 1
        if len(self._refusal_sample) < RCPT_REFUSAL_SAMPLE:
            self._refusal_sample.append(recipient)
        return reply

    def _log_refusal_summary(self) -> None:
        count = sum(self._unlogged_refusals.values())
        statuses = dict(sorted(self._unlogged_refusals.items()))
        log.info("rcpt rejected for {ip}: {count} more recipients refused in this session "
                 "({codes}); sample: {sample}", ip=self.client_ip, count=count,
                 codes=", ".join(f"{code} x{n}" for code, n in statuses.items()),
                 sample=",".join(self._refusal_sample), statuses=statuses,
                 logged=RCPT_REFUSALS_LOGGED, stage="rcpt", helo=self.helo or "-",
                 auth=self.auth_user or "-", event="rejected_summary")
        self._unlogged_refusals = {}

    def _reply(self, reply: Reply) -> None:
        """Send a reply to a client command, counting client errors (RFC 5321 §4.3.2)."""
        self._send(reply)
        if reply.is_error and reply.code != 552:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._send(R.TOO_MANY_ERRORS)
        if self._closing_after_reply and self.phase is Phase.COMMAND:
            self._send(R.SHUTTING_DOWN)

    # --- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.phase is Phase.CLOSED:
            return
        if not self._greeted and self.listener.kind != "submissions":
            log.info("early talker {ip}", ip=self.client_ip, event="limit", limit="early_talker")
            self._send(R.EARLY_TALKER)
            return
        if self.phase is Phase.DATA or self.phase is Phase.BDAT:
            # Message content: any progress restarts the wait; session_timeout
            # bounds a slow sender.  Commands restart it only when complete (_process).
            self._reset_idle_timer()
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._scan -= self._pos
            self._pos = 0
        self._buf = self._buf + data if self._buf else data
        if self._busy and not self._paused and len(self._buf) - self._pos > BUSY_READ_LIMIT:
            self._paused = True
            self.transport.pauseProducing()
        self._out = []
        try:
            self._process()
        finally:
            self._flush()
            self._out = None
        if self._prepare_after_flush:
            self._prepare_writer()

    def _process(self) -> None:
        while not self._busy and self.phase is not Phase.CLOSED and self._pos < len(self._buf):
            if self.phase is Phase.DATA:
                assert self._data is not None
                chunk = self._buf[self._pos :] if self._pos else self._buf
                self._buf, self._pos, self._scan = b"", 0, 0
                rest = self._data.feed(chunk)
                if rest is None:
                    return
                self._buf = rest
                self._run(self._end_of_data)
                continue
            if self.phase is Phase.BDAT:
                if self._read_chunk():
                    self._run(self._chunk_done)
                    continue
                return
            line = self._next_line()
            if line is None:
                return
            # RFC 5321 §4.5.3.2.7: command_timeout is the wait for the next *command*;
            # octets trickled without their CRLF must not extend it (slowloris).
            self._reset_idle_timer()
            if isinstance(line, Reply):
                self.phase = Phase.COMMAND  # a bad line also ends a SASL exchange
                self._reply(line)
                continue
            if self.phase is Phase.AUTH:
                self._run(self._auth_step, line)
            else:
                self._run(self._command, line)

    def _next_line(self) -> str | Reply | None:
        limit = MAX_AUTH_LINE if self.phase is Phase.AUTH else self.limits.max_command_length
        end = self._buf.find(b"\r\n", max(self._scan, self._pos))
        if end < 0:
            if len(self._buf) - self._pos > limit:
                # Bounded memory: drop what we have of this line, keep its last
                # octet in case it is the CR of the CRLF.
                self._discarding = True
                self._buf = self._buf[-1:]
                self._pos = 0
            self._scan = max(self._pos, len(self._buf) - 1)
            return None
        raw = self._buf[self._pos : end]
        self._pos = end + 2
        self._scan = self._pos
        if self._discarding:
            self._discarding = False
            return R.LINE_TOO_LONG
        if len(raw) > limit:
            return R.LINE_TOO_LONG
        if b"\n" in raw or b"\r" in raw:
            return R.BAD_LINE_ENDING
        if b"\x00" in raw:
            return R.NUL_IN_COMMAND
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.BAD_UTF8

    def _run(self, handler: Any, *args: Any) -> None:
        try:
            result = handler(*args)
        except Exception:
            log.failure("internal error handling input from {ip}", ip=self.client_ip)
            result = Reply(451, "4.3.0", "Internal server error, transaction aborted")
            self._reset_transaction()
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._internal_error)
            result.addCallback(self._async_done)
        elif result is not None:
            self._reply(result)

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error in asynchronous check for {ip}", failure, ip=self.client_ip)
        self._reset_transaction()
        return Reply(451, "4.3.0", "Internal server error, try again later")

    def _async_done(self, reply: Reply | None) -> None:
        self._busy = False
        if self.phase is not Phase.CLOSED and reply is not None:
            self._reply(reply)
        if self._after_reply and self.phase is not Phase.CLOSED:
            self._flush()  # on the wire before what comes after it (a commit can end at once)
        while self._after_reply:  # bounded: each entry is taken out before it runs
            self._after_reply.pop(0)()
        if self.phase is not Phase.CLOSED:
            self._reset_idle_timer()  # the wait for the next command starts with our reply
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._process()

    # --- commands -----------------------------------------------------------------

    def _command(self, line: str) -> Reply | Deferred[Reply] | None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb in HTTP_VERBS:
            return R.HTTP_REFUSED
        handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        if handler is None:
            return R.UNKNOWN_COMMAND
        return handler(arg)

    def smtp_HELO(self, arg: str) -> Reply | Deferred[Reply]:  # noqa: N802
        return self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Reply | Deferred[Reply] | None:  # noqa: N802
        return self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> Reply | Deferred[Reply] | None:
        """EHLO/HELO: the syntax here, then the HELO checks (the name's form:
        ``helo_check``, 501 5.5.2 when refused); the checks see the new name as
        ``helo``, and a refusal keeps the one from before."""
        name = arg.strip()
        if not name or " " in name or not name.isprintable():
            return R.HELO_SYNTAX
        previous, self.helo = self.helo, name
        verdict = self.pipeline.run(Stage.HELO, self.view)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._hello_decided, previous, esmtp)
        return self._hello_decided(verdict, previous, esmtp)

    def _hello_decided(self, verdict: Verdict, previous: str | None, esmtp: bool) -> Reply | None:
        if verdict.action is not Action.ACCEPT:
            self.helo = previous
            return self._refused("helo", verdict)
        self.esmtp = esmtp
        self._reset_transaction()  # RFC 5321 §4.1.4: EHLO resets the state
        reply = R.helo_ok(self.config.hostname, self.client_ip)
        if not esmtp:
            return reply
        self._write(R.multiline(250, [reply.text] + self._extensions()))
        return None

    def _extensions(self) -> list[str]:
        ext = [
            "PIPELINING",
            f"SIZE {self.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",  # RFC 3461 §4
            "CHUNKING",  # RFC 3030 §2
            "BINARYMIME",  # RFC 3030 §3
        ]
        if self.ctx.tls is not None and not self.tls_active:
            ext.append("STARTTLS")
        if self.tls_active and self.auth_user is None:
            ext.append("AUTH PLAIN LOGIN")
        ext.append("HELP")
        return ext

    def smtp_NOOP(self, arg: str) -> Reply:  # noqa: N802
        return R.NOOP_OK

    def smtp_HELP(self, arg: str) -> Reply:  # noqa: N802
        return R.HELP

    def smtp_VRFY(self, arg: str) -> Reply:  # noqa: N802
        # RFC 5321 §3.5.3: 252 says nothing about whether the user exists.
        return R.VRFY

    def smtp_EXPN(self, arg: str) -> Reply:  # noqa: N802
        return R.EXPN

    def smtp_QUIT(self, arg: str) -> Reply:  # noqa: N802
        return R.closing(self.config.hostname)

    def smtp_RSET(self, arg: str) -> Reply:  # noqa: N802
        if arg.strip():
            return R.NO_ARGUMENTS
        self._reset_transaction()
        return R.RSET_OK

    def _reset_transaction(self) -> None:
        self.txn = None
        self._abort_message()

    # --- STARTTLS (RFC 3207) ---------------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> Reply | None:  # noqa: N802
        if self.tls_active:
            return R.TLS_ALREADY
        if self.ctx.tls is None:
            return R.TLS_NOT_AVAILABLE
        if arg.strip():
            return R.NO_ARGUMENTS
        if self.helo is None:
            return R.NEED_HELO
        self._send(R.TLS_READY)
        # RFC 3207 §4.2 and the "STARTTLS injection" attacks: nothing the client
        # sent after the command, before the handshake, may be acted upon.
        self._buf, self._pos, self._scan = b"", 0, 0
        self._discarding = False
        self._flush()  # the 220 goes out in plaintext, before the handshake
        self.transport.startTLS(self.ctx.tls)
        # RFC 3207 §4.2: forget everything learnt before TLS.
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self._reset_transaction()
        self.tls_active = True
        return None

    # --- AUTH (RFC 4954) -----------------------------------------------------------

    def smtp_AUTH(self, arg: str) -> Reply | Deferred[Reply] | None:  # noqa: N802
        if self.helo is None or not self.esmtp:
            return R.NEED_HELO
        if not self.tls_active:
            return R.AUTH_NEEDS_TLS
        if self.auth_user is not None:
            return R.AUTH_ALREADY
        if self.txn is not None:
            return R.AUTH_IN_TRANSACTION
        if self.ctx.abuse is not None and self.ctx.abuse.auth_blocked(self.client_ip):
            return self._auth_blocked()
        words = arg.split()
        if not words or len(words) > 2:
            return R.AUTH_UNKNOWN_MECHANISM
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                return self._ask(b"334 \r\n", self._auth_plain)
            return self._auth_plain(initial)
        if mechanism == "LOGIN":
            if initial is None:
                return self._ask(b"334 VXNlcm5hbWU6\r\n", self._auth_login_user)
            return self._auth_login_user(initial)
        return R.AUTH_UNKNOWN_MECHANISM

    def _ask(self, challenge: bytes, step: Any) -> None:
        self._write(challenge)
        self.phase = Phase.AUTH
        self._auth_step = step
        return None

    def _sasl_text(self, line: str) -> str:
        from mta.policy.auth import SASLCancelled, decode_b64_line

        if line.strip() == "*":
            raise SASLCancelled()
        return decode_b64_line(line.strip())

    def _auth_plain(self, line: str) -> Reply | Deferred[Reply]:
        """The PLAIN response (RFC 4616), as initial response or continuation line.

        Undecodable base64 is ``501 5.5.2`` and not counted as a failure (RFC 4954 §4,
        as for LOGIN); a decodable message without its two NULs or with an empty
        identity or password is a failed attempt (535, counted)."""
        from mta.policy.auth import SASLCancelled, SASLError, SASLUndecodable, decode_plain

        self.phase = Phase.COMMAND
        line = line.strip()
        if line == "*":
            return R.AUTH_CANCELLED
        try:
            _authzid, authcid, password = decode_plain("" if line == "=" else line)
        except SASLCancelled:
            return R.AUTH_CANCELLED
        except SASLUndecodable:
            return R.AUTH_SYNTAX
        except SASLError:
            return self._auth_failed()
        return self._check_password(authcid, password)

    def _auth_login_user(self, line: str) -> Reply | None:
        from mta.policy.auth import SASLCancelled, SASLError

        try:
            user = self._sasl_text(line)
        except SASLCancelled:
            self.phase = Phase.COMMAND
            return R.AUTH_CANCELLED
        except SASLError:
            self.phase = Phase.COMMAND
            return R.AUTH_SYNTAX
        return self._ask(b"334 UGFzc3dvcmQ6\r\n", lambda ln: self._auth_login_password(user, ln))

    def _auth_login_password(self, user: str, line: str) -> Reply | Deferred[Reply]:
        from mta.policy.auth import SASLCancelled, SASLError

        self.phase = Phase.COMMAND
        try:
            password = self._sasl_text(line)
        except SASLCancelled:
            return R.AUTH_CANCELLED
        except SASLError:
            return R.AUTH_SYNTAX
        return self._check_password(user, password)

    def _check_password(self, user: str, password: str) -> Deferred[Reply] | Reply:
        if self.ctx.abuse is not None and self.ctx.abuse.auth_blocked(self.client_ip, user.lower()):
            # The password is not even checked: right or wrong, the answer is the same.
            return self._auth_blocked(user)
        d = maybeDeferred(self.ctx.users.authenticate, user, password)

        def checked(canonical: str | None) -> Reply | Deferred[Reply]:
            if canonical:
                self.auth_user = canonical
                if self.ctx.abuse is not None:
                    self.ctx.abuse.auth_succeeded(self.client_ip, user.lower())
                log.info("auth ok for {user} from {ip}", user=canonical, ip=self.client_ip,
                         event="auth", result="ok")
                return R.AUTH_OK
            return self._auth_failed(user, "bad_credentials")

        return d.addCallback(checked)

    def _auth_blocked(self, user: str | None = None) -> Reply:
        """``454 4.7.0`` while the address or the account is blocked (RFC 4954 §6,
        temporary authentication failure; see AbuseLimits for the rule).  Not counted
        towards any block, so it cannot extend one; it does count towards this
        session's max_auth_failures, so one session cannot ask for ever."""
        log.info("auth blocked for {user} from {ip}", user=(user or "-")[:64], ip=self.client_ip,
                 event="auth", result="blocked")
        self.auth_failures += 1
        return R.AUTH_TOO_MANY if self.auth_failures >= self.limits.max_auth_failures else R.AUTH_BLOCKED

    def _auth_failed(self, user: str | None = None, reason: str = "malformed") -> Deferred[Reply]:
        """535 after a delay that grows with each failure; too many close the session,
        and failures across sessions block the client address and the account."""
        log.info("auth failed ({reason}) for {user} from {ip}", reason=reason,
                 user=(user or "-")[:64], ip=self.client_ip, event="auth", result="failed")
        self.auth_failures += 1
        if self.ctx.abuse is not None:
            self.ctx.abuse.auth_failed(self.client_ip, user.lower() if user else None)
        reply = R.AUTH_TOO_MANY if self.auth_failures >= self.limits.max_auth_failures else R.AUTH_FAILED
        delay = self.limits.auth_failure_delay * self.auth_failures
        return deferLater(self.ctx.clock, delay, lambda: reply)

    # --- the mail transaction ------------------------------------------------------

    def smtp_MAIL(self, arg: str) -> Reply | Deferred[Reply]:  # noqa: N802
        if self.helo is None:
            return R.NEED_HELO
        if self.txn is not None:
            return R.NESTED_MAIL
        if self.listener.kind in ("submission", "submissions") and self.auth_user is None:
            return R.NEED_AUTH if self.tls_active else R.NEED_STARTTLS
        if arg[:5].upper() != "FROM:":
            return R.MAIL_SYNTAX
        try:
            path, params = split_path_and_params(arg[5:], strict=self.config.strict_envelopes)
        except DuplicateParameter as e:
            return R.duplicate_param(e.keyword)
        except AddressError:
            return R.MAIL_SYNTAX
        if params and not self.esmtp:
            return R.PARAM_NEEDS_EHLO
        txn = Transaction(sender=None)
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return R.BAD_SIZE
                txn.declared_size = int(value)
                if txn.declared_size > self.limits.max_message_size:
                    return R.TOO_BIG_DECLARED
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                    return R.BAD_BODY
                txn.body_8bit = value.upper() == "8BITMIME"
                txn.binarymime = value.upper() == "BINARYMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return R.BAD_SMTPUTF8
                txn.smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 §5: we may ignore it.
            elif key == "RET":  # RFC 3461 §4.3
                ret = dsnparams.parse_ret(value)
                if isinstance(ret, Reply):
                    return ret
                txn.ret, txn.dsn = ret, True
            elif key == "ENVID":  # RFC 3461 §4.4
                envid = dsnparams.parse_envid(value)
                if isinstance(envid, Reply):
                    return envid
                txn.envid, txn.dsn = envid, True
            else:
                return R.PARAM_UNKNOWN
        try:
            txn.sender = parse_path(path, smtputf8=txn.smtputf8, allow_null=True)
        except AddressError as e:
            return R.BAD_SENDER_DOMAIN if e.bad_domain else R.BAD_SENDER
        # The checks see the transaction (state.sender); it stays only if they accept.
        self.txn = txn
        verdict = self.pipeline.run(Stage.MAIL, self.view)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._mail_decided, txn)
        return self._mail_decided(verdict, txn)

    def _mail_decided(self, verdict: Verdict, txn: Transaction) -> Reply:
        if verdict.action is not Action.ACCEPT:
            self.txn = None
            return self._refused("mail", verdict, sender=txn.sender_text or "<>")
        if verdict is not ACCEPT:
            txn.add(verdict)
        return R.SENDER_OK

    def smtp_RCPT(self, arg: str) -> Reply:  # noqa: N802
        if self.txn is None:
            return R.NEED_MAIL
        if self._data is not None:  # RFC 3030 §2: the chunks of the message have begun
            return R.RCPT_AFTER_BDAT
        if arg[:3].upper() != "TO:":
            return R.RCPT_SYNTAX
        try:
            path, params = split_path_and_params(arg[3:], strict=self.config.strict_envelopes)
        except DuplicateParameter as e:
            return R.duplicate_param(e.keyword)
        except AddressError:
            return R.RCPT_SYNTAX
        notify = orcpt = ""
        if params:  # only DSN's NOTIFY and ORCPT (RFC 3461 §4.1, §4.2)
            if not self.esmtp:
                return R.PARAM_NEEDS_EHLO
            dsn = dsnparams.parse_rcpt_params(params, self.txn.smtputf8)
            if isinstance(dsn, Reply):
                return dsn
            notify, orcpt = dsn
        if len(self.txn.rcpt_addresses) >= self.limits.max_recipients:
            return self._rcpt_rejected(R.TOO_MANY_RECIPIENTS, path[1:-1], sender=self.txn.sender_text or "<>",
                                       reason="max_recipients")
        if path.lower() == "<postmaster>" and self.config.local_domains:
            # RFC 5321 §4.1.1.3: "Postmaster" without a domain must be accepted.
            path = f"<postmaster@{self.config.local_domains[0]}>"
        try:
            address = parse_path(path, smtputf8=self.txn.smtputf8)
        except AddressError as e:
            return R.BAD_RECIPIENT_DOMAIN if e.bad_domain else R.BAD_RECIPIENT
        assert address is not None
        self.view.recipient = address
        verdict = self.pipeline.run(Stage.RCPT, self.view)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._rcpt_decided, address, notify, orcpt, bool(params))
        return self._rcpt_decided(verdict, address, notify, orcpt, bool(params))

    def _rcpt_decided(self, verdict: Verdict, address: Address, notify: str, orcpt: str,
                      dsn: bool) -> Reply:
        """Add the recipient's targets (one copy per mailbox) to the transaction."""
        self.view.recipient = None
        txn = self.txn
        if txn is None:  # reset while an asynchronous check ran (a 421 meanwhile)
            return R.NEED_MAIL
        if verdict.action is not Action.ACCEPT:
            if verdict.quiet:
                return verdict.reply
            fields = {"reason": verdict.reason} if verdict.reason else {}
            return self._rcpt_rejected(verdict.reply, str(address), sender=txn.sender_text or "<>",
                                       **fields)
        if verdict.headers or verdict.auth_results or verdict.facts:
            txn.add(verdict)
        original = str(address)
        if original not in txn.rcpt_addresses:
            txn.rcpt_addresses.append(original)
        # One copy per mailbox: bob+x@ and bob@ are the same local recipient.
        known = {(r.kind, r.mailbox or r.address) for r in txn.recipients}
        for target in verdict.targets:
            kind = RecipientKind(target.kind)
            key = (kind, target.mailbox or target.address)
            if key in known:
                continue
            known.add(key)
            txn.recipients.append(
                Recipient(address=target.address, kind=kind, original=original, mailbox=target.mailbox,
                          notify=notify, orcpt=orcpt)
            )
        if dsn:
            txn.dsn = True
        return R.RECIPIENT_OK

    def smtp_DATA(self, arg: str) -> Reply | None:  # noqa: N802
        if self.txn is None:
            return R.NEED_MAIL
        if not self.txn.rcpt_addresses:
            return R.NO_RECIPIENTS
        if self._data is not None:
            return R.DATA_AFTER_BDAT
        if self.txn.binarymime:
            return R.DATA_AFTER_BINARYMIME
        if arg.strip():
            return R.NO_ARGUMENTS
        self._begin_message(chunked=False)
        self.phase = Phase.DATA
        self._prepare_after_flush = True
        return R.START_DATA

    def _begin_message(self, chunked: bool) -> None:
        """Set up the reader of the message (DATA's, or BDAT's for ``chunked``)."""
        assert self.txn is not None
        # The message is held in memory up to dkim.max_message_size (one write at
        # the end, and room to add DKIM/Authentication-Results headers on top);
        # past that it spills to the queue file and streams (see _collect).
        self._chunks = []
        self._held = 0
        self._header_refusal = None
        self._trace = TraceInfo(
            helo=self.helo or "", client_ip=self.client_ip, client_name="",
            hostname=self.config.hostname, queue_id="", esmtp=self.esmtp,
            tls_version=self.tls_version, tls_cipher=self.tls_cipher,
            authenticated=self.auth_user is not None, smtputf8=self.txn.smtputf8,
            recipients=tuple(self.txn.rcpt_addresses),
        )
        if chunked:
            self._data = ChunkReader(
                sink=self._collect,
                on_headers=self._on_headers,
                max_size=self.limits.max_message_size,
                max_line_length=self.limits.max_line_length,
                max_header_size=self.limits.max_header_size,
                binary=self.txn.binarymime,
            )
            return
        self._data = DataReader(
            sink=self._collect,
            on_headers=self._on_headers,
            max_size=self.limits.max_message_size,
            max_line_length=self.limits.max_line_length,
            max_header_size=self.limits.max_header_size,
        )

    # --- BDAT (CHUNKING, RFC 3030) ---------------------------------------------------

    def smtp_BDAT(self, arg: str) -> Reply | Deferred[Reply] | None:  # noqa: N802
        """``BDAT <size> [LAST]`` (RFC 3030 §2), followed by exactly <size> octets.

        Whatever the answer, those octets are read before it goes out (and
        dropped when the chunk is refused: no MAIL, no valid RCPT, over the
        size limit), so the session stays in step with a client that pipelines
        its chunks, and the replies go out in order.  A chunk that is not the
        LAST gets its 250 once its octets are in; the LAST chunk's 250 comes
        only once the message is on disk, as for DATA.  Only a syntax error is
        answered at once: the size is then unknown (501).
        """
        m = _BDAT_ARGS.fullmatch(arg)
        if m is None:
            return R.BDAT_SYNTAX
        size = int(m[1])
        refusal: Reply | None = None
        if self.txn is None:
            refusal = R.NEED_MAIL
        elif not self.txn.rcpt_addresses:
            refusal = R.NO_RECIPIENTS
        else:
            if self._data is None:  # the first chunk of this message
                self._begin_message(chunked=True)
                self._bdat_octets = 0
                self._prepare_after_flush = True
            if self._bdat_octets + size > self.limits.max_message_size:
                refusal = R.TOO_BIG
            self._bdat_octets += size
        self._bdat_left, self._bdat_last, self._bdat_refusal = size, m[2] is not None, refusal
        self._bdat_size = size
        if size:
            self.phase = Phase.BDAT
            return None
        return self._chunk_done()

    def _read_chunk(self) -> bool:
        """Take the chunk's octets from the input (to the reader, or dropped when
        the chunk is refused); True once all of them are in."""
        available = len(self._buf) - self._pos
        take = min(self._bdat_left, available)
        if take == available:
            chunk = self._buf[self._pos :] if self._pos else self._buf
            self._buf, self._pos, self._scan = b"", 0, 0
        else:
            chunk = self._buf[self._pos : self._pos + take]
            self._pos += take
            self._scan = self._pos
        self._bdat_left -= take
        if self._bdat_refusal is None:
            assert isinstance(self._data, ChunkReader)
            self._data.feed(chunk)
        if self._bdat_left:
            return False
        self.phase = Phase.COMMAND
        return True

    def _chunk_done(self) -> Reply | Deferred[Reply]:
        """The reply to a BDAT chunk whose octets are all in.

        A refused chunk discards the whole message of its transaction (RFC 3030
        §2: the client must not go on with it), as a refused DATA does."""
        refusal, reader, txn = self._bdat_refusal, self._data, self.txn
        self._bdat_refusal = None
        if refusal is not None:
            if refusal is R.TOO_BIG and txn is not None:
                self._rejected("data", refusal, sender=txn.sender_text,
                               rcpts=",".join(txn.rcpt_addresses))
                self._reset_transaction()
            return refusal
        assert isinstance(reader, ChunkReader)
        if self._bdat_last:
            reader.end()
            return self._end_of_data()
        if reader.error is not None or self._chunks is None:
            return self._end_of_data()  # answers the error and ends the transaction
        return R.chunk_received(self._bdat_size)

    def _prepare_writer(self) -> None:
        """Make the queue writer and the Received header now that the 354 has gone
        out: the client is sending the message meanwhile, so this work is off
        the time between its final dot and our 250.  (The time stamp is the
        start of the transfer, as in Postfix's Received.)  A failure here is
        left for the end of the message, which tries again and answers 451."""
        self._prepare_after_flush = False
        if self._data is None or self._ready_writer is not None or self._writer is not None:
            return
        try:
            self._ready_writer, self._ready_trace = self._new_writer()
        except (QueueError, OSError):
            self._ready_writer = None

    def _new_writer(self) -> tuple[MessageWriter, bytes]:
        """A buffered queue writer (still empty) and the trace headers for the top of
        its message: Received-SPF above our Received (RFC 7208 §9.1: prepended,
        above the Received field of the receiver that did the check)."""
        writer = self.ctx.store.new_message(buffered=True)
        # The queue id goes into the Received header (RFC 5321 §4.4 "id").
        received = received_header(self._trace, queue_id=writer.id)
        assert self.txn is not None
        return writer, b"\r\n".join([*self.txn.trace_headers, received]) + b"\r\n"

    def _open_writer(self, extra_headers: list[bytes], buffered: bool = False) -> MessageWriter:
        """The queue writer with ``extra_headers``, then the trace headers (``buffered``:
        a message already in memory, written out by the group commit; else the
        file in tmp/ is started now and the rest written to it as it arrives).

        ``extra_headers`` (Authentication-Results, our DKIM-Signature) are made
        last, at the end of DATA, and so go on top: each field is prepended to
        the header as the hop adds it (RFC 8601 §5, RFC 6376 §5.6)."""
        writer, self._ready_writer = self._ready_writer, None
        trace, self._ready_trace = self._ready_trace, b""
        self._prepare_after_flush = False
        if writer is None:
            writer, trace = self._new_writer()
        try:
            if extra_headers:
                writer.write(b"\r\n".join(extra_headers) + b"\r\n")
            writer.write(trace)
            if not buffered:
                writer.spill()
        except BaseException:
            writer.abort()
            raise
        return writer

    def _collect(self, block: bytes) -> None:
        """The DataReader's sink: hold the message, or spill it to disk past the limit.

        ``self._chunks`` is None once writing failed: the rest is only scanned
        for the terminator and the message is refused with 451."""
        if self._chunks is None:
            return
        if self._writer is None:
            if self._held + len(block) <= self.config.dkim.max_message_size:
                self._chunks.append(block)
                self._held += len(block)
                return
            txn = self.txn
            assert txn is not None
            extra = self._top_headers(txn, txn.auth_results, log_it=False)
            try:
                self._writer = self._open_writer(extra)
                self._writer.writelines(self._chunks)
            except (QueueError, OSError) as e:
                self._write_failed(e)
                return
            self._chunks = []
        try:
            self._writer.write(block)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, error: Exception) -> None:
        log.error("queue write failed: {err}", err=error)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._chunks = None

    def _top_headers(self, txn: Transaction, auth_results: tuple[Any, ...], dmarc: Any = None,
                     log_it: bool = True) -> list[bytes]:
        """The headers the checks add on top of the message: one
        Authentication-Results field with every entry (RFC 8601 §5), then those
        of HEADERS (and MESSAGE, added by the caller)."""
        if not auth_results:
            return list(txn.top_headers)
        from mta.policy.msgauth import results_header

        return [results_header(self.config.hostname, auth_results, dmarc, log_it), *txn.top_headers]

    def _on_headers(self, lines: list[bytes]) -> list[bytes]:
        """The DataReader's header callback: the HEADERS checks, at once (they may
        rewrite the lines; a refusal is answered after the message's end)."""
        view = self.view
        view.header_lines = lines
        verdict = self.pipeline.run_now(Stage.HEADERS, view)
        lines, view.header_lines = view.header_lines, ()
        txn = self.txn
        if txn is not None:
            txn.header_lines = lines
            if verdict is not ACCEPT:
                txn.add(verdict, top=True)
        if verdict.action is not Action.ACCEPT:
            self._header_refusal = verdict
        return lines

    def _end_of_data(self) -> Reply | Deferred[Reply]:
        reader, writer, txn = self._data, self._writer, self.txn
        assert reader is not None and txn is not None
        self._data = None
        self.phase = Phase.COMMAND
        error = reader.error
        reply: Reply | None = None
        refusal = self._header_refusal
        if error is DataError.TOO_BIG:
            reply = R.TOO_BIG
        elif error is DataError.HEADER_TOO_BIG:
            reply = R.HEADER_TOO_BIG
        elif error is DataError.BARE_LINE_ENDING:
            reply = R.BARE_LINE_ENDING
        elif error is DataError.LINE_TOO_LONG:
            reply = R.DATA_LINE_TOO_LONG
        elif refusal is not None:
            self._reset_transaction()
            return self._refused("data", refusal, sender=txn.sender_text or "<>",
                                 rcpts=",".join(txn.rcpt_addresses))
        elif self._chunks is None:
            reply = R.QUEUE_WRITE_FAILED
        if reply is not None:
            self._rejected("data", reply, sender=txn.sender_text or "<>",
                           rcpts=",".join(txn.rcpt_addresses))
            self._reset_transaction()
            return reply
        message = None
        if writer is None:  # else spilled: streamed to disk already
            message = b"".join(self._chunks)
            self._chunks = []
        view = self.view
        view.header_lines, view.message = txn.header_lines, message
        verdict = self.pipeline.run(Stage.MESSAGE, view)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._message_decided, writer, message, txn, reader.eight_bit)
        return self._message_decided(verdict, writer, message, txn, reader.eight_bit)

    def _message_decided(self, verdict: Verdict, writer: MessageWriter | None, message: bytes | None,
                         txn: Transaction, eight_bit: bool) -> Reply | Deferred[Reply]:
        """Queue the message as the MESSAGE checks said (headers on top, envelope
        annotations), or refuse it."""
        view = self.view
        view.header_lines, view.message = (), None
        auth_results = txn.auth_results + verdict.auth_results
        top: list[bytes] = []
        if message is not None:
            top = self._top_headers(txn, auth_results, verdict.facts.get("dmarc"))
        if verdict.action is not Action.ACCEPT:
            # Also drops the queue writer made ready after the 354, whose Received
            # header names this transaction's recipient: never reused by the next one.
            self._reset_transaction()
            return self._refused("data", verdict, sender=txn.sender_text or "<>",
                                 rcpts=",".join(txn.rcpt_addresses))
        envelope = Envelope(
            id="",
            sender=txn.sender_text,
            recipients=txn.recipients,
            created=time.time(),
            body_8bit=txn.body_8bit or eight_bit,
            binarymime=txn.binarymime,
            smtputf8=txn.smtputf8,
            client_ip=self.client_ip,
            client_helo=self.helo or "",
            auth_user=self.auth_user or "",
            tls=f"{self.tls_version} {self.tls_cipher}".strip(),
            ret=txn.ret,
            envid=txn.envid,
            dsn=txn.dsn,
        )
        if verdict.envelope:
            envelope.extra.update(verdict.envelope)
        if writer is not None:
            return self._commit(writer, envelope, txn)
        assert message is not None
        if verdict.headers:
            top += verdict.headers
        return self._store(message, top, envelope, txn)

    def _store(self, message: bytes, extra_headers: list[bytes], envelope: Envelope,
               txn: Transaction) -> Deferred[Reply]:
        try:
            writer = self._open_writer(extra_headers, buffered=True)
        except (QueueError, OSError):
            self.txn = None
            return succeed(R.QUEUE_WRITE_FAILED)
        try:
            writer.write(message)
        except OSError:
            writer.abort()
            self.txn = None
            return succeed(R.QUEUE_WRITE_FAILED)
        return self._commit(writer, envelope, txn)

    def _commit(self, writer: MessageWriter, envelope: Envelope, txn: Transaction) -> Deferred[Reply]:
        """Hand the message to the group commit; reply 250 only once it is on disk."""
        envelope.id = writer.id
        self._writer = None
        self.txn = None
        d = writer.commit_async(envelope, tell=False)  # told in _queued, after the 250

        def failed(failure: Failure) -> Reply:
            failure.trap(QueueError)
            return R.QUEUE_WRITE_FAILED

        return d.addCallbacks(lambda _: self._queued(envelope, txn), failed)

    def _queued(self, envelope: Envelope, txn: Transaction) -> Reply:
        self.accepted += 1
        # Right after the 250 has gone out (the client need not wait for them):
        # the queue runner is told (its first delivery attempt starts at once),
        # then the message is logged.  _async_done runs these even if the
        # client has gone meanwhile.
        self._after_reply.append(partial(self.ctx.store.notify, envelope))
        self._after_reply.append(partial(
            log.info, "queued {queue_id} from={sender} to={rcpts} size={size} client={ip}",
            queue_id=envelope.id, sender=envelope.sender or "<>", rcpts=",".join(txn.rcpt_addresses),
            size=envelope.size, ip=self.client_ip, event="queued",
            auth=self.auth_user or "-", tls=self.tls_version or "no", kind=self.listener.kind,
        ))
        return R.queued(envelope.id)

    def _abort_message(self) -> None:
        self._data = None
        self._chunks, self._held = [], 0
        self._prepare_after_flush = False
        for writer in (self._writer, self._ready_writer):
            if writer is not None:
                writer.abort()
        self._writer = self._ready_writer = None
        if self.phase is Phase.DATA:
            self.phase = Phase.COMMAND


class SMTPFactory(Factory):
    """Builds one :class:`SMTPSession` per connection on one listener."""

    def __init__(self, context: ServerContext, listener: Listener) -> None:
        self.context = context
        self.listener = listener

    def buildProtocol(self, addr: Any) -> SMTPSession:  # noqa: N802
        return SMTPSession(self.context, self.listener)
