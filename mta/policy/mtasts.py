"""The MTA-STS policy of our domains (RFC 8461): its text and its id.

One policy serves every local domain (they share this MX): ``version``,
``mode``, one ``mx`` line per pattern (default: our hostname) and
``max_age``, lines ended by CRLF (RFC 8461 §3.2).  The id published in the
``_mta-sts`` TXT record (§3.1) is derived from the text, so it changes exactly
when the policy does and a sender fetches the new one: the first 20 hex
digits of the text's SHA-256 (§3.1 allows 1-32 letters and digits).

Used by the HTTPS service that serves the policy (:mod:`mta.daemon.mtasts`)
and by ``mta dns-check``, which prints the TXT record with the same id.
"""

from __future__ import annotations

import hashlib

from mta.config import MTASTSConfig

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
HOST_PREFIX = "mta-sts."  # the policy host is mta-sts.<domain> (§3.3)


def policy_text(config: MTASTSConfig, hostname: str) -> str:
    """The policy file's contents (RFC 8461 §3.2), CRLF line endings."""
    mx = config.mx or (hostname.lower().rstrip("."),)
    lines = ["version: STSv1", f"mode: {config.mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {config.max_age}"]
    return "".join(line + "\r\n" for line in lines)


def policy_id(text: str) -> str:
    """The ``id=`` of the TXT record for a policy: derived from its contents."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def txt_record(text: str) -> str:
    """The ``_mta-sts.<domain>`` TXT value for a policy (RFC 8461 §3.1)."""
    return f"v=STSv1; id={policy_id(text)}"
