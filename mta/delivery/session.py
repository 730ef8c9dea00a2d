"""The outbound client's session state machine: one connection's SMTP (or LMTP) dialogue.

:class:`ClientSession` runs the opening (greeting, EHLO, STARTTLS, AUTH) and
then each message's mail transaction over an
:class:`~mta.delivery.protocol.SMTPClientProtocol`, as one linear coroutine;
its :class:`State` may only change along ``_TRANSITIONS``.  Every recipient's
final answer goes into the :class:`~mta.delivery.outbound.SessionResult`.

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
from collections import deque
from enum import Enum
from typing import Any

from mta.delivery.outbound import (
    ClientOptions,
    OutboundMessage,
    RecipientReply,
    SessionResult,
    TransactionResult,
)
from mta.delivery.protocol import CHUNK_SIZE, SMALL_BODY, SessionError, SMTPClientProtocol, refused
from mta.delivery.tlsoutcome import handshake_failure
from mta.delivery.tlspolicy import requires_tls, tries_starttls
from mta.delivery.wire import Capabilities, ServerReply, bdat_command
from mta.queue.courier import Outcome
from mta.queue.layout import QueuedMessage

BDAT_WINDOW = 2  # BDAT chunks sent and not yet answered, with PIPELINING (RFC 3030 §4.2)
MAX_BDAT_CHUNKS = 1 << 20  # bound of the chunk loop: 64 GiB at CHUNK_SIZE


class State(Enum):
    """Where the dialogue is; the allowed successors of each are in ``_TRANSITIONS``."""

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


class ClientSession:
    """One connection's dialogue, written as a linear coroutine over :class:`State`.

    A :class:`~mta.delivery.cache.ConnectionCache` may keep it between
    messages (``run(keep=True)``, then ``run(reused=True)``)."""

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

    async def _read(self, timeout: float, stage: str) -> ServerReply:
        reply = await self.proto.read_reply(timeout, f"the reply to {stage}")
        if reply.code == 421:  # RFC 5321 §3.8: the server is closing the channel
            raise refused(reply, stage)
        return reply

    async def _read_any(self, timeout: float, stage: str) -> ServerReply:
        """A reply, 421 included: for the transaction's replies, where those that came
        before a 421 must still be applied (the 421 ends the session afterwards)."""
        return await self.proto.read_reply(timeout, f"the reply to {stage}")

    async def _command(self, line: str, timeout: float, stage: str | None = None) -> ServerReply:
        self.proto.write_lines([line])
        return await self._read(timeout, stage or line.split(" ", 1)[0])

    # opening: greeting, EHLO, STARTTLS, AUTH

    async def _open(self) -> None:
        self._enter(State.GREETING)
        greeting = await self._read(self.t.greeting, "the greeting")
        if greeting.code != 220:  # RFC 5321 §3.1: 554 means no service here
            raise refused(greeting, "the greeting")
        self.caps = await self._hello(State.LHLO if self.options.lmtp else State.EHLO)
        if self._want_tls():
            await self._starttls()
        self.result.tls_checked = True
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
        raise refused(reply, state.value)

    def _want_tls(self) -> bool:
        policy = self.options.tls_policy
        if not tries_starttls(policy, self.options.lmtp):
            return False
        if self.caps.has("STARTTLS"):
            return True
        if not requires_tls(policy):
            return False
        self.result.tls_failure = "starttls-not-supported"  # RFC 8460 §4.3.2.1
        raise SessionError(f"TLS is required (policy {policy}) but the server does not offer STARTTLS",
                           "4.7.10", polite=True)

    async def _starttls(self) -> None:
        self._enter(State.STARTTLS)
        reply = await self._command("STARTTLS", self.t.ehlo)
        if reply.code != 220:
            if not requires_tls(self.options.tls_policy):  # RFC 3207 §4: may go on in plaintext
                return
            self.result.tls_failure = "starttls-not-supported"
            raise SessionError(f"STARTTLS refused: {reply}", "4.7.10", polite=True)
        self._check_nothing_after_starttls()
        self._enter(State.TLS_HANDSHAKE)
        try:
            await self.proto.start_tls(self._tls_creator, self.t.tls)
        except SessionError as e:
            # The certificate check's own reason (expired, untrusted), when it noted one.
            why = getattr(self._tls_creator, "verify_error", "")
            self.result.tls_failure = handshake_failure(f"{why} {e}",
                                                        self.options.tls_policy == "verify")
            raise SessionError(f"TLS handshake failed: {f'{why}: ' if why else ''}{e}",
                               "4.7.5") from None
        self.result.tls = self.proto.tls_description()
        self.result.tls_verified = self.options.tls_policy == "verify"
        if self.options.peer_verifier is not None:  # DANE (RFC 7672 §3): before any command
            problem = self.options.peer_verifier.verify(self.proto.peer_chain())
            if problem is not None:
                # RFC 8460 §4.3: as mta.delivery.dane counts it for TLS reporting.
                self.result.tls_failure = ("certificate-host-mismatch" if "(RFC 7672 §3.2.2)"
                                           in problem else "tlsa-invalid")
                raise SessionError(f"TLS authentication failed: {problem}", "4.7.5")
            self.result.tls_verified = True
        # RFC 3207 §4.2: forget everything learned before TLS and ask again.
        self.caps = await self._hello(State.LHLO_AFTER_TLS if self.options.lmtp
                                      else State.EHLO_AFTER_TLS)
        remember = getattr(self._tls_creator, "remember", None)
        if remember is not None:  # TLS session resumption (mta.delivery.tlspolicy)
            remember(self.proto.transport.getHandle())

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
        todo = deque((tr, list(dict.fromkeys(tr.message.recipients))) for tr in results)
        need_rset = False
        for _ in range(10_000):  # bound; each retry round delivers at least one recipient
            if not todo:
                return
            tr, recipients = todo.popleft()
            if need_rset:
                self._enter(State.RSET)
                reply = await self._command("RSET", self.t.ehlo)
                if reply.code != 250:
                    raise refused(reply, "RSET")
            completed, retry = await self._transaction(tr, recipients)
            need_rset = not completed
            if retry:  # RFC 5321 §4.5.3.1.10: the rest go in a new transaction
                todo.appendleft((tr, retry))
        raise RuntimeError("SMTP client: transaction loop did not end")

    def _refuse_locally(self, tr: TransactionResult, recipients: list[str]) -> bool:
        """Checks before MAIL; True if the whole transaction was refused here."""
        tx = tr.message
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

    def _check_requiretls(self) -> None:
        """RFC 8689 §4.2.1: a REQUIRETLS message goes only over TLS whose certificate
        was verified (DANE, MTA-STS or a "verify" policy) to a server that offers
        REQUIRETLS; otherwise this server fails (5.7.10 / 5.7.30, §5) before MAIL."""
        if not (self.proto.tls_active and self.result.tls_verified):
            raise SessionError(f"REQUIRETLS: the connection to {self.result.server} is not TLS "
                               "with a verified certificate (RFC 8689 §4.2.1)", "5.7.10",
                               polite=True)
        if not self.caps.has("REQUIRETLS"):
            raise SessionError(f"REQUIRETLS support required: {self.result.server} does not offer "
                               "REQUIRETLS (RFC 8689 §4.2.1)", "5.7.30", polite=True)

    def _mail_command(self, tx: OutboundMessage) -> str:
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
        if tx.requiretls:
            params.append("REQUIRETLS")  # RFC 8689 §4.2.1 (offered: _check_requiretls)
        return " ".join([f"MAIL FROM:<{tx.sender}>", *params])

    async def _transaction(self, tr: TransactionResult, recipients: list[str]) -> tuple[bool, list[str]]:
        """Run MAIL/RCPT/DATA; returns (ended with a DATA reply, recipients to retry).

        A 421 among the MAIL/RCPT/DATA replies (RFC 5321 §3.8: the server closes, as
        chasquid does after three errors) ends the reading there; every reply that came
        before it is still applied (a 5xx MAIL fails every recipient, a 5xx/4xx RCPT
        fails/defers its recipient), and only then does the 421 end the session, with
        the recipients still open left unanswered (for the next server or a retry).
        """
        if tr.message.requiretls and recipients:
            self._check_requiretls()
        if not recipients or self._refuse_locally(tr, recipients):
            return True, []
        tx = tr.message
        mail_line = self._mail_command(tx)
        rcpt_lines = [f"RCPT TO:<{r}>" for r in recipients]
        if tx.dsn_rcpt and self.caps.has("DSN"):  # RFC 3461 §4.1, §4.2
            tr.dsn = True
            rcpt_lines = [f"{line} {tx.dsn_rcpt[r]}" if tx.dsn_rcpt.get(r) else line
                          for line, r in zip(rcpt_lines, recipients, strict=True)]
        pipelined = self.caps.has("PIPELINING")
        closing: tuple[ServerReply, str] | None = None  # a 421 and what it answered
        rcpt_replies: list[ServerReply] = []
        data: ServerReply | None = None
        chunked = self._chunking
        small = self._small_chunk(tx) if chunked and pipelined else None
        last: ServerReply | None = None  # the reply to a pipelined BDAT LAST
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
                raise refused(*closing)
            await self._drain_unwanted_data(data)
            if mail.kind == 5:
                return False, []
            raise refused(mail, "MAIL FROM")

        accepted, retry = self._sort_rcpt_replies(tr, recipients[:len(rcpt_replies)], rcpt_replies)
        if closing is not None:  # the accepted and the unread stay unanswered
            raise refused(*closing)
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
                           replies: list[ServerReply]) -> tuple[list[str], list[str]]:
        accepted: list[str] = []
        too_many: list[tuple[str, ServerReply]] = []
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

    async def _drain_unwanted_data(self, data: ServerReply | None) -> None:
        """A pipelined DATA that was accepted though there is nothing to send: end it empty."""
        if data is not None and data.code == 354:
            self._enter(State.DATA_DONE)
            self.proto.transport.write(b".\r\n")
            await self._read(self.t.data_end, "end of data")

    def _final(self, tr: TransactionResult, accepted: list[str], reply: ServerReply, stage: str) -> None:
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

    async def _send_body(self, tx: OutboundMessage) -> ServerReply | None:
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
                raise refused(early, "the message data") from None
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

    def _small_chunk(self, tx: OutboundMessage) -> bytes | None:
        """The whole message as one ``BDAT n LAST``, if it is at most SMALL_BODY octets."""
        try:
            head = QueuedMessage(tx.data_path).read_start(SMALL_BODY + 1)
        except OSError as e:  # not the server's fault; nothing was sent yet
            raise SessionError(f"cannot read the message file: {e.strerror}", "4.3.0",
                               polite=True) from None
        return bdat_command(head, True) if len(head) <= SMALL_BODY else None

    async def _read_pipelined_last(self) -> ServerReply:
        """The reply to the BDAT LAST sent with MAIL and the RCPTs (whatever theirs were:
        the server read and answered it in any case, RFC 3030 §2); a 421 is returned
        too, for the caller to apply the replies before it first."""
        self.body_started = True
        self._enter(State.BDAT)
        return await self._read_any(self.t.data_end, "BDAT LAST")

    async def _bdat(self, tr: TransactionResult, accepted: list[str], last: ServerReply | None) -> bool:
        """Send the message with BDAT (unless a pipelined BDAT LAST already carried
        it: ``last``) and give the accepted recipients its result.  True when the
        LAST chunk got a 2xx (the transaction is over; otherwise RSET follows).

        LMTP: the LAST chunk is answered once per accepted recipient, in RCPT
        order (RFC 2033 §4.2); ``last`` is then the first of those replies, and
        the transaction is over whatever they say."""
        answered_last = True
        if last is None:
            self._enter(State.BDAT)
            last, answered_last = await self._send_chunks(tr.message)
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

    async def _send_chunks(self, tx: OutboundMessage) -> tuple[ServerReply, bool]:
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
        refusal: ServerReply | None = None
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

    def _early_refusal(self, due: int) -> ServerReply | None:
        """After the connection failed while sending chunks: a refusal among the
        (at most ``due``) replies already received, if any."""
        for _ in range(due):
            reply = self.proto.take_reply()
            if reply is None:
                return None
            if reply.code == 421:
                raise refused(reply, "BDAT")
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
