"""Trace header text: the Received header we prepend (RFC 5321 §4.4).

Pure functions: the session gives the facts, these return header lines (bytes,
without the final CRLF, folded with CRLF + tab).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mta.mail.headers import fold_header

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")


def _clean(text: str) -> str:
    """Client-supplied text made safe inside a comment or word: no spaces, parens or controls."""
    return _UNSAFE.sub("?", text)[:255]


def protocol_keyword(esmtp: bool, tls: bool, auth: bool, smtputf8: bool) -> str:
    """The "with" keyword: RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA), RFC 6531 §3.7.3 (UTF8SMTP...)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


@dataclass(frozen=True)
class TraceInfo:
    helo: str
    client_ip: str
    client_name: str  # reverse DNS name, or "" when not looked up
    hostname: str
    queue_id: str
    esmtp: bool
    tls_version: str
    tls_cipher: str
    authenticated: bool
    smtputf8: bool
    recipients: tuple[str, ...]
    when: datetime | None = None


def received_header(info: TraceInfo, queue_id: str | None = None) -> bytes:
    """Build the Received header for a message we accept (``queue_id``, when
    given, instead of ``info.queue_id``: the session learns it last).

    The ``for`` clause names the recipient only when there is exactly one, so
    the header never reveals the other (possibly Bcc) recipients.
    """
    from_part = _clean(info.helo) or "unknown"
    tcp_info = f"[{info.client_ip}]"
    if info.client_name:
        tcp_info = f"{_clean(info.client_name)} {tcp_info}"
    lines = [f"Received: from {from_part} ({tcp_info})"]
    by = f"\tby {info.hostname} with " + protocol_keyword(
        info.esmtp, bool(info.tls_version), info.authenticated, info.smtputf8
    )
    lines.append(f"{by} id {info.queue_id if queue_id is None else queue_id}")
    if info.tls_version:
        lines.append(f"\t(version={_clean(info.tls_version)} cipher={_clean(info.tls_cipher)})")
    stamp = format_datetime(info.when) if info.when is not None else _now_stamp()
    if len(info.recipients) == 1:
        lines.append(f"\tfor <{info.recipients[0]}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return fold_header("\r\n".join(lines)).encode("utf-8")


_last_stamp: tuple[int, str] = (-1, "")


def _now_stamp() -> str:
    """The date-time of now for the header (RFC 5322 §3.3, whole seconds, UTC),
    formatted once per second: every message of that second shares it."""
    global _last_stamp
    second = int(time.time())
    if _last_stamp[0] != second:
        _last_stamp = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _last_stamp[1]


def count_received(header_names: list[bytes]) -> int:
    return sum(1 for name in header_names if name == b"received")
