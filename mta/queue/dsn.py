"""Delivery status notifications: bounces and delay warnings (RFC 3464).

Part of the queue package: the queue runner, which decides that a report is due,
builds it here and queues it itself.

:func:`build_dsn` writes the whole report as bytes with CRLF line endings, a
``multipart/report; report-type=delivery-status`` message (RFC 6522) of three
parts:

1. ``text/plain``: what happened, for a person;
2. ``message/delivery-status``: the machine-readable fields (RFC 3464 §2);
3. ``text/rfc822-headers``: the original message's header only, read from the
   queue file up to a size bound, never its body (RFC 3462 §2 allows this
   instead of the whole message, and it avoids re-sending large attachments).
   This is what every report carries unless the sender asked for the whole
   message with ``RET=FULL`` (RFC 3461 §4.3): a *failure* report then carries
   it as ``message/rfc822`` when it is at most ``max_return_bytes`` (1 MiB),
   else the header as above, saying so.  ``RET=HDRS`` and no RET both give
   the header (no RET leaves the choice to us: the header, as before).
   Success and delay reports always carry the header: RET is about failed
   DSNs (RFC 3461 §4.3).

Actions (RFC 3464 §2.3.3): ``failed`` (a bounce), ``delayed`` (a warning),
and, for NOTIFY=SUCCESS (RFC 3461 §5.2), ``delivered`` (final delivery here)
and ``relayed`` (passed to a next hop that does not offer DSN), which can be
mixed in one success report.  ``Original-Envelope-Id`` is the ENVID the
sender gave (RFC 3464 §2.2.1); ``Original-Recipient`` is the recipient's
ORCPT when it gave one (§2.3.1), else, as before, the RCPT address we
received (the address a relay would add as ORCPT, RFC 3461 §4.2).

Addresses that are not ASCII use the ``utf-8`` address type of RFC 6533 §3 in
its ``utf-8-addr-xtext`` form (``\\x{HEX}`` escapes), so the report part stays
ASCII; an original header with 8-bit octets is sent as
``message/global-headers`` (RFC 6533 §6.3).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

from mta.mail.dsnfields import report_orcpt
from mta.mail.headers import fold_header
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.layout import QueuedMessage

MAX_HEADER_BYTES = 64 * 1024
MAX_RETURN_BYTES = 1024 * 1024  # RET=FULL: a bigger message comes back as its header
ACTIONS = ("failed", "delayed", "delivered", "relayed")
SUCCESS_ACTIONS = ("delivered", "relayed")
MAX_FIELD_TEXT = 900  # keeps every report line below RFC 5322's 998 octets

# A failed recipient for the report: (recipient, RFC 3463 status, the reply that
# decided it, the host that gave it or "").
FailedRecipient = tuple[Recipient, str, str, str]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_BASIC = re.compile(r"([245])\d\d(?:[ -]|\Z)")


def enhanced_status(reply: str, default: str = "") -> str:
    """The RFC 3463 status carried by ``reply``, or one derived from its basic code.

    ``"550 5.1.1 no such user"`` → ``5.1.1``; ``"550 no such user"`` → ``5.0.0``;
    ``"4.4.1 connection refused"`` → ``4.4.1``; text without either → ``default``.
    An enhanced code whose class differs from the basic code's is ignored
    (RFC 3463 §2: the class must agree with the reply code).
    """
    text = reply.strip()
    basic = _BASIC.match(text)
    rest = text[basic.end():].lstrip() if basic else text
    enhanced = _ENHANCED.match(rest)
    if enhanced and (basic is None or basic.group(1) == enhanced.group(1)):
        return enhanced.group(0)
    if basic:
        return f"{basic.group(1)}.0.0"
    return default


def is_smtp_reply(reply: str) -> bool:
    return _BASIC.match(reply.strip()) is not None


def _one_line(text: str, limit: int = MAX_FIELD_TEXT) -> str:
    """Text for a header-like field: one line, printable, bounded."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:limit]


def _ascii_line(text: str, limit: int = MAX_FIELD_TEXT) -> str:
    """Like :func:`_one_line`, with anything non-ASCII as a backslash escape."""
    return _one_line(text, limit).encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _xtext_utf8(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: non-ASCII, controls, '+', '=' and '\\' as \\x{HEX}."""
    out = []
    for c in address:
        o = ord(c)
        if 0x21 <= o <= 0x7E and c not in "+=\\":
            out.append(c)
        else:
            out.append(f"\\x{{{o:X}}}")
    return "".join(out)


def typed_address(address: str) -> str:
    """``rfc822;addr`` for ASCII, ``utf-8;addr`` (xtext form) otherwise."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822;{address}"
    return f"utf-8;{_xtext_utf8(address)}"


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, UTC))


