"""Header fixes for mail our own users submit (RFC 6409 §8).

The message is completed with Date and Message-ID when they are missing, and
Bcc is removed so blind recipients are never revealed.  Used by the SMTP
session for authenticated mail and by local submission (sendmail).
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import make_msgid

from mta.mail.headers import fold_header_bytes, unfold_headers


def complete_headers(lines: list[bytes], hostname: str, now: Callable[[], str]) -> list[bytes]:
    """Drop Bcc; add Date (``now()``) and Message-ID (at ``hostname``) if missing."""
    fields = unfold_headers(lines)
    names = {name for name, _ in fields}
    out = [line for name, group in fields if name != b"bcc" for line in group]
    if b"date" not in names:
        out.append(b"Date: " + now().encode("ascii"))
    if b"message-id" not in names:
        out.append(fold_header_bytes(b"Message-ID: " + make_msgid(domain=hostname).encode("ascii")))
    return out
