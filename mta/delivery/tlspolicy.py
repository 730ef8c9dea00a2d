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

An LMTP server is usually a local socket, so ``opportunistic`` does not try
STARTTLS there (RFC 2033: a local, trusted link); ``require`` and ``verify`` do.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@implementer(interfaces.IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
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


def tls_creator(policy: str, tls_hostname: str | None, trust_root: Any, server: str) -> Any:
    """The connection creator for STARTTLS to ``server`` under ``policy``."""
    if policy == "verify":
        # RFC 7672-style verification is out of scope; this is the certificate checked
        # with service_identity against the MX / smarthost name (RFC 6125).
        return VerifyingClientTLS(tls_hostname or server, trust_root)
    return UnverifiedClientTLS(tls_hostname)
