"""The SMTP server session (RFC 5321 with ESMTP extensions), one per connection.

One method per verb (``smtp_EHLO``, ``smtp_MAIL`` ...) takes the argument text
and returns a :class:`~mta.mail.replies.Reply`, or a Deferred that fires with
one when the answer needs I/O (a check, a password, the queue's fsync); every
reply is one of the table :mod:`mta.mail.replies`.  The session is made of
one part per concern, each in its own module:

* :mod:`mta.smtp.framing`: reading command lines and message octets, replies
  in command order (RFC 2920 §3), bounded input;
* :mod:`mta.smtp.sasl`: AUTH (RFC 4954);
* :mod:`mta.smtp.reception`: DATA and BDAT (RFC 3030), the message to the queue;
* this module: the connection (limits, greeting, timeouts, shutdown), the
  other verbs (EHLO/HELO, STARTTLS, MAIL, RCPT, RSET ...) and the log lines
  of refusals;
* :mod:`mta.smtp.state`: the state shared by the process (ServerContext), a
  transaction's (Transaction) and the view the checks get.

The session's own attributes are the connection's state (client address,
HELO name, TLS, AUTH, counters), kept until the connection closes; STARTTLS
forgets what was learnt before it (RFC 3207 §4.2).  A transaction's state is
its :class:`~mta.smtp.state.Transaction`, its message reception's that of
:class:`~mta.smtp.reception.MessageReception`.

Decisions (connection limits, the HELO name, sender binding, SPF, who may
relay, which recipients exist, header fixes, DKIM/DMARC, SRS) are the checks
of the staged pipeline (:mod:`mta.smtp.pipeline`, configured in ``[checks]``);
the session asks it at each stage (:class:`~mta.mail.checks.Stage`) and
replies.  What stays here are the protocol's own rules (syntax, command
order, the limits on sizes, lines and recipients, and the early-talker wait,
which is about the protocol's framing, not a decision about the client).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.config import Listener
from mta.mail import replies as R
from mta.mail.address import (
    Address,
    AddressError,
    DuplicateParameter,
    logged_sender,
    parse_path,
    split_path_and_params,
)
from mta.mail.checks import ACCEPT, Action, Stage, Verdict
from mta.mail.replies import Reply
from mta.policy.relay import relay_allowed
from mta.queue.intake import Intake
from mta.smtp import dsnparams
from mta.smtp.framing import Framing, Phase
from mta.smtp.pipeline import Plan
from mta.smtp.reception import MessageReception
from mta.smtp.sasl import SASLExchange
from mta.smtp.state import ServerContext, SessionView, Transaction

__all__ = ["SMTPFactory", "SMTPSession", "ServerContext", "Transaction"]

log = Logger()

HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "CONNECT", "OPTIONS", "PATCH", "TRACE"})
# Refused recipients logged one by one per session; past that they are counted
# and logged in one line when the session ends (an enumeration or dictionary
# attack must not write a line per guess), with this many of them as a sample.
RCPT_REFUSALS_LOGGED = 10
RCPT_REFUSAL_SAMPLE = 5


@implementer(interfaces.IHandshakeListener)
class SMTPSession(Framing, SASLExchange, MessageReception, Protocol):
    def __init__(self, context: ServerContext, listener: Listener) -> None:
        self.ctx = context
        self.config = context.config
        self.pipeline = context.pipeline  # kept for the session's life, as config is
        self.limits = context.config.limits
        self.listener = listener
        self.view = SessionView(self)
        self._init_framing()
        self._init_sasl()
        self._init_reception()
        # The connection's state: until it closes.
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
        self.started = 0.0
        self.accepted = 0
        self._greeted = False
        self._greeting_timer: Any = None
        self._closing_after_reply = False
        self.txn: Transaction | None = None  # the transaction in progress
        # The checks of each stage that apply to this client (Pipeline.plan): set
        # at connect, again when AUTH or STARTTLS changes the client's class.
        self._plan: Plan = {}

    # --- connection -------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "") or "unknown"
        # A client in relay_networks is one of our own systems: it may relay, is
        # exempt from per-address limits, and its mail is neither checked nor given A-R.
        self._trusted = relay_allowed(None, self.client_ip, self.config.relay_networks)
        self.view.client_ip, self.view.trusted = self.client_ip, self._trusted
        self._plan = self.pipeline.plan(self._trusted, False, self.listener.kind, self.listener.name)
        self.started = self.ctx.clock.seconds()
        if not self.ctx.accepting:
            self._send(R.SHUTTING_DOWN)
            return
        checks = self._plan[Stage.CONNECT]  # none: the shared ACCEPT at once
        verdict = self.pipeline.run(Stage.CONNECT, self.view, checks) if checks else ACCEPT
        if verdict is not ACCEPT and not isinstance(verdict, Verdict):  # a Deferred: a check needs I/O
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
        """A CONNECT check refused: its reply, then the connection is closed; or,
        for a reply that does not close (a 554 of the DNS blocklists), that reply
        is the greeting and the session then only takes QUIT (RFC 5321 §3.1)."""
        reply = verdict.reply or R.CHECK_FAILED_CONNECT
        if not verdict.quiet:
            self._rejected("connect", reply, **({"reason": verdict.reason} if verdict.reason else {}))
        if not reply.close and self.listener.kind != "submissions":  # (no TLS yet there: close)
            if self not in self.ctx.sessions:  # a synchronous verdict: not counted yet
                self._start_session()
            self._command = self._refused_greeting_command  # type: ignore[method-assign]
            self._greeted = True
            self._send(reply)
            return
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
        self.pipeline.close(self.view)  # a milter's SMFIC_QUIT (nothing when no check kept state)
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

    def _set_auth_user(self, user: str | None) -> None:
        """AUTH succeeded (``user``) or STARTTLS forgot it (None): the session, its
        checks' view and the checks that apply to it (:meth:`Pipeline.plan`)."""
        self.auth_user = self.view.auth_user = user
        self._plan = self.pipeline.plan(self._trusted, user is not None, self.listener.kind, self.listener.name)

    # --- logging refusals --------------------------------------------------------

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

    # --- commands -----------------------------------------------------------------

    def _refused_greeting_command(self, line: str) -> Reply:
        """After a 554 greeting (RFC 5321 §3.1): QUIT closes, anything else is 503."""
        if line.partition(" ")[0].upper() == "QUIT":
            return R.closing(self.config.hostname)
        return R.GREETING_REFUSED

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
        checks = self._plan[Stage.HELO]  # none: the shared ACCEPT at once
        verdict = self.pipeline.run(Stage.HELO, self.view, checks) if checks else ACCEPT
        if verdict is not ACCEPT and not isinstance(verdict, Verdict):  # a Deferred: a check needs I/O
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
        if self.tls_active:
            ext.append("REQUIRETLS")  # RFC 8689 §3: offered only under TLS
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
        self._set_auth_user(None)
        self._reset_transaction()
        self.tls_active = True
        return None

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
            elif key == "REQUIRETLS":  # RFC 8689 §3, §4.1
                if value is not None:
                    return R.BAD_REQUIRETLS
                if not self.tls_active:
                    return R.REQUIRETLS_NEEDS_TLS
                txn.requiretls = True
            else:
                return R.PARAM_UNKNOWN
        try:
            txn.sender = parse_path(path, smtputf8=txn.smtputf8, allow_null=True)
        except AddressError as e:
            return R.BAD_SENDER_DOMAIN if e.bad_domain else R.BAD_SENDER
        txn.intake = Intake(self.ctx.store, txn.sender_text)
        # The checks see the transaction (state.sender); it stays only if they accept.
        self.txn = txn
        checks = self._plan[Stage.MAIL]  # none: the shared ACCEPT at once
        verdict = self.pipeline.run(Stage.MAIL, self.view, checks) if checks else ACCEPT
        if verdict is not ACCEPT and not isinstance(verdict, Verdict):  # a Deferred: a check needs I/O
            return verdict.addCallback(self._mail_decided, txn)
        if verdict is ACCEPT:  # nothing to refuse, nothing to keep
            return R.SENDER_OK
        return self._mail_decided(verdict, txn)

    def _mail_decided(self, verdict: Verdict, txn: Transaction) -> Reply:
        if verdict.action is not Action.ACCEPT:
            self.txn = None
            return self._refused("mail", verdict, sender=logged_sender(txn.sender_text))
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
            return self._rcpt_rejected(R.TOO_MANY_RECIPIENTS, path[1:-1], sender=logged_sender(self.txn.sender_text),
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
        checks = self._plan[Stage.RCPT]  # none: the shared ACCEPT at once
        verdict = self.pipeline.run(Stage.RCPT, self.view, checks) if checks else ACCEPT
        if verdict is not ACCEPT and not isinstance(verdict, Verdict):  # a Deferred: a check needs I/O
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
            return self._rcpt_rejected(verdict.reply, str(address), sender=logged_sender(txn.sender_text),
                                       **fields)
        if verdict.headers or verdict.auth_results or verdict.facts:
            txn.add(verdict)
        # One copy per mailbox: bob+x@ and bob@ are the same local recipient.
        txn.intake.add_recipient(str(address), verdict.targets, notify=notify, orcpt=orcpt)
        if dsn:
            txn.dsn = True
        return R.RECIPIENT_OK

class SMTPFactory(Factory):
    """Builds one :class:`SMTPSession` per connection on one listener."""

    def __init__(self, context: ServerContext, listener: Listener) -> None:
        self.context = context
        self.listener = listener

    def buildProtocol(self, addr: Any) -> SMTPSession:  # noqa: N802
        return SMTPSession(self.context, self.listener)
