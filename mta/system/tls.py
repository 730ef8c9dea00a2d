"""TLS for the server side: certificates from files, TLS 1.2 or newer, SNI.

``server_tls(tls_config)`` returns a context factory for ``startTLS`` (STARTTLS
on 25/587) and for implicit TLS (465).  Twisted's ``CertificateOptions`` gives
its own secure cipher list; we only raise the minimum version to TLS 1.2.

With ``cert_dir`` set, a directory of ``<hostname>/fullchain.pem`` and
``<hostname>/privkey.pem`` (the certbot layout) is read at start-up and the
certificate is chosen by the name the client asks for (SNI, RFC 6066 §3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from mta.config import TLSConfig

log = Logger()


class TLSConfigError(Exception):
    pass


def _options(cert_file: Path, key_file: Path) -> ssl.CertificateOptions:
    try:
        chain_pem = cert_file.read_bytes()
        key_pem = key_file.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{e.filename}: {e.strerror}") from None
    try:
        certs = ssl.Certificate.loadPEM(chain_pem)
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        extra = _extra_chain(chain_pem)
        return ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs.original,
            extraCertChain=extra,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as e:
        raise TLSConfigError(f"{cert_file}: cannot load certificate or key: {e}") from None


def _extra_chain(pem: bytes) -> list:
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = [marker + p for p in pem.split(marker)[1:]]
    return [crypto.load_certificate(crypto.FILETYPE_PEM, p) for p in parts[1:]]


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """A server context factory that picks a certificate by SNI name."""

    def __init__(self, default: ssl.CertificateOptions, by_name: dict[str, ssl.CertificateOptions]):
        self.default = default
        self.by_name = {name.lower(): opts.getContext() for name, opts in by_name.items()}
        self._context = default.getContext()
        self._context.set_tlsext_servername_callback(self._pick)

    def _pick(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if name:
            ctx = self.by_name.get(name.decode("ascii", "replace").lower())
            if ctx is not None:
                connection.set_context(ctx)

    def getContext(self) -> SSL.Context:  # noqa: N802 (Twisted interface)
        return self._context


def server_tls(config: TLSConfig) -> SNIContextFactory | ssl.CertificateOptions | None:
    if not config.enabled:
        return None
    assert config.cert_file is not None and config.key_file is not None
    default = _options(config.cert_file, config.key_file)
    if config.ask_client_cert:
        _ask_client_cert(default.getContext())
    if config.cert_dir is None:
        return default
    by_name = {}
    try:
        entries = sorted(config.cert_dir.iterdir())
    except OSError as e:
        raise TLSConfigError(f"{config.cert_dir}: {e.strerror}") from None
    for d in entries:
        if (d / "fullchain.pem").exists() and (d / "privkey.pem").exists():
            by_name[d.name] = _options(d / "fullchain.pem", d / "privkey.pem")
            if config.ask_client_cert:
                _ask_client_cert(by_name[d.name].getContext())
    return SNIContextFactory(default, by_name)


def sni_certificate(config: TLSConfig, name: str) -> Path | None:
    """The ``fullchain.pem`` of ``cert_dir`` that :func:`server_tls` serves to a client
    asking for ``name`` by SNI (its directory's name, any case, with a ``privkey.pem``),
    or None when none applies (the default ``cert_file`` is served)."""
    if config.cert_dir is None:
        return None
    try:
        entries = sorted(config.cert_dir.iterdir())
    except OSError:
        return None
    wanted = name.lower().rstrip(".")
    for d in entries:
        if d.name.lower() == wanted and (d / "fullchain.pem").exists() \
                and (d / "privkey.pem").exists():
            return d / "fullchain.pem"
    return None


def describe_tls(transport: object) -> tuple[str, str]:
    """(protocol version, cipher name) of an established TLS transport, or ("", "")."""
    conn = None
    for getter in ("getHandle",):
        try:
            handle = getattr(transport, getter)()
        except Exception:
            handle = None
        if isinstance(handle, SSL.Connection):
            conn = handle
    if conn is None:
        return "", ""
    return conn.get_protocol_version_name() or "", conn.get_cipher_name() or ""


# --- the client's certificate, for the milter macros (issue 17) --------------------


def _accept_any(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    return True  # asked for, never verified: it only names the client to the milters


def _ask_client_cert(ctx: SSL.Context) -> None:
    """Ask the client for a certificate (a CertificateRequest, RFC 8446 §4.3.2)
    without requiring or verifying one, as Postfix's smtpd_tls_ask_ccert."""
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any)


def describe_peer(transport: object) -> tuple[str, str, str]:
    """(secret bits of the cipher, client certificate's subject CommonName, its
    issuer's CommonName) of an established TLS transport, as Postfix's milter
    macros {cipher_bits}, {cert_subject}, {cert_issuer}; "" for what is not there
    (no TLS, or a client that sent no certificate)."""
    try:
        conn = transport.getHandle()  # type: ignore[attr-defined]
    except Exception:
        return "", "", ""
    if not isinstance(conn, SSL.Connection):
        return "", "", ""
    bits = str(conn.get_cipher_bits() or "")
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return bits, "", ""
    # The issuer's CommonName, else its Organization (as Postfix's tls_issuer_CN).
    return bits, _attribute(cert.subject, NameOID.COMMON_NAME), (
        _attribute(cert.issuer, NameOID.COMMON_NAME) or _attribute(cert.issuer, NameOID.ORGANIZATION_NAME))


def _attribute(name: Any, oid: Any) -> str:
    values = name.get_attributes_for_oid(oid)
    value = str(values[0].value) if values else ""
    # Only printable text goes to a milter (a certificate is the client's to write).
    return "".join(c for c in value if c.isprintable())[:256]
