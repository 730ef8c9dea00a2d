"""Setting up the embedded demo configuration (:mod:`mta.defaults`) on first run:
a self-signed test certificate and the demo user with a random password.
"""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

from mta.defaults import DEMO_DOMAIN, DEMO_USER


def generate_self_signed(cert_file: Path, key_file: Path, hostname: str) -> None:
    """A throw-away self-signed certificate (EC P-256, 1 year) for the demo."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def prepare_demo(config) -> list[str]:
    """Create what the embedded configuration needs; returns lines to tell the user."""
    from mta.policy.auth import add_user

    notes = []
    if config.tls.cert_file and not config.tls.cert_file.exists():
        generate_self_signed(config.tls.cert_file, config.tls.key_file, config.hostname)
        notes.append(f"generated a self-signed test certificate in {config.tls.cert_file}")
    users = config.users_file(DEMO_DOMAIN)
    password_file = config.data_dir / "demo-password.txt"
    if not users.exists():
        password = secrets.token_urlsafe(12)
        add_user(users, DEMO_USER, password)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        notes.append(f"created user {DEMO_USER}@{DEMO_DOMAIN}; its password is in {password_file}")
    return notes
