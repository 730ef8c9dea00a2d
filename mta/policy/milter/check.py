"""The milters as one check of the SMTP session's pipeline (``milter`` in [checks] order).

For each SMTP session the check keeps one :class:`MilterSession` per milter
configured for the listener (its own ``milters`` in [listeners.NAME], else
the listener kind's list in [milters], else ``[milters] smtpd``), in order.  A milter's connection is opened lazily, at the session's
first MAIL FROM (a client that never sends mail costs no milter connection),
where the milter is told the connection (SMFIC_CONNECT), the HELO name and the
MAIL FROM in one go, each with the macros Postfix sends at that stage; a
refusal of the connection or the HELO is then the reply to MAIL FROM, as
Postfix's delayed refusal (smtpd_delay_reject) gives it.  The connection is
kept across the transactions of the session (SMFIC_ABORT before the next MAIL
when a transaction ended before its end of message) and closed with SMFIC_QUIT
with the session (:meth:`MilterCheck.close`).

Stages: MAIL (SMFIC_MAIL), RCPT (SMFIC_RCPT, for the recipients our own checks
accepted) and MESSAGE (SMFIC_DATA, each header, SMFIC_EOH, the body in chunks
of at most 65535 octets read from the message in memory or from its file on
disk, SMFIC_BODYEOB).  Steps the milter said it does not want
(SMFIP_NO*) are not sent, and steps it does not answer (SMFIP_NR_*) are not
waited for.  The end-of-message modifications (header add/change/insert,
body replacement, recipients added/deleted, sender changed, quarantine) of
each milter are applied before the next milter sees the message, and come
back as the verdict (``header_lines``, :class:`~mta.mail.checks.MessageEdits`,
``quarantine``, ``discard``).

A milter that is down, closes the connection, sends garbage or answers too
slowly (connect_timeout, command_timeout, content_timeout) is logged once (event
``milter``, ``result`` = the fault) and then gets its ``default_action`` for
the rest of the session: ``tempfail`` (451 4.7.1 for each later step that
reaches it) or ``accept`` (as if it were not configured).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mta.mail import replies as R
from mta.mail.checks import ACCEPT, Action, CheckState, Client, MessageEdits, Stage, Verdict, reject
from mta.mail.replies import Reply
from mta.policy.milter import codec
from mta.policy.milter.codec import Negotiated, Packet, ProtocolError
from mta.policy.milter.protocol import MilterFailed, MilterProtocol, client_endpoint

log = Logger(namespace="mta.policy.milter")

# The listener kind of a local submission's state (:class:`LocalState`).
LOCAL = "local"

# A replacement body held in memory up to this, then in a temporary file.
BODY_IN_MEMORY = 1 << 20


def log_milter(milter: str, result: str, ip: str, stage: str, detail: str = "",
               action: str = "") -> None:
    """The one log event of the milter client (``milter``): a fault (``result``
    closed, garbage, timeout, down, shutdown, with ``action`` the default action
    applied), or what a milter decided that the session does not log itself
    (``discard``, ``quarantine``)."""
    log.info("milter {milter} {result} at {stage} for {ip}: {detail} {action}", milter=milter,
             result=result, stage=stage, ip=ip, detail=detail, action=action, event="milter")


def parse_replycode(text: bytes) -> Reply:
    """SMFIR_REPLYCODE's ``"550 5.7.1 text"`` (lines ``550-5.7.1 ...``\\r\\n) as a Reply;
    ProtocolError unless a 4xx or 5xx code."""
    text_ = text.rstrip(b"\0").decode("utf-8", "replace").replace("\r\n", "\n")
    # Only printable text goes into our reply: no CR or control octet of the milter's.
    lines = ["".join(c for c in line if c.isprintable()) for line in text_.split("\n")]
    code = lines[0][:3]
    if not (code.isdigit() and code[0] in "45") or len(lines) > 100:
        raise ProtocolError(f"reply code {lines[0][:20]!r}")
    enhanced = ""
    texts = []
    for line in lines:
        rest = line[4:] if line[:3] == code else line
        words = rest.split(" ", 1)
        if words and _enhanced(words[0], code[0]):
            enhanced = enhanced or words[0]
            rest = words[1] if len(words) > 1 else ""
        texts.append(rest)
    if not enhanced:
        enhanced = f"{code[0]}.7.1"
    return R.milter_reply(int(code), enhanced, "\n".join(texts))


def _enhanced(word: str, klass: str) -> bool:
    parts = word.split(".")
    return len(parts) == 3 and parts[0] == klass and all(p.isdigit() and len(p) <= 3 for p in parts)


def _address(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


# --- the header section as fields ---------------------------------------------


def header_section(lines: Any) -> list[bytes]:
    """The header lines without the empty line the DATA reader leaves at their end."""
    lines = list(lines)
    while lines and not lines[-1]:  # bounded: the lines
        lines.pop()
    return lines


def fields_of(lines: list[bytes]) -> list[list[bytes]]:
    """Header lines grouped into fields (a line that begins with space or tab
    continues the field before it)."""
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def name_value(field: list[bytes]) -> tuple[bytes, bytes]:
    """A field's name and value as a milter gets them: the value without the
    leading space, its lines joined by \\n (as Postfix sends them)."""
    name, _, first = field[0].partition(b":")
    value = b"\n".join([first.lstrip(b" \t"), *field[1:]])
    return name.strip(), value


def make_field(name: bytes, value: bytes) -> list[bytes]:
    """A milter's header (its value's lines split at \\n or \\r\\n) as our lines."""
    lines = value.replace(b"\r\n", b"\n").replace(b"\r", b"").split(b"\n")
    first = name + b": " + lines[0] if lines[0] else name + b":"
    return [first, *(line if line[:1] in (b" ", b"\t") else b"\t" + line for line in lines[1:])]


def _valid_name(name: bytes) -> bool:
    return bool(name) and len(name) <= 998 and all(33 <= c <= 126 and c != 58 for c in name)


# --- one milter in one session ---------------------------------------------------


class MilterSession:
    """One milter's state in one SMTP session (see the module docstring)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.proto: MilterProtocol | None = None
        self.neg: Negotiated | None = None
        self.failed: MilterFailed | None = None
        self.done_session = False  # SMFIR_ACCEPT of the connection: nothing more
        self.refusal: Verdict | None = None  # a refused connection or HELO: said at MAIL
        self.in_txn = False  # sent MAIL without the end of message yet
        self.done_txn = False  # SMFIR_ACCEPT for this message: nothing more of it
        self.discard = False  # SMFIR_DISCARD before the end of the message
        # Every macro's value known so far in the session: a milter may ask for any
        # of them at any later stage (SMFIR_SETSYMLIST).
        self.values: dict[str, str] = {}

    def proto_flag(self, flag: int) -> bool:
        return bool(self.neg is not None and self.neg.protocol & flag)


