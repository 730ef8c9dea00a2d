"""The vocabulary of the SMTP session's check pipeline: stages, verdicts, the check interface.

A *check* is a small object that takes one decision about a connection or a
mail transaction (a connection limit, SPF, the recipient lookup, DKIM ...).
The session asks :class:`mta.smtp.pipeline.Pipeline` at each stage; the
pipeline runs the checks configured for that stage, in order, and gives back
one :class:`Verdict`, which the session turns into its reply.

This module is data and interfaces only, so that both the checks (in
``mta.policy``) and the session and its pipeline (in ``mta.smtp``) can use
it: the layering (README.rst, "Layout") puts the session above the policy
decisions, and a vocabulary both sides share belongs on the floor.

What a check may change is said by its verdict, never by writing to the
session: headers to add (``headers``: on top of the message at MESSAGE, just
above our Received header at the envelope stages, as Received-SPF must be,
RFC 7208 §9.1), Authentication-Results entries (``auth_results``, RFC 8601:
the session writes one field with all of a transaction's entries),
rewritten header lines (``header_lines``, HEADERS only: the next check of the
stage sees them, the message is stored with them), the expanded recipients
(``targets``, RCPT only), facts other checks of the same transaction may read
(``facts``, e.g. the SPF result DMARC needs) and envelope annotations
(``envelope``, MESSAGE only, e.g. the SRS sender of forwarded mail).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from mta.mail.address import Address
from mta.mail.replies import Reply

# The empty mapping every verdict shares (no dict is made for a plain acceptance).
EMPTY: Mapping[str, Any] = MappingProxyType({})


class Stage(StrEnum):
    """When a check runs (RFC 5321 §3: the points at which a server may refuse).

    A StrEnum: its members hash as their strings, in C (the pipeline looks the
    stage up at every step of every message)."""

    # A new connection, before the greeting.  Refused with a closing reply (421):
    # that reply, then the connection is closed; with one that does not close (a
    # 554): that is the greeting, and the session takes only QUIT (RFC 5321 §3.1).
    CONNECT = "connect"
    HELO = "helo"  # the EHLO/HELO name, once its syntax is good
    MAIL = "mail"  # MAIL FROM, once its syntax and parameters are good
    RCPT = "rcpt"  # each RCPT TO address, once parsed
    HEADERS = "headers"  # the message's header section, as it completes (synchronous only)
    MESSAGE = "message"  # the whole message, after its terminator and before it is queued


class Action(Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # a 5xx reply (the transaction step is refused)
    TEMPFAIL = "tempfail"  # a 4xx reply (try again later)
    DISCONNECT = "disconnect"  # the reply, then the connection is closed (421)


class Verdict(NamedTuple):
    """A check's answer.  :data:`ACCEPT` is the shared plain acceptance.

    Immutable, as that shared one must be; a NamedTuple rather than a frozen
    dataclass because it is made for every recipient (the RCPT check's
    targets) and a frozen dataclass's __init__ sets each field through
    object.__setattr__, five times slower.

    ``reply`` is what the client hears for REJECT, TEMPFAIL and DISCONNECT.
    ``reason`` names the refusal in the "rejected" log event (the ``reason``
    field); ``quiet`` says the check logged the refusal itself (a "limit"
    event), so the session logs no "rejected" event for it.  The other fields
    are the modifications listed in the module docstring; the pipeline
    accumulates those of accepting checks, in order.
    """

    action: Action = Action.ACCEPT
    reply: Reply | None = None
    headers: tuple[bytes, ...] = ()
    auth_results: tuple[Any, ...] = ()  # authres clause objects (mta.policy.authresults)
    header_lines: list[bytes] | None = None
    targets: tuple[Any, ...] = ()  # mta.policy.relay.Target
    facts: Mapping[str, Any] | None = None  # None: nothing (no mapping made per verdict)
    envelope: Mapping[str, Any] | None = None
    reason: str = ""
    quiet: bool = False
    # MESSAGE only: accept the message but hold it in the quarantine (hold) queue
    # instead of delivering it; the text is the reason (a milter's SMFIR_QUARANTINE,
    # a content check's verdict).  The first non-empty one wins.
    quarantine: str = ""
    # MESSAGE only (a milter's end-of-message actions, issue 17): the body, the
    # recipients and the sender changed (:class:`MessageEdits`); the header
    # section's changes come as ``header_lines``, the whole section rewritten.
    # ``discard``: the message is accepted (250) and dropped, not queued.
    edits: MessageEdits | None = None
    discard: bool = False

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


ACCEPT = Verdict()


class MessageEdits(NamedTuple):
    """What a MESSAGE check changes besides the header section (``Verdict.edits``).

    ``body``: the new body (after the blank line), bytes or a binary file
    positioned at its start, CRLF line endings; None keeps it.  ``add``: the
    recipients to add, each (address, its expansion as RCPT's verdict gives
    it: ``Verdict.targets``); ``delete``: addresses whose recipients go (as
    given at RCPT, compared without case); ``sender``: the new envelope
    sender ("" for <>), None keeps it."""

    body: Any = None
    add: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    delete: tuple[str, ...] = ()
    sender: str | None = None


def reject(reply: Reply, reason: str = "", quiet: bool = False) -> Verdict:
    """REJECT for a 5xx ``reply``, TEMPFAIL for a 4xx one (a 421 disconnects)."""
    if reply.close:
        action = Action.DISCONNECT
    elif reply.code >= 500:
        action = Action.REJECT
    else:
        action = Action.TEMPFAIL
    return Verdict(action, reply, reason=reason, quiet=quiet)


class CheckState(Protocol):
    """What a check may read about the connection and the transaction (read-only).

    Attributes of a later stage are empty before it: ``sender`` is None before
    MAIL, ``recipient`` is the RCPT address being checked (None elsewhere),
    ``header_lines`` are the message's header lines from HEADERS on,
    ``message`` its bytes at MESSAGE (None when it was too large to hold in
    memory and went to disk as it arrived: dkim.max_message_size).  The
    session's view refers to its session weakly: a check reads it while its
    stage is being decided, not after the connection is gone.
    """

    client_ip: str
    trusted: bool  # the client is in relay_networks
    listener_kind: str  # mx, submission, submissions
    helo: str  # "" before EHLO/HELO
    esmtp: bool
    tls_active: bool
    auth_user: str | None
    sender: str | None  # MAIL FROM ("" for <>), None outside a transaction
    recipient: Address | None
    recipients: Sequence[str]  # the RCPT addresses accepted so far
    expanded: Sequence[Any]  # their targets (mta.queue.envelope.Recipient), one per mailbox
    header_lines: list[bytes]
    message: bytes | None
    facts: Mapping[str, Any]  # what earlier checks of this transaction said (Verdict.facts)


class Client(NamedTuple):
    """The class of client a session serves: all a check's :meth:`Check.applies` may read.

    It changes only at connect, on AUTH success and on STARTTLS (which forgets
    the AUTH, RFC 3207 §4.2); the pipeline keeps each class's checks (at most
    2 x 2 x the listeners), so a session asks for them with one lookup."""

    trusted: bool  # in relay_networks
    authenticated: bool  # AUTH succeeded (auth_user is set)
    listener_kind: str  # mx, submission, submissions
    listener: str = ""  # the listener's name ([listeners.NAME]: its own milters)


class Check(Protocol):
    """One decision, run by the pipeline at each of its ``stages``.

    A check may also have ``applies(client: Client) -> bool``: False says it
    has nothing to decide for that class of client (SPF for a trusted or
    authenticated one, say), and the pipeline does not run it for such a
    session at all.  Without it a check runs for every client.  Its answer
    must depend on the :class:`Client` alone (the pipeline keeps it for the
    pipeline's life), so what a reload may change (the configuration, the
    policy objects) is read by ``check``, not ``applies``.

    ``check`` returns a :class:`Verdict`, or a Deferred firing with one when
    it needs I/O (SPF, DNS, a thread).  It must not block; a synchronous
    answer is the fast path (no Deferred is made when every check of a stage
    answers at once).  An exception, a failed Deferred or a timeout is a
    failure, handled as the check's configured ``on_error`` says.
    """

    name: str
    stages: frozenset[Stage]

    def check(self, stage: Stage, state: CheckState) -> Any:  # Verdict | Deferred[Verdict]
        ...
