"""The embedded default configuration used when ``twistd -n mta`` gets no ``--config``.

It is a working demo: unprivileged ports on loopback, a self-signed test
certificate generated on first run, and a demo local domain ``demo.test`` whose
user ``demo`` gets mail in ``var/mail/demo.test/demo/`` (Maildir).  Everything
lives under ``var/`` in the current directory.
"""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

DEFAULT_CONFIG = """
hostname = "mta.demo.test"
local_domains = ["demo.test"]
data_dir = "var"
domains_dir = "var/domains"

[listeners.mx]
endpoint = "tcp:2525:interface=127.0.0.1"
kind = "mx"

[listeners.submission]
endpoint = "tcp:2587:interface=127.0.0.1"
kind = "submission"

[listeners.submissions]
endpoint = "tcp:2465:interface=127.0.0.1"
kind = "submissions"

[tls]
cert_file = "var/tls/cert.pem"
key_file = "var/tls/key.pem"

# The demo usually runs without outside DNS; a real server keeps these on.
[spf]
enabled = false

[dkim]
verify = false

[dmarc]
enabled = false
"""

DEMO_USER = "demo"
DEMO_DOMAIN = "demo.test"


def default_base() -> Path:
    return Path.cwd()


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