class MilterCheck:
    """The ``milter`` check (see the module docstring); ``ctx`` is the server context,
    ``reactor`` what connects (the clock is ``ctx.clock``)."""

    name = "milter"
    stages = frozenset({Stage.MAIL, Stage.RCPT, Stage.MESSAGE})

    def __init__(self, ctx: Any, reactor: Any = None) -> None:
        self.ctx = ctx
        self._reactor = reactor
        self._config: Any = None

    @property
    def reactor(self) -> Any:
        """What connects: the global reactor unless one was given."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def clock(self) -> Any:
        return self.ctx.clock

    @property
    def config(self) -> Any:
        """The configuration this check's pipeline was made for: read at first use,
        as a reload makes the pipeline before it gives the context the new one."""
        if self._config is None:
            self._config = self.ctx.config
        return self._config

    @property
    def milters(self) -> Any:  # mta.config.MiltersConfig
        return self.config.milters

    def applies(self, client: Client) -> bool:
        return bool(self.milters.for_listener(client.listener, client.listener_kind))

    # --- the session's milters ----------------------------------------------------

    def _sessions(self, state: CheckState) -> list[MilterSession]:
        data = state.check_data  # type: ignore[attr-defined]
        if data is None:
            data = state.check_data = {}  # type: ignore[attr-defined]
        sessions = data.get(self.name)
        if sessions is None:
            sessions = data[self.name] = [MilterSession(self.milters.get(name))
                                          for name in self._names(state)]
        return sessions

    def _names(self, state: CheckState) -> tuple[str, ...]:
        """The milters of the session's listener, in order (a state without a
        listener name: its kind's)."""
        if state.listener_kind == LOCAL:
            return self.milters.local
        return self.milters.for_listener(getattr(state, "listener_name", ""), state.listener_kind)

    def close(self, state: CheckState) -> None:
        """The SMTP session ended: SMFIC_QUIT to each milter connection."""
        data = state.check_data  # type: ignore[attr-defined]
        for ms in data.pop(self.name, ()) if data else ():
            if ms.proto is not None:
                ms.proto.close()

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        if not self._names(state):
            return ACCEPT  # (a caller without the pipeline's plan: none configured here)
        return Deferred.fromCoroutine(self._run(stage, state))

    async def _run(self, stage: Stage, state: CheckState) -> Verdict:
        sessions = self._sessions(state)
        if stage is Stage.MESSAGE:
            return await self._message(sessions, state)
        for ms in sessions:  # bounded: the configured milters
            verdict = await self._guarded(ms, state, stage, self._envelope_step(ms, stage, state))
            if verdict is not ACCEPT:
                return verdict
        return ACCEPT

    async def _guarded(self, ms: MilterSession, state: CheckState, stage: Stage, step: Any) -> Verdict:
        """Run ``step`` (a coroutine) for one milter; its fault gives the default action."""
        if ms.failed is not None:
            step.close()
            return self._default(ms, stage, state, log_it=False)
        try:
            return await step
        except MilterFailed as e:
            ms.failed = e
        except ProtocolError as e:
            ms.failed = MilterFailed("garbage", str(e))
        except CancelledError:
            # The pipeline's own time limit for the stage ([checks.milter] timeout).
            ms.failed = MilterFailed("timeout", "the stage's time limit")
            if ms.proto is not None:
                ms.proto._fail(ms.failed)
            raise
        if ms.proto is not None:
            ms.proto._fail(ms.failed)
        ms.in_txn = False
        return self._default(ms, stage, state, log_it=True)

    def _default(self, ms: MilterSession, stage: Stage, state: CheckState, log_it: bool) -> Verdict:
        settings = ms.settings
        failed = ms.failed
        assert failed is not None
        if log_it:
            log_milter(settings.name, failed.reason, state.client_ip, stage.value, failed.detail,
                       settings.default_action)
        if settings.default_action == "accept":
            return ACCEPT
        return Verdict(Action.TEMPFAIL, R.MILTER_TEMPFAIL, reason=f"milter_{failed.reason}")

    # --- connection, MAIL, RCPT ---------------------------------------------------

    async def _connect(self, ms: MilterSession, state: CheckState) -> None:
        settings = ms.settings
        endpoint = client_endpoint(self.reactor, settings.socket, settings.connect_timeout)
        clock = self.clock
        d = endpoint.connect(Factory.forProtocol(lambda: MilterProtocol(clock)))
        d.addTimeout(settings.connect_timeout, clock)
        try:
            ms.proto = await d
        except Exception as e:
            raise MilterFailed("down", f"{settings.socket}: {e}") from None
        answer = await self._ask(ms, codec.optneg(), settings.connect_timeout, optneg=True)
        ms.neg = codec.parse_optneg(answer[-1].data)
        if ms.neg.protocol & ~codec.PROTOCOL & 0x1FFFFF:
            raise ProtocolError(f"milter asks for protocol steps we do not offer "
                                f"0x{ms.neg.protocol & ~codec.PROTOCOL:x}")
        ip = state.client_ip
        name = f"[{ip}]"
        values = {
            "j": self.config.hostname, "{daemon_name}": state.listener_name,  # type: ignore[attr-defined]
            "{daemon_addr}": state.local_addr, "v": "mta",  # type: ignore[attr-defined]
            "_": f"{name} [{ip}]", "{client_addr}": ip, "{client_name}": name,
            "{client_port}": str(state.client_port),  # type: ignore[attr-defined]
        }
        verdict = await self._step(ms, codec.M_CONNECT, values, codec.connect(name, ip, state.client_port),  # type: ignore[attr-defined]
                                   codec.P_NOCONNECT, codec.P_NR_CONN)
        if verdict is None:
            bits, subject, issuer = state.tls_peer  # type: ignore[attr-defined]
            verdict = await self._step(ms, codec.M_HELO, {
                "{tls_version}": state.tls_version, "{cipher}": state.tls_cipher,  # type: ignore[attr-defined]
                "{cipher_bits}": bits, "{cert_subject}": subject, "{cert_issuer}": issuer,
            }, codec.packet(codec.HELO, codec.strings(state.helo)), codec.P_NOHELO, codec.P_NR_HELO)
        if verdict is ACCEPT:
            ms.done_session = True
        elif verdict is not None:
            ms.refusal = verdict

    def _macros(self, ms: MilterSession, stage: int, values: dict[str, str]) -> bytes:
        assert ms.neg is not None
        names = ms.neg.macros.get(stage, ())
        return codec.macros(codec.MACRO_COMMAND[stage], ((n, values.get(n, "")) for n in names))

    async def _step(self, ms: MilterSession, macro_stage: int, values: dict[str, str], command: bytes,
                    skip: int, no_reply: int, timeout: float | None = None) -> Verdict | None:
        """Send a step (its macros first) unless the milter skips it; its answer as a
        verdict: None to go on, ACCEPT for SMFIR_ACCEPT, a refusal, or ``discard``."""
        ms.values.update(values)
        if ms.proto_flag(skip):
            return None
        data = self._macros(ms, macro_stage, ms.values) + command
        if ms.proto_flag(no_reply):
            await self._ask(ms, data, 0, answer=False)
            return None
        answer = await self._ask(ms, data, timeout or ms.settings.command_timeout)
        return self._decide(answer[-1])

    async def _ask(self, ms: MilterSession, data: bytes, timeout: float, answer: bool = True,
                   optneg: bool = False, eom: bool = False) -> list[Packet]:
        assert ms.proto is not None
        d = ms.proto.request(data, timeout, answer=answer, optneg=optneg, eom=eom)
        return [] if d is None else await d

    @staticmethod
    def _decide(p: Packet) -> Verdict | None:
        command = p.command
        if command == codec.CONTINUE or command == codec.SKIP:
            return None
        if command == codec.ACCEPT:
            return ACCEPT
        if command == codec.REJECT:
            return reject(R.MILTER_REJECT, reason="milter")
        if command == codec.TEMPFAIL:
            return reject(R.MILTER_TEMPFAIL, reason="milter")
        if command == codec.REPLYCODE:
            return reject(parse_replycode(p.data), reason="milter")
        if command == codec.DISCARD:
            return Verdict(discard=True)
        raise ProtocolError(f"reply {command!r} at this step")

    async def _envelope_step(self, ms: MilterSession, stage: Stage, state: CheckState) -> Verdict:
        if stage is Stage.MAIL:
            if ms.proto is None:
                await self._connect(ms, state)
            elif ms.in_txn:
                await self._ask(ms, codec.packet(codec.ABORT), 0, answer=False)
            ms.in_txn, ms.done_txn, ms.discard = False, False, False
            if ms.refusal is not None:
                return ms.refusal
            if ms.done_session:
                return ACCEPT
            sender = state.sender or ""
            ms.in_txn = True
            verdict = await self._step(ms, codec.M_ENVFROM, {
                "i": state.queue_id, "{auth_type}": state.auth_type,  # type: ignore[attr-defined]
                "{auth_authen}": state.auth_user or "", "{auth_author}": "",
                "{mail_addr}": sender, "{mail_host}": sender.rpartition("@")[2] if "@" in sender else "",
                "{mail_mailer}": "smtp" if sender else "",
            }, codec.packet(codec.MAIL, codec.strings(f"<{sender}>")), codec.P_NOMAIL, codec.P_NR_MAIL)
        else:  # RCPT
            if ms.done_session or ms.done_txn or ms.discard or not ms.in_txn:
                return ACCEPT
            rcpt = str(state.recipient)
            domain = rcpt.rpartition("@")[2].lower()
            verdict = await self._step(ms, codec.M_ENVRCPT, {
                "{rcpt_addr}": rcpt, "{rcpt_host}": domain,
                "{rcpt_mailer}": "local" if domain in self.config.local_domains else "smtp",
            }, codec.packet(codec.RCPT, codec.strings(f"<{rcpt}>")), codec.P_NORCPT, codec.P_NR_RCPT)
        return self._envelope_verdict(ms, stage, verdict)

    def _envelope_verdict(self, ms: MilterSession, stage: Stage, verdict: Verdict | None) -> Verdict:
        if verdict is None:
            return ACCEPT
        if verdict is ACCEPT:
            ms.done_txn = True
            return ACCEPT
        if verdict.discard:
            ms.discard = True
            return ACCEPT
        if stage is Stage.MAIL:
            ms.in_txn = False  # a refused MAIL ends the milter's transaction too
        return verdict

    # --- the message --------------------------------------------------------------

    async def _message(self, sessions: list[MilterSession], state: CheckState) -> Verdict:
        msg = _Message(state)
        quarantine = ""
        try:
            for ms in sessions:  # bounded: the configured milters
                if any(m.discard for m in sessions):
                    break
                verdict = await self._guarded(ms, state, Stage.MESSAGE, self._eom(ms, state, msg))
                if verdict is not ACCEPT and verdict.action is not Action.ACCEPT:
                    msg.close()
                    return verdict
                quarantine = quarantine or verdict.quarantine
        except BaseException:
            msg.close()
            raise
        if any(m.discard for m in sessions):
            msg.close()
            log_milter(",".join(m.settings.name for m in sessions if m.discard), "discard",
                       state.client_ip, "message", "the message is dropped")
            return Verdict(discard=True, reason="milter_discard")
        if quarantine:
            log_milter(self.name, "quarantine", state.client_ip, "message", quarantine)
        return msg.verdict(quarantine)

    async def _eom(self, ms: MilterSession, state: CheckState, msg: _Message) -> Verdict:
        if ms.done_session or ms.done_txn or ms.discard or not ms.in_txn:
            return ACCEPT
        queue_id = {"i": state.queue_id}  # type: ignore[attr-defined]
        timeout = ms.settings.content_timeout
        verdict = await self._step(ms, codec.M_DATA, queue_id, codec.packet(codec.DATA),
                                   codec.P_NODATA, codec.P_NR_DATA)
        if verdict is None and not ms.proto_flag(codec.P_NOHDRS):
            for name, value in msg.header_values():  # bounded: the header section's fields
                verdict = await self._raw_step(ms, codec.header(name, value), codec.P_NR_HDR, timeout)
                if verdict is not None:
                    break
        if verdict is None:
            verdict = await self._step(ms, codec.M_EOH, queue_id, codec.packet(codec.EOH),
                                       codec.P_NOEOH, codec.P_NR_EOH, timeout)
        if verdict is None and not ms.proto_flag(codec.P_NOBODY):
            for chunk in msg.body_chunks():  # bounded: the body's size / 65535
                answer = await self._raw(ms, codec.packet(codec.BODY, chunk), codec.P_NR_BODY, timeout)
                if answer is not None and answer.command == codec.SKIP:
                    break
                verdict = None if answer is None else self._decide(answer)
                if verdict is not None:
                    break
        if verdict is None:
            ms.values.update(queue_id)
            answer_list = await self._ask(ms, self._macros(ms, codec.M_EOM, ms.values)
                                          + codec.packet(codec.BODYEOB), timeout, eom=True)
            ms.in_txn = False  # the end of message ends the milter's transaction
            verdict = self._decide(answer_list[-1])
            if verdict is None or verdict is ACCEPT:
                return msg.apply(ms, answer_list[:-1], self)
        # Else decided before its end (no SMFIC_BODYEOB): the milter's transaction
        # ends with the SMFIC_ABORT before the next MAIL (in_txn stays).
        if verdict is ACCEPT:
            ms.done_txn = True
        elif verdict.discard:
            ms.discard = True
        else:
            return verdict
        return ACCEPT

    async def _raw_step(self, ms: MilterSession, data: bytes, no_reply: int,
                        timeout: float) -> Verdict | None:
        answer = await self._raw(ms, data, no_reply, timeout)
        return None if answer is None else self._decide(answer)

    async def _raw(self, ms: MilterSession, data: bytes, no_reply: int, timeout: float) -> Packet | None:
        if ms.proto_flag(no_reply):
            await self._ask(ms, data, 0, answer=False)
            return None
        return (await self._ask(ms, data, timeout))[-1]

    @property
    def max_body(self) -> int:
        """The largest replacement body taken: limits.max_message_size."""
        return self.config.limits.max_message_size

    def targets_for(self, address: str) -> tuple[Any, ...]:
        """Where a recipient a milter adds goes (local user, alias or remote, as
        RCPT's lookup says, relay allowed: the milter is ours); () when nowhere."""
        from mta.mail.address import AddressError, parse_path
        from mta.policy.relay import check_recipient

        try:
            parsed = parse_path(f"<{address}>", smtputf8=True)
        except AddressError:
            return ()
        ctx = self.ctx
        decision = check_recipient(parsed, local_domains=ctx.config.local_domains, aliases=ctx.aliases,
                                   may_relay=True, srs=ctx.srs)
        return () if decision.reply is not None else tuple(decision.targets)

    # --- local submission (Postfix's non_smtpd_milters) ---------------------------

    async def local(self, sender: str, recipients: list[str], header_lines: list[bytes],
                    message: bytes) -> Verdict:
        """A local submission through ``[milters] local``, at its end, as Postfix
        does non-SMTP mail: connect and HELO as ``localhost`` from 127.0.0.1, MAIL,
        each RCPT, then the message (``header_lines`` and ``message``, whole, in
        CRLF) and its end, each milter's changes applied for the next.  The
        verdict as at MESSAGE; a refusal at any step refuses the message."""
        state = LocalState(sender, header_lines, message)
        try:
            verdict = await self._run(Stage.MAIL, state)
            for address in recipients:  # bounded: limits.max_recipients (the caller's)
                if not verdict.accepted:
                    return verdict
                state.recipient = address
                verdict = await self._run(Stage.RCPT, state)
            state.recipient = None
            if not verdict.accepted:
                return verdict
            return await self._run(Stage.MESSAGE, state)
        finally:
            self.close(state)

    # --- check-config -------------------------------------------------------------

    async def probe(self, name: str) -> str:
        """Connect to milter ``name`` and negotiate (mta check-config); "" when it
        answered, else the problem."""
        ms = MilterSession(self.milters.get(name))
        settings = ms.settings
        try:
            endpoint = client_endpoint(self.reactor, settings.socket, settings.connect_timeout)
            d = endpoint.connect(Factory.forProtocol(lambda: MilterProtocol(self.clock)))
            d.addTimeout(settings.connect_timeout, self.clock)
            try:
                ms.proto = await d
            except Exception as e:
                return f"cannot connect to {settings.socket}: {e}"
            answer = await self._ask(ms, codec.optneg(), settings.connect_timeout, optneg=True)
            codec.parse_optneg(answer[-1].data)
            return ""
        except (MilterFailed, ProtocolError) as e:
            return f"{settings.socket}: {e}"
        finally:
            if ms.proto is not None:
                ms.proto.close()


