"""The SMTP server's state by lifetime: the process's, a transaction's, and the checks' view.

* :class:`ServerContext`: what every session of the process shares
  (configuration, policy objects, the check pipeline, the connection counts).
* A connection's own state (client address, HELO name, TLS, AUTH, counters)
  is held by its session (:class:`mta.smtp.server.SMTPSession`); it lives
  until the connection closes and is reset only by STARTTLS (RFC 3207 §4.2).
* :class:`Transaction`: one mail transaction, MAIL FROM to the end of the
  message (RFC 5321 §3.3); EHLO, RSET, a refusal of the message or its
  queueing ends it.  (The reception of its message, DATA or BDAT, has state
  of its own: :class:`mta.smtp.reception.MessageReception`.)
* :class:`SessionView`: the read-only view of both that the checks get
  (:class:`mta.mail.checks.CheckState`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import interfaces

from mta.config import Config
from mta.mail.address import Address
from mta.mail.checks import EMPTY, Verdict
from mta.queue.envelope import Recipient
from mta.queue.intake import Intake
from mta.queue.store import QueueStore


@dataclass
class ServerContext:
    """What every session of the process shares: configuration and policy objects.

    A reload replaces ``config``, the policy objects (``users``, ``aliases``,
    ``identities``, ``tls``, ``spf``, ``authenticator``) and ``pipeline``; the
    checks read the policy objects when they run, and a session keeps the
    configuration and pipeline it started with.
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
    directory: Any = None  # mta.policy.directory.Directory that users/aliases/identities come from
    connections: dict[str, int] = field(default_factory=dict)
    sessions: set[Any] = field(default_factory=set)  # the SMTPSession objects
    accepting: bool = True
    # Called with (session, reply) for metrics; optional.
    observer: Any = None
    # The check pipeline (mta.smtp.pipeline); made from config.checks when not given.
    pipeline: Any = None
    # The DNS blocklists' screen (mta.policy.dnsbl.Screen), set by the dnsbl check
    # when [checks] order names it: the greylist asks it about allowlisted clients.
    screen: Any = None

    def __post_init__(self) -> None:
        if self.pipeline is None:
            from mta.smtp.pipeline import build_pipeline

            self.pipeline = build_pipeline(self.config, self, self.clock)

    @property
    def total_connections(self) -> int:
        return len(self.sessions)


@dataclass
class Transaction:
    """One mail transaction: MAIL FROM to the end of DATA (RFC 5321 §3.3).

    What goes into the queue (sender, recipients with their expansion, the
    message, its commit) is held by its :class:`~mta.queue.intake.Intake`, the
    one way into the queue that local submission and bounces use too; this
    adds what the SMTP dialogue and its checks learnt on the way.
    """

    sender: Address | None
    intake: Intake = field(default=None)  # type: ignore[assignment]  # set at MAIL (SMTPSession.smtp_MAIL)
    body_8bit: bool = False
    binarymime: bool = False  # BODY=BINARYMIME (RFC 3030 §3): BDAT only
    smtputf8: bool = False
    declared_size: int | None = None
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
    requiretls: bool = False  # MAIL ... REQUIRETLS (RFC 8689 §4.1)

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else str(self.sender)

    @property
    def recipients(self) -> list[Recipient]:
        """The accepted recipients, expanded (aliases), one per mailbox."""
        return self.intake.recipients

    @property
    def rcpt_addresses(self) -> list[str]:
        """Each accepted RCPT address once, in the order given."""
        return self.intake.originals

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

    One per session.  What the connection fixes once (``client_ip``,
    ``trusted``, ``listener_kind``) is copied in when it is known, at connect,
    and ``auth_user`` where the session sets it (AUTH, STARTTLS): the checks
    read these most; the rest reads through to the session.  The stage's
    subject is set by the session before it asks the pipeline: ``recipient``
    at RCPT, ``header_lines`` at HEADERS (the pipeline also writes the checks'
    rewrites there), ``message`` at MESSAGE.  It refers to the session weakly
    (see ``__init__``).
    """

    __slots__ = ("_s", "client_ip", "trusted", "listener_kind", "auth_user", "recipient",
                 "header_lines", "message", "check_data")

    def __init__(self, session: Any) -> None:  # an SMTPSession
        # Weakly: the session holds its view, and a strong reference back would make
        # a cycle of every session with all it holds, left to the cyclic garbage
        # collector instead of freed as the connection closes (more work per
        # message, and earlier full collections).  A check still waiting holds the
        # session through the session's callback on its Deferred.
        self._s = weakref.proxy(session)
        self.client_ip = ""
        self.trusted = False
        self.listener_kind: str = session.listener.kind
        self.auth_user: str | None = None
        self.recipient: Address | None = None
        self.header_lines: Sequence[bytes] = ()
        self.message: bytes | None = None
        # Checks' own per-session state, by check name (a milter's connection);
        # None until a check keeps something (Pipeline.close ends it).
        self.check_data: dict[str, Any] | None = None

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

    # --- what the milter client (mta.policy.milter, issue 17) reads besides ---------

    @property
    def listener_name(self) -> str:
        return self._s.listener.name

    @property
    def auth_type(self) -> str:
        """The SASL mechanism of a successful AUTH (PLAIN, LOGIN), else ""."""
        return getattr(self._s, "auth_mechanism", "") if self.auth_user else ""

    @property
    def client_port(self) -> int:
        return getattr(self._s.transport.getPeer(), "port", 0) or 0

    @property
    def local_addr(self) -> str:
        return getattr(self._s.transport.getHost(), "host", "") or ""

    @property
    def tls_version(self) -> str:
        return self._s.tls_version

    @property
    def tls_cipher(self) -> str:
        return self._s.tls_cipher

    @property
    def tls_peer(self) -> tuple[str, str, str]:
        """(cipher bits, client certificate subject CN, issuer CN) of the TLS session,
        "" each when absent (:func:`mta.system.tls.describe_peer`); read only by a
        milter's HELO step, so nothing is computed for a session without milters."""
        from mta.system.tls import describe_peer

        return describe_peer(self._s.transport) if self._s.tls_active else ("", "", "")

    @property
    def queue_id(self) -> str:
        """The transaction's queue id ("" outside one).  Asked for before its queue
        file is made (a milter's ``i`` at MAIL), the id is reserved then
        (:meth:`mta.queue.intake.Intake.reserve_id`): read by nothing else before
        the 354, so a session without milters does no more work."""
        txn = self._s.txn
        return "" if txn is None or txn.intake is None else txn.intake.id or txn.intake.reserve_id()

    @property
    def message_path(self) -> Any:
        """At MESSAGE, when ``message`` is None (spilled to disk as it arrived): the
        file it is in, flushed (our trace headers on top, then the message); else None."""
        writer = self._s._writer
        if writer is None:
            return None
        writer.flush()
        return writer.tmp_path