def final_recipient(rcpt: Recipient) -> str:
    """The address the report names as the final recipient (RFC 3464 §2.3.2)."""
    if rcpt.kind is RecipientKind.PIPE:
        return rcpt.original  # the address is a command; name the alias instead
    if rcpt.kind is RecipientKind.LOCAL and rcpt.mailbox:
        return rcpt.mailbox
    return rcpt.address


def read_headers(data_path: Path, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The header section of the queued message, CRLF-terminated lines, at most ``limit`` bytes.

    Reads line by line and stops at the empty line; a header longer than the
    limit is cut at a line boundary.  A missing file gives an empty result.
    """
    try:
        return QueuedMessage(data_path).read_headers(limit)
    except OSError:
        return b""


def read_whole(data_path: Path, limit: int = MAX_RETURN_BYTES) -> bytes | None:
    """The whole queued message if it is at most ``limit`` bytes, else None (also
    when it cannot be read)."""
    try:
        with QueuedMessage(data_path).open() as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _success_lines(envelope: Envelope, items: Sequence[FailedRecipient],
                   actions: Sequence[str]) -> list[str]:
    lines = ["Your message was successfully delivered to the destinations listed below.",
             "", f"Queue id: {envelope.id}", ""]
    for (rcpt, _status, reply, remote), action in zip(items, actions, strict=True):
        what = rcpt.original if rcpt.original == final_recipient(rcpt) else (
            f"{final_recipient(rcpt)} (from {rcpt.original})")
        lines.append(f"<{_one_line(what, 300)}>:")
        if action == "relayed":
            lines.append("    relayed to a mail system that does not send delivery notices;")
            lines.append("    you will get no further notice about this recipient.")
        else:
            lines.append("    delivered to the mailbox.")
        if remote:
            lines.append(f"    host {_one_line(remote, 255)} said:")
        if reply:
            lines.append(f"    {_one_line(reply)}")
        lines.append("")
    return lines


def _human_part(envelope: Envelope, failed: Sequence[FailedRecipient], hostname: str,
                action: str, retry_until: float | None, actions: Sequence[str],
                headers_only: bool) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action in SUCCESS_ACTIONS:
        return "\r\n".join(lines + _success_lines(envelope, failed, actions)) + "\r\n"
    if action == "delayed":
        lines += [
            "Your message could not be delivered yet to the recipients below.",
            "It is still in the queue and delivery will be retried"
            + (f" until {_date(retry_until)}." if retry_until else "."),
            "You do not need to send it again.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The details are below.",
        ]
    lines += ["", f"Queue id: {envelope.id}", ""]
    for rcpt, status, reply, remote in failed:
        what = rcpt.original if rcpt.original == final_recipient(rcpt) else (
            f"{final_recipient(rcpt)} (from {rcpt.original})")
        lines.append(f"<{_one_line(what, 300)}>:")
        if status.endswith(".4.7") and action == "failed":
            lines.append("    the message expired in the queue before it could be delivered.")
        if remote:
            lines.append(f"    host {_one_line(remote, 255)} said:")
        if reply:
            lines.append(f"    {_one_line(reply)}")
        lines.append("")
    if headers_only and envelope.binarymime:  # RET=FULL, but binary content
        lines += ["The message is binary (BODY=BINARYMIME) and cannot be returned whole;",
                  "only its header follows.", ""]
    elif headers_only:  # RET=FULL, but the message is too big to send back
        lines += ["The message was too large to be returned whole; only its header", "follows.", ""]
    return "\r\n".join(lines) + "\r\n"


def _status_part(envelope: Envelope, failed: Sequence[FailedRecipient], hostname: str,
                 action: str, now: float, retry_until: float | None,
                 actions: Sequence[str]) -> str:
    # Per-message fields, RFC 3464 §2.2.
    fields = [f"Reporting-MTA: dns; {_ascii_line(hostname, 255)}"]
    envid = envelope.envid or envelope.extra.get("envid")
    if isinstance(envid, str) and envid:
        fields.append(f"Original-Envelope-Id: {_ascii_line(envid, 100)}")
    fields.append(f"X-Queue-ID: {envelope.id}")
    fields.append(f"Arrival-Date: {_date(envelope.created)}")
    blocks = ["\r\n".join(fields)]
    # Per-recipient fields, RFC 3464 §2.3.
    for (rcpt, status, reply, remote), item_action in zip(failed, actions, strict=True):
        original = (_ascii_line(report_orcpt(rcpt.orcpt)) if rcpt.orcpt
                    else typed_address(rcpt.original))
        f = [
            f"Original-Recipient: {original}",
            f"Final-Recipient: {typed_address(final_recipient(rcpt))}",
            f"Action: {item_action}",
            f"Status: {status}",
        ]
        if remote:
            f.append(f"Remote-MTA: dns; {_ascii_line(remote, 255)}")
        if reply:
            kind = "smtp" if is_smtp_reply(reply) else "X-MTA"
            f.append(f"Diagnostic-Code: {kind}; {_ascii_line(reply)}")
        f.append(f"Last-Attempt-Date: {_date(rcpt.updated or now)}")
        if action == "delayed" and retry_until is not None:
            f.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\r\n".join(f))
    return "\r\n\r\n".join(blocks) + "\r\n"


def build_dsn(envelope: Envelope, failed: Sequence[FailedRecipient], hostname: str,
              data_path: Path, action: str = "failed", now: float | None = None, *,
              retry_until: float | None = None, max_header_bytes: int = MAX_HEADER_BYTES,
              actions: Sequence[str] | None = None,
              max_return_bytes: int = MAX_RETURN_BYTES,
              from_address: str | None = None) -> bytes:
    """The complete report for ``failed`` recipients of ``envelope`` as bytes (CRLF lines).

    ``action`` is ``failed`` (a bounce), ``delayed`` (a warning; give
    ``retry_until``, the time the queue gives up, for Will-Retry-Until), or
    ``delivered``/``relayed`` (a success report; ``actions`` may then give
    each recipient's own, either of the two).  The caller must not build one
    for the null sender (RFC 5321 §4.5.5).
    ``from_address`` is the From: field's address (``delivery.bounce_from``),
    by default ``MAILER-DAEMON@hostname``; the envelope sender stays ``<>``.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    if actions is None:
        actions = [action] * len(failed)
    elif len(actions) != len(failed) or (
            action in SUCCESS_ACTIONS and not set(actions) <= set(SUCCESS_ACTIONS)):
        raise ValueError("actions must name one success action per recipient")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    if envelope.sender == "":
        raise ValueError("never a DSN for the null sender (RFC 5321 §4.5.5)")
    now = time.time() if now is None else now
    boundary = f"=_{secrets.token_hex(12)}"
    if action == "delayed":
        subject = "Delayed Mail (still being retried)"
    elif action in SUCCESS_ACTIONS:
        subject = "Successful Mail Delivery Report"
    else:
        subject = "Undelivered Mail Returned to Sender"
    # A BINARYMIME message (RFC 3030 §3) is binary: it cannot go back inside this
    # 7bit/8bit report, so RET=FULL gives its header, as for a message too big.
    whole = (read_whole(data_path, max_return_bytes)
             if action == "failed" and envelope.ret == "FULL" and not envelope.binarymime else None)
    human = _human_part(envelope, failed, hostname, action, retry_until, actions,
                        headers_only=action == "failed" and envelope.ret == "FULL" and whole is None)
    report = _status_part(envelope, failed, hostname, action, now, retry_until, actions)
    headers = read_headers(data_path, max_header_bytes) if whole is None else b""
    from_address = from_address or f"MAILER-DAEMON@{hostname}"

    top = [
        f"From: Mail Delivery System <{_one_line(from_address, 300)}>",
        f"To: <{_one_line(envelope.sender, 300)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    charset, cte = ("us-ascii", "7bit") if human.isascii() else ("utf-8", "8bit")
    description = ("Delivered message headers" if action in SUCCESS_ACTIONS
                   else "Undelivered message headers")
    if whole is not None:  # RET=FULL (RFC 3461 §4.3; RFC 6533 §6.3 for message/global)
        description, headers = "Undelivered message", whole
        ascii_header = read_headers(data_path, max_header_bytes).isascii()
        headers_type = "message/rfc822" if ascii_header else "message/global"
        headers_cte = "7bit" if whole.isascii() else "8bit"
    elif headers.isascii():
        headers_type, headers_cte = "text/rfc822-headers", "7bit"
    else:
        headers_type, headers_cte = "message/global-headers", "8bit"  # RFC 6533 §6.3
    out = [
        "\r\n".join(fold_header(line) for line in top).encode("utf-8") + b"\r\n",
        f"--{boundary}\r\n".encode(),
        f"Content-Description: Notification\r\nContent-Type: text/plain; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode(),
        human.encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
        report.encode("ascii"),
        f"\r\n--{boundary}\r\n".encode(),
        f"Content-Description: {description}\r\nContent-Type: {headers_type}\r\n"
        f"Content-Transfer-Encoding: {headers_cte}\r\n\r\n".encode(),
        headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(out)
