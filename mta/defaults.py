"""The embedded default configuration used when ``twistd -n mta`` gets no ``--config``.

It is a working demo: unprivileged ports on loopback, a self-signed test
certificate generated on first run, and a demo local domain ``demo.test`` whose
user ``demo`` gets mail in ``var/mail/demo.test/demo/`` (Maildir).  Everything
lives under ``var/`` in the current directory.  Creating the certificate and
the demo user is :mod:`mta.daemon.demo`'s job; this module is only the text.
"""

from __future__ import annotations

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
