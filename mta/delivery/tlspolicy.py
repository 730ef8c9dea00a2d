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
from twisted.internet import interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from zope.interface import implementer

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


def tls_creator(policy: str, tls_hostname: str | None, trust_root: Any, server: str) -> Any:
    """The connection creator for STARTTLS to ``server`` under ``policy``."""
    if policy == "verify":
        # RFC 7672-style verification is out of scope; this is the certificate checked
        # with service_identity against the MX / smarthost name (RFC 6125).
        return optionsForClientTLS(tls_hostname or server, trustRoot=trust_root)
    return UnverifiedClientTLS(tls_hostname)
