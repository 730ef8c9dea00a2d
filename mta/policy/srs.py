"""Sender Rewriting Scheme for forwarded mail (srslib, the documented SRS0/SRS1 scheme).

When an alias forwards mail from ``alice@sender.example`` to a remote address,
the envelope sender is rewritten to ``SRS0=HHHH=TT=sender.example=alice@our.domain``
so SPF at the destination checks our domain, not the original sender's.  A
bounce sent to that address is accepted at RCPT time only if its HMAC and
timestamp verify, and is routed back to the original sender.

The secret comes from the configuration or, when unset, from a file created
once under the data directory (mode 0600), so addresses stay valid across
restarts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import srslib

from mta.queue.envelope import Envelope, Recipient, RecipientKind


class SRSError(ValueError):
    """An SRS address whose hash or timestamp does not verify."""


def load_or_create_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def is_srs_local(local: str) -> bool:
    return local[:5].upper() in ("SRS0=", "SRS1=")


class SRSRewriter:
    def __init__(self, secret: str, max_age_days: int = 21) -> None:
        self._srs = srslib.SRS(secret, validity_days=max_age_days)

    def forward(self, sender: str, alias_domain: str) -> str:
        """The rewritten sender for mail we forward on behalf of ``alias_domain``."""
        return self._srs.forward(sender, alias_domain)

    def reverse(self, address: str) -> str:
        """The original sender of an SRS address; SRSError if it does not verify."""
        try:
            return self._srs.reverse(address)
        except srslib.Error as e:
            raise SRSError(str(e)) from None


def rewrite_forwarded(envelope: Envelope, srs: SRSRewriter | None, local_domains: tuple[str, ...] | list[str]) -> None:
    """Forwarded recipients (a local alias expanding to a remote address) get an
    SRS-rewritten sender, recorded in the envelope, so SPF at the destination
    checks our domain.  Mail from our own domains is not rewritten."""
    envelope.extra.update(forwarding_extra(envelope.sender, envelope.recipients, srs, local_domains))


def forwarding_extra(sender: str, recipients: list[Recipient], srs: SRSRewriter | None,
                     local_domains: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The envelope annotations of :func:`rewrite_forwarded` (``srs_sender``,
    ``srs_recipients``) for mail from ``sender`` to ``recipients``; empty when
    nothing is forwarded."""
    if srs is None or not sender:
        return {}
    if sender.rpartition("@")[2] in local_domains:
        return {}
    forwarded = [r for r in recipients if r.kind is RecipientKind.REMOTE
                 and r.original.rpartition("@")[2] in local_domains]
    if not forwarded:
        return {}
    alias_domain = forwarded[0].original.rpartition("@")[2]
    return {"srs_sender": srs.forward(sender, alias_domain),
            "srs_recipients": [r.address for r in forwarded]}
