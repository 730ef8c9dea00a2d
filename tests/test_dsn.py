"""Tests for delivery status notifications: built as bytes, parsed back with ``email``."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from mta.queue.dsn import build_dsn, enhanced_status, read_headers, typed_address
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState

CREATED = 1_700_000_000.0
NOW = CREATED + 3600.0
HEADERS = (b"Received: from client.example.org by mx.example.com; Tue, 14 Nov 2023\r\n"
           b"From: Alice <alice@example.org>\r\nTo: bob@remote.example\r\n"
           b"Subject: quarterly report\r\nMessage-ID: <abc@example.org>\r\n")
BODY = b"SECRET BODY LINE\r\n" * 5000


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    p = tmp_path / "q.msg"
    p.write_bytes(HEADERS + b"\r\n" + BODY)
    return p


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def assert_crlf_only(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF in the report"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR in the report"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def failed_recipients() -> tuple[Recipient, Recipient, Recipient]:
    remote = Recipient(address="bob@remote.example", kind=RecipientKind.REMOTE,
                       original="bob@remote.example", state=RecipientState.FAILED,
                       updated=NOW - 60, attempts=1)
    local = Recipient(address="carol@example.com", kind=RecipientKind.LOCAL,
                      original="info@example.com", state=RecipientState.FAILED,
                      mailbox="carol@example.com", updated=NOW - 30)
    pipe = Recipient(address="/usr/bin/list-handler", kind=RecipientKind.PIPE,
                     original="list@example.com", state=RecipientState.FAILED, updated=NOW)
    return remote, local, pipe


def test_failed_dsn_fields(data_path: Path) -> None:
    remote, local, pipe = failed_recipients()
    env = Envelope(id="655bd0f0aabbccddeeff", sender="alice@example.org",
                   recipients=[remote, local, pipe], created=CREATED,
                   extra={"envid": "ENV-42"})
    data = build_dsn(env, [
        (remote, "5.1.1", "550 5.1.1 <bob@remote.example>: no such user", "mx1.remote.example"),
        (local, "5.2.2", "552 5.2.2 mailbox full", ""),
        (pipe, "5.3.0", "550 5.3.0 pipe command failed (exit 1): boom", ""),
    ], "mx.example.com", data_path, "failed", NOW)
    assert_crlf_only(data)
    msg = parse(data)

    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.com>"
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@example.org"]
    assert b"\r\nTo: <alice@example.org>\r\n" in data
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<\d+\.[0-9a-f]+@mx\.example\.com>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects

    human, report, original = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    for needle in ("bob@remote.example", "550 5.1.1 <bob@remote.example>: no such user",
                   "mx1.remote.example", "carol@example.com (from info@example.com)",
                   "552 5.2.2 mailbox full", "list@example.com", "boom"):
        assert needle in text
    assert "/usr/bin/list-handler" not in text

    assert report.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["X-Queue-ID"] == "655bd0f0aabbccddeeff"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == CREATED
    assert len(per_rcpt) == 3

    r1, r2, r3 = per_rcpt
    assert r1["Original-Recipient"] == "rfc822;bob@remote.example"
    assert r1["Final-Recipient"] == "rfc822;bob@remote.example"
    assert r1["Action"] == "failed"
    assert r1["Status"] == "5.1.1"
    assert r1["Remote-MTA"] == "dns; mx1.remote.example"
    assert r1["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.example>: no such user"
    assert parsedate_to_datetime(r1["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert r1["Will-Retry-Until"] is None

    assert r2["Original-Recipient"] == "rfc822;info@example.com"
    assert r2["Final-Recipient"] == "rfc822;carol@example.com"
    assert r2["Status"] == "5.2.2" and r2["Remote-MTA"] is None
    assert r2["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"

    assert r3["Final-Recipient"] == "rfc822;list@example.com"
    assert r3["Status"] == "5.3.0"

    assert original.get_content_type() == "text/rfc822-headers"
    raw_original = data.split(b"Content-Type: text/rfc822-headers\r\n", 1)[1]
    assert HEADERS in raw_original
    assert b"SECRET BODY" not in data
    assert len(data) < 10_000


def test_delayed_dsn(data_path: Path) -> None:
    rcpt = Recipient(address="bob@remote.example", kind=RecipientKind.REMOTE,
                     original="bob@remote.example", state=RecipientState.DEFERRED,
                     updated=NOW, last_reply="451 4.7.1 greylisted")
    env = Envelope(id="q2", sender="alice@example.org", recipients=[rcpt], created=CREATED)
    retry_until = CREATED + 5 * 86400
    data = build_dsn(env, [(rcpt, "4.7.1", rcpt.last_reply, "mx1.remote.example")],
                     "mx.example.com", data_path, "delayed", NOW, retry_until=retry_until)
    assert_crlf_only(data)
    msg = parse(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    human, report, _ = msg.iter_parts()
    assert "still in the queue" in human.get_content()
    assert "You do not need to send it again" in human.get_content()
    _, r = report.get_payload()
    assert r["Action"] == "delayed"
    assert r["Status"] == "4.7.1"
    assert parsedate_to_datetime(r["Will-Retry-Until"]).timestamp() == retry_until
    assert r["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted"


def test_expired_recipient_and_non_smtp_reason(data_path: Path) -> None:
    rcpt = Recipient(address="bob@remote.example", kind=RecipientKind.REMOTE,
                     original="bob@remote.example", state=RecipientState.FAILED)
    env = Envelope(id="q3", sender="alice@example.org", recipients=[rcpt], created=CREATED)
    reply = "4.4.7 message expired after 5.0 days in the queue; last reply: 4.4.1 connection refused"
    data = build_dsn(env, [(rcpt, "4.4.7", reply, "")], "mx.example.com", data_path, "failed", NOW)
    msg = parse(data)
    human, report, _ = msg.iter_parts()
    assert "expired in the queue" in human.get_content()
    _, r = report.get_payload()
    assert r["Action"] == "failed" and r["Status"] == "4.4.7"
    assert r["Diagnostic-Code"] == f"X-MTA; {reply}"
    assert parsedate_to_datetime(r["Last-Attempt-Date"]).timestamp() == NOW  # never attempted


def test_utf8_addresses_and_headers(tmp_path: Path) -> None:
    p = tmp_path / "q.msg"
    p.write_bytes("Subject: Grüße\r\nFrom: δοκιμή@παράδειγμα.example\r\n\r\nbody\r\n".encode())
    rcpt = Recipient(address="用户@example.com", kind=RecipientKind.REMOTE,
                     original="用户+x=y@example.com", state=RecipientState.FAILED)
    env = Envelope(id="q4", sender="δοκιμή@example.org", recipients=[rcpt], created=CREATED,
                   smtputf8=True)
    data = build_dsn(env, [(rcpt, "5.1.1", "550 5.1.1 unknown user", "")], "mx.example.com",
                     p, "failed", NOW)
    assert_crlf_only(data)
    # RFC 6532 headers are UTF-8: parse the text, as the email package expects for them.
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert [a.addr_spec for a in msg["To"].addresses] == ["δοκιμή@example.org"]
    human, report, original = parse(data).iter_parts()  # 8-bit bodies: parse the bytes
    assert "用户@example.com" in human.get_content()
    _, r = report.get_payload()
    # RFC 6533 §3: utf-8-addr-xtext, with '+' and '=' escaped as well
    assert r["Final-Recipient"] == "utf-8;\\x{7528}\\x{6237}@example.com"
    assert r["Original-Recipient"] == "utf-8;\\x{7528}\\x{6237}\\x{2B}x\\x{3D}y@example.com"
    report_bytes = data.split(b"message/delivery-status\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    assert report_bytes.isascii()
    assert original.get_content_type() == "message/global-headers"
    assert "Subject: Grüße".encode() in data


def test_typed_address() -> None:
    assert typed_address("a@b.example") == "rfc822;a@b.example"
    assert typed_address("ü@b.example") == "utf-8;\\x{FC}@b.example"


def test_header_part_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "q.msg"
    lines = [f"X-Filler-{i}: {'v' * 80}\r\n".encode() for i in range(200)]
    p.write_bytes(b"".join(lines) + b"\r\nbody\r\n")
    got = read_headers(p, limit=1000)
    assert got == b"".join(lines)[: len(got)]
    assert 900 < len(got) <= 1000 and got.endswith(b"\r\n")
    assert read_headers(tmp_path / "missing.msg") == b""
    p.write_bytes(b"Subject: lf only\nFrom: x@y\n\nbody\n")
    assert read_headers(p) == b"Subject: lf only\r\nFrom: x@y\r\n"


def test_no_dsn_for_null_sender_or_nobody(data_path: Path) -> None:
    rcpt, _, _ = failed_recipients()
    with pytest.raises(ValueError):
        build_dsn(Envelope(id="q5", sender="", recipients=[rcpt], created=CREATED),
                  [(rcpt, "5.0.0", "550 no", "")], "mx.example.com", data_path)
    with pytest.raises(ValueError):
        build_dsn(Envelope(id="q5", sender="a@b.example", recipients=[rcpt], created=CREATED),
                  [], "mx.example.com", data_path)


@pytest.mark.parametrize(("reply", "status"), [
    ("550 5.1.1 <x@y>: Recipient address rejected", "5.1.1"),
    ("550-5.7.1 first line", "5.7.1"),
    ("550 Mailbox unavailable", "5.0.0"),
    ("451 try again later", "4.0.0"),
    ("421", "4.0.0"),
    ("550 4.1.1 mismatched class", "5.0.0"),  # RFC 3463: the class must agree
    ("4.4.1 connection refused", "4.4.1"),
    ("connection refused", ""),
    ("250 2.0.0 Ok: queued as ABC", "2.0.0"),
    ("550 5.1.10 long subject", "5.1.10"),
])
def test_enhanced_status(reply: str, status: str) -> None:
    assert enhanced_status(reply) == status


def test_ret_full_returns_the_message_up_to_the_bound(data_path: Path) -> None:
    remote, _, _ = failed_recipients()
    env = Envelope(id="q6", sender="alice@example.org", recipients=[remote], created=CREATED,
                   ret="FULL", dsn=True)
    items = [(remote, "5.1.1", "550 5.1.1 unknown user", "")]
    data = build_dsn(env, items, "mx.example.com", data_path, "failed", NOW)
    assert_crlf_only(data)
    returned = list(parse(data).iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered message"
    (original,) = returned.get_payload()
    assert original["Subject"] == "quarterly report"
    assert original.get_payload().encode() == BODY
    # Larger than the bound: the header only, and the text says why.
    data = build_dsn(env, items, "mx.example.com", data_path, "failed", NOW,
                     max_return_bytes=len(BODY) // 2)
    human, _, returned = parse(data).iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"SECRET BODY LINE" not in data
    assert "too large to be returned whole" in human.get_content()
    # A BINARYMIME message cannot be returned inside the report: its header only.
    env.binarymime = True
    data = build_dsn(env, items, "mx.example.com", data_path, "failed", NOW)
    human, _, returned = parse(data).iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"SECRET BODY LINE" not in data
    assert "binary (BODY=BINARYMIME) and cannot be returned whole" in human.get_content()
    env.binarymime = False
    # A delay warning carries the header whatever RET says (RFC 3461 §4.3).
    data = build_dsn(env, [(remote, "4.2.1", "451 later", "")], "mx.example.com", data_path,
                     "delayed", NOW)
    assert list(parse(data).iter_parts())[2].get_content_type() == "text/rfc822-headers"
