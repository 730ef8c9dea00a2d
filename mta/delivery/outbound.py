"""The outbound client's values: what :func:`mta.delivery.client.send` is asked
to send and how, and what it reports back.

An :class:`OutboundMessage` is one message for one or more recipients, sent
in one mail transaction; :class:`ClientOptions` say how to talk to the
server (with :class:`Timeouts` per stage, RFC 5321 §4.5.3.2); the
:class:`SessionResult` of a connection holds a :class:`TransactionResult` per
message, with a :class:`RecipientReply` for every recipient that got a final
answer there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.delivery.tlspolicy import TLS_POLICIES
from mta.queue.courier import Outcome


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
class OutboundMessage:
    """One message for one or more recipients, as one mail transaction
    (MAIL/RCPT/DATA or BDAT) sends it."""

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
    # MAIL ... REQUIRETLS (RFC 8689): only over verified TLS to a server offering it.
    requiretls: bool = False

    @property
    def needs_smtputf8(self) -> bool:
        return self.smtputf8 or not self.sender.isascii() or not all(r.isascii() for r in self.recipients)


@dataclass
class ClientOptions:
    """How to talk to a server: our name, the TLS policy, credentials, timeouts, LMTP."""

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
    # Under "dane": checks the certificate chain after the handshake
    # (mta.delivery.tlspolicy.PeerVerifier; a mta.delivery.dane.TLSAVerifier).
    peer_verifier: Any = None
    # Source addresses of the connection (delivery.bind_address / bind_address6, or a
    # route entry's): IPv4 servers are reached from bind_address, IPv6 ones from
    # bind_address6; a host name from whichever is set (bind_address first).
    bind_address: str | None = None
    bind_address6: str | None = None

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
    """What the mail transaction of one :class:`OutboundMessage` got on this server."""

    message: OutboundMessage
    replies: dict[str, RecipientReply] = field(default_factory=dict)
    # The server offered DSN (RFC 3461) when the transaction's RCPTs were sent:
    # the DSN parameters went with them, and their notices are now its job.
    dsn: bool = False

    def unanswered(self) -> list[str]:
        """Recipients without a final reply here: to be tried on the next server."""
        return [r for r in dict.fromkeys(self.message.recipients) if r not in self.replies]


@dataclass
class SessionResult:
    """Everything one connection to one server came to: one
    :class:`TransactionResult` per message, in the order given."""

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
    # Our end of the connection (the sending MTA's address in a TLS report, RFC 8460 §4.4).
    local_ip: str = ""
    # This connection's TLS step was done (TLS started, or the policy let it go on in
    # clear text); False for a reused connection and one that failed before it.
    tls_checked: bool = False
    # Why the policy's TLS requirement failed, as RFC 8460 §4.3 names it
    # (mta.delivery.tlsoutcome.FAILURES); "" when it did not.
    tls_failure: str = ""