class _Message:
    """The message as the milters see it, with the changes of those before."""

    def __init__(self, state: CheckState) -> None:
        self.original_lines = header_section(state.header_lines)
        self.fields = fields_of(self.original_lines)
        self.headers_changed = False
        self.message = state.message
        self.path = state.message_path if state.message is None else None  # type: ignore[attr-defined]
        self.body: BinaryIO | None = None  # a replacement
        self.add: list[tuple[str, tuple[Any, ...]]] = []
        self.delete: list[str] = []
        self.sender: str | None = None
        self.ctx_state = state

    def header_values(self) -> Iterator[tuple[bytes, bytes]]:
        for field in self.fields:
            yield name_value(field)

    def body_chunks(self) -> Iterator[bytes]:
        """The body in SMFIC_BODY chunks (65535 octets), read as they go."""
        if self.body is not None:
            self.body.seek(0)
            while chunk := self.body.read(codec.CHUNK):  # bounded: the body's size
                yield chunk
            return
        if self.message is not None:
            m = self.message
            lines = self.original_lines  # as the message holds them
            start = len(b"\r\n".join(lines) + b"\r\n") if lines else 0
            if m[start : start + 2] == b"\r\n":
                start += 2  # the empty line
            for i in range(start, len(m), codec.CHUNK):
                yield m[i : i + codec.CHUNK]
            return
        if self.path is None:
            return
        with open(self.path, "rb") as f:
            offset = _body_offset(f)
            if offset < 0:
                return
            f.seek(offset)
            while chunk := f.read(codec.CHUNK):  # bounded: the file's size
                yield chunk

    def apply(self, ms: MilterSession, mods: list[Packet], check: MilterCheck) -> Verdict:
        """One milter's end-of-message modifications, for the next milter and the verdict."""
        assert ms.neg is not None
        actions = ms.neg.actions
        quarantine = ""
        new_body: BinaryIO | None = None
        body_size = 0
        for p in mods:  # bounded: MAX_MODIFICATIONS
            command, data = p.command, p.data
            need = _ACTION_NEEDED[command]
            if not actions & need:
                raise ProtocolError(f"modification {command!r} not negotiated")
            if command == codec.ADDHEADER:
                name, value = codec.split_strings(data, 2)
                self._header(name)
                self.fields.append(make_field(name, value))
            elif command == codec.INSHEADER:
                index, name, value = codec.parse_index_header(data)
                self._header(name)
                self.fields.insert(min(index, len(self.fields)), make_field(name, value))
            elif command == codec.CHGHEADER:
                index, name, value = codec.parse_index_header(data)
                self._header(name)
                self._change(name, max(index, 1), value)
            elif command == codec.REPLBODY:
                if new_body is None:
                    new_body = tempfile.SpooledTemporaryFile(BODY_IN_MEMORY)  # noqa: SIM115
                    body_size = 0
                body_size += len(data)
                if body_size > check.max_body:
                    new_body.close()
                    raise ProtocolError(f"replacement body over {check.max_body} octets")
                new_body.write(data)
            elif command in (codec.ADDRCPT, codec.ADDRCPT_PAR):
                address = _address(codec.split_strings(data, 1)[0])
                targets = check.targets_for(address)
                if targets:
                    self.add.append((address, targets))
                else:
                    log_milter(ms.settings.name, "add_rcpt_refused", self.ctx_state.client_ip,
                               "message", f"<{address}> has nowhere to go: not added")
            elif command == codec.DELRCPT:
                self.delete.append(_address(codec.split_strings(data, 1)[0]))
            elif command == codec.CHGFROM:
                self.sender = _address(codec.split_strings(data, 1)[0])
            elif command == codec.QUARANTINE:
                quarantine = codec.split_strings(data, 1)[0].decode("utf-8", "replace") or "milter"
        if new_body is not None:
            if self.body is not None:
                self.body.close()
            self.body = new_body
        return Verdict(quarantine=quarantine)

    def _header(self, name: bytes) -> None:
        if not _valid_name(name):
            raise ProtocolError(f"header name {name[:40]!r}")
        self.headers_changed = True

    def _change(self, name: bytes, index: int, value: bytes) -> None:
        """SMFIR_CHGHEADER: the index-th (from 1) field of that name; an empty value
        deletes it, one past the last adds it (as libmilter's smfi_chgheader says)."""
        lower = name.lower()
        seen = 0
        for i, field in enumerate(self.fields):
            if name_value(field)[0].lower() == lower:
                seen += 1
                if seen == index:
                    if value:
                        self.fields[i] = make_field(field[0].partition(b":")[0], value)
                    else:
                        del self.fields[i]
                    return
        if value:
            self.fields.append(make_field(name, value))

    def verdict(self, quarantine: str) -> Verdict:
        lines = [line for field in self.fields for line in field] if self.headers_changed else None
        edits = None
        if self.body is not None or self.add or self.delete or self.sender is not None:
            if self.body is not None:
                self.body.seek(0)
            edits = MessageEdits(body=self.body, add=tuple(self.add), delete=tuple(self.delete),
                                 sender=self.sender)
        if lines is None and edits is None and not quarantine:
            return ACCEPT
        return Verdict(header_lines=lines, edits=edits, quarantine=quarantine)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None


