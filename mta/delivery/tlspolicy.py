"""The outbound client's TLS policy: when to start TLS and how the server's
certificate is checked.

``ClientOptions.tls_policy`` is one of :data:`TLS_POLICIES`:

* ``none``: never STARTTLS;
* ``opportunistic``: STARTTLS when offered, certificate unchecked (RFC 7435);
  without it, or if it is refused, go on in plaintext (RFC 3207 §4);
* ``require``: STARTTLS or fail the server, certificate unchecked;
* ``verify``: STARTTLS or fail, and the certificate must match the MX or
  smarthost name (RFC 6125, with service_identity);
* ``dane``: STARTTLS or fail, and the certificate chain must match the MX
  host's TLSA records (RFC 7672): no PKIX check in the handshake, the
  ``ClientOptions.peer_verifier`` (:mod:`mta.delivery.dane`) checks the
  chain once the handshake is done, before anything is sent over it.

Under ``opportunistic`` and ``require`` the TLS session is resumed on the next
connection to the same server (RFC 8446 §2.2, RFC 5077): one client context
for all of them (:class:`TLSSessionStore`, like Postfix's tlsmgr), the
session remembered after the first EHLO reply under TLS (by then a TLS 1.3
server's tickets have arrived).  Not under ``verify`` and ``dane``: a resumed
session would skip the certificate they check.

An LMTP server is usually a local socket, so ``opportunistic`` does not try
STARTTLS there (RFC 2033: a local, trusted link); ``require`` and ``verify`` do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

TLS_POLICIES = ("none", "opportunistic", "require", "verify", "dane")


class PeerVerifier(Protocol):
    """Checks the server's certificate chain after the TLS handshake (DANE)."""

    def verify(self, chain: Sequence[Any]) -> str | None:
        """None if the chain (pyOpenSSL X509s, the server's certificate first) is
        accepted, else the reason."""


def tries_starttls(policy: str, lmtp: bool) -> bool:
    """Whether STARTTLS is sent at all when the server offers it."""
    return policy != "none" and not (lmtp and policy == "opportunistic")


def requires_tls(policy: str) -> bool:
    """Whether a server without STARTTLS (or refusing it) fails under ``policy``."""
    return policy in ("require", "verify", "dane")


class TLSSessionStore:
    """The outbound client's TLS sessions to resume, by server: bounded, least
    recently used first out.

    One shared client context (its session cache in client mode) serves every
    unverified connection, so a session of one connection can be offered on
    the next (``SSL_set_session``); a new context per connection, as
    ``CertificateOptions`` gives, could not.
    """

    def __init__(self, max_entries: int = 1000) -> None:
        self.max_entries = max_entries
        self.options = CertificateOptions()  # verify=False by default
        self.options.getContext().set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        self._sessions: OrderedDict[Hashable, SSL.Session] = OrderedDict()

    def get(self, key: Hashable) -> SSL.Session | None:
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def put(self, key: Hashable, session: SSL.Session) -> None:
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_entries:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


CLIENT_SESSIONS = TLSSessionStore()  # the process's store (one per worker process)


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """Encrypt without checking the certificate (opportunistic/require, RFC 7435).

    Still sends SNI for a DNS name, like optionsForClientTLS does.  With a
    ``sessions`` store and a ``session_key``, offers the session last
    remembered under that key and :meth:`remember` keeps the new one.
    """

    def __init__(self, hostname: str | None, sessions: TLSSessionStore | None = None,
                 session_key: Hashable | None = None) -> None:
        self._sessions = sessions if session_key is not None else None
        self._key = session_key
        self._options = sessions.options if self._sessions is not None else CertificateOptions()
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
        if self._sessions is not None:
            session = self._sessions.get(self._key)
            if session is not None:
                connection.set_session(session)
        return connection

    def remember(self, connection: Any) -> None:
        """Keep ``connection``'s session (a pyOpenSSL Connection after the handshake)."""
        if self._sessions is None or not isinstance(connection, SSL.Connection):
            return
        session = connection.get_session()
        if session is not None:
            self._sessions.put(self._key, session)

# OpenSSL's X509_V_ERR_* codes worth naming in a failure (and in a TLS report,
# RFC 8460 §4.3.1: certificate-expired rather than certificate-not-trusted).
_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate, not trusted",
    19: "self-signed certificate in the chain, not trusted",
    20: "unable to get the issuer certificate, not trusted",
    21: "unable to verify the first certificate, not trusted",
}


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """The ``verify`` policy: the chain checked against ``trust_root`` and the leaf
    against ``hostname`` (RFC 6125, service_identity), as ``optionsForClientTLS``
    does, and why the chain failed noted in ``verify_error`` for the failure's
    text.  The connection comes from ``optionsForClientTLS`` (SNI, trust
    store); only its verify callback is this one, which does the same name
    check as Twisted's own and also sees OpenSSL's error number."""

    def __init__(self, hostname: str, trust_root: Any) -> None:
        self._inner = optionsForClientTLS(hostname, trustRoot=trust_root)
        ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._ids = [IPAddress_ID(hostname) if ip else DNS_ID(hostname)]
        self.verify_error = ""

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        protocol = [tlsProtocol]  # dropped after the leaf's check: no cycle left behind

        def check(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            try:
                if not ok and not self.verify_error:
                    self.verify_error = _VERIFY_ERRORS.get(errno, f"certificate error {errno}")
                if depth != 0:
                    return bool(ok)
                try:
                    verify_service_identity(extract_patterns(cert), self._ids, [])
                except VerificationError:
                    if protocol:
                        protocol[0].failVerification(Failure())
                    return False
                finally:
                    protocol.clear()
                return bool(ok)
            except Exception:  # never raise inside an OpenSSL callback
                log.failure("while verifying a certificate")
                return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
        return connection


def tls_creator(policy: str, tls_hostname: str | None, trust_root: Any, server: str, *,
                sessions: TLSSessionStore | None = CLIENT_SESSIONS,
                session_key: Hashable | None = None) -> Any:
    """The connection creator for STARTTLS to ``server`` under ``policy``.

    ``session_key`` (the server's address and the TLS name) names the session
    to resume under ``opportunistic``/``require``; None: a full handshake.
    """
    if policy == "verify":
        # RFC 7672-style verification is out of scope; this is the certificate checked
        # with service_identity against the MX / smarthost name (RFC 6125).
        return VerifyingClientTLS(tls_hostname or server, trust_root)
    if policy in ("opportunistic", "require") and session_key is not None:
        return UnverifiedClientTLS(tls_hostname, sessions, (session_key, tls_hostname))
    return UnverifiedClientTLS(tls_hostname)