_ACTION_NEEDED = {
    codec.ADDHEADER: codec.F_ADDHDRS, codec.INSHEADER: codec.F_ADDHDRS,
    codec.CHGHEADER: codec.F_CHGHDRS, codec.REPLBODY: codec.F_CHGBODY,
    codec.ADDRCPT: codec.F_ADDRCPT, codec.ADDRCPT_PAR: codec.F_ADDRCPT_PAR,
    codec.DELRCPT: codec.F_DELRCPT, codec.CHGFROM: codec.F_CHGFROM,
    codec.QUARANTINE: codec.F_QUARANTINE,
}


def _body_offset(f: BinaryIO) -> int:
    """Where the body begins in a queue file being written (after the first
    empty line; the header section is bounded by limits.max_header_size)."""
    head = b""
    for _ in range(64):  # bounded: 64 x 64 KiB of header section at most
        block = f.read(65536)
        if not block:
            return -1
        head += block
        i = head.find(b"\r\n\r\n")
        if i >= 0:
            return i + 4
    return -1


class LocalState:
    """The view a local submission gives the milters (what :class:`MilterCheck`
    reads of an SMTP session's), as Postfix gives non-SMTP mail: from 127.0.0.1,
    HELO localhost, no TLS, no AUTH."""

    client_ip = "127.0.0.1"
    local_addr = "127.0.0.1"
    client_port = 0
    trusted = True
    listener_kind = LOCAL
    listener_name = LOCAL
    helo = "localhost"
    esmtp = True
    tls_active = False
    tls_version = ""
    tls_cipher = ""
    tls_peer = ("", "", "")
    auth_user = None
    auth_type = ""
    queue_id = ""  # made when the message is queued, after the milters
    message_path = None
    facts: Any = {}

    def __init__(self, sender: str, header_lines: list[bytes], message: bytes) -> None:
        self.sender = sender
        self.header_lines = header_lines
        self.message = message
        self.recipient: str | None = None
        self.check_data: dict[str, Any] | None = None
