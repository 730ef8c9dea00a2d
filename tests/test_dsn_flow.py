"""The DSN extension end to end (RFC 3461 §5.2, RFC 3464): the whole MTA in this
process (server, queue runner, the real couriers), a smarthost that is a
tests/sink.py sink on loopback, and the notices arriving in the sender's
Maildir, parsed with the email package.
"""

from __future__ import annotations

import email
import time
from email import policy
from email.message import Message
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.harness import RawClient, in_thread, message_files, start_mta
from tests.sink import start_sink

SENDER = "alice@example.test"
BODY_LINE = "the body of the message"
MESSAGE = f"Subject: dsn flow\r\nFrom: {SENDER}\r\nMessage-ID: <flow@example.test>\r\n\r\n{BODY_LINE}\r\n."


async def start(tmp_path: Path, sink_port: int, **delivery):
    return await start_mta(tmp_path, runner=None, extra={
        "relay_networks": ["127.0.0.0/8"],
        "delivery": {"smarthosts": [f"127.0.0.1:{sink_port}"], "smarthost_tls": "none",
                     "retry_schedule": [1], "retry_jitter": 0, **delivery}})


def send(port: int, mail: str, rcpts: list[str]) -> None:
    """One message over a real connection; every reply must be the expected one."""
    c = RawClient(port)
    try:
        assert c.read_reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd(mail)[0] == 250
        for line in rcpts:
            code, text = c.cmd(line)
            assert code == 250, text
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(MESSAGE)[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()


def mailbox(root: Path, user: str = "alice") -> list[Message]:
    new = root / "var" / "mail" / "example.test" / user / "new"
    files = sorted(new.iterdir()) if new.exists() else []
    return [email.message_from_bytes(p.read_bytes(), policy=policy.compat32) for p in files]


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


async def queue_empty(running) -> None:
    await wait_for(lambda: not message_files(running.store.msg_dir), what="the queue to empty")


def report(notice: Message) -> tuple[Message, list[Message], Message]:
    """(per-message fields, per-recipient field blocks, the returned-message part)."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    human, status, returned = notice.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return blocks[0], blocks[1:], returned


# --- passing the parameters on -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_parameters_passed_to_a_next_hop_offering_dsn_and_no_notice_of_ours(tmp_path):
    sink = await start_sink(dsn=True)
    running = await start(tmp_path, sink.port)
    try:
        await in_thread(send, running.port(), f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=id+2B1", [
            "RCPT TO:<one@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2Bx@remote.test",
            "RCPT TO:<two@remote.test>",
            "RCPT TO:<three@remote.test> NOTIFY=DELAY",
        ])
        await wait_for(lambda: sink.messages, what="the relay")
        await queue_empty(running)
        await deferLater(reactor, 0.3, lambda: None)  # time for a notice that must not come
    finally:
        await running.stop()
        await sink.stop()
    (session,) = [s for s in sink.sessions if any(c.startswith("MAIL") for c in s.commands)]
    mail = [c for c in session.commands if c.startswith("MAIL")]
    rcpts = [c for c in session.commands if c.startswith("RCPT")]
    assert len(mail) == 1 and mail[0].startswith(f"MAIL FROM:<{SENDER}> SIZE=")
    assert mail[0].endswith(" RET=HDRS ENVID=id+2B1")
    assert rcpts == [
        "RCPT TO:<one@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2Bx@remote.test",
        "RCPT TO:<two@remote.test>",
        # No ORCPT given: the RCPT address we received (RFC 3461 §4.2).
        "RCPT TO:<three@remote.test> NOTIFY=DELAY ORCPT=rfc822;three@remote.test",
    ]
    assert mailbox(tmp_path) == []  # the next hop owns the success notice


@pytest_twisted.ensureDeferred
async def test_relayed_and_delivered_notice_when_the_next_hop_has_no_dsn(tmp_path):
    sink = await start_sink()  # no DSN offered
    running = await start(tmp_path, sink.port)
    try:
        await in_thread(send, running.port(), f"MAIL FROM:<{SENDER}> RET=FULL ENVID=env-42", [
            "RCPT TO:<one@remote.test> NOTIFY=SUCCESS ORCPT=rfc822;first+2Bx@remote.test",
            "RCPT TO:<two@remote.test> NOTIFY=FAILURE",
            "RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE",
        ])
        await wait_for(lambda: mailbox(tmp_path), what="the success notice")
        await queue_empty(running)
    finally:
        await running.stop()
        await sink.stop()
    (relayed,) = sink.messages
    rcpts = [c for s in sink.sessions for c in s.commands if c.startswith(("MAIL", "RCPT"))]
    assert rcpts[0].startswith(f"MAIL FROM:<{SENDER}> SIZE=") and "RET" not in rcpts[0]
    assert "ENVID" not in rcpts[0]
    assert rcpts[1:] == ["RCPT TO:<one@remote.test>", "RCPT TO:<two@remote.test>"]
    (notice,) = mailbox(tmp_path)
    assert notice["Subject"] == "Successful Mail Delivery Report"
    assert notice["To"] == f"<{SENDER}>"
    per_message, per_rcpt, returned = report(notice)
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    got = {b["Final-Recipient"]: (b["Action"], b["Status"], b["Original-Recipient"])
           for b in per_rcpt}
    assert got == {
        "rfc822;one@remote.test": ("relayed", "2.0.0", "rfc822;first+x@remote.test"),
        "rfc822;bob@example.test": ("delivered", "2.0.0", "rfc822;bob@example.test"),
    }
    # Success reports carry the header only, whatever RET said (RFC 3461 §4.3).
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: dsn flow" in returned.get_payload()
    assert BODY_LINE not in returned.get_payload()


@pytest_twisted.ensureDeferred
async def test_delivered_notice_for_a_local_maildir(tmp_path):
    sink = await start_sink()
    running = await start(tmp_path, sink.port)
    try:
        await in_thread(send, running.port(), f"MAIL FROM:<{SENDER}>", [
            "RCPT TO:<bob@example.test> NOTIFY=SUCCESS",
        ])
        await wait_for(lambda: mailbox(tmp_path), what="the success notice")
        await queue_empty(running)
    finally:
        await running.stop()
        await sink.stop()
    assert len(mailbox(tmp_path, "bob")) == 1  # the message itself
    (notice,) = mailbox(tmp_path)
    per_message, (block,), _ = report(notice)
    assert "Original-Envelope-Id" not in per_message
    assert (block["Action"], block["Final-Recipient"]) == ("delivered", "rfc822;bob@example.test")
    assert notice.get_payload()[0].get_payload().count("delivered to the mailbox") == 1


# --- failures: NOTIFY and RET ----------------------------------------------------------------


@pytest.mark.parametrize("ret", ["HDRS", "FULL"])
@pytest_twisted.ensureDeferred
async def test_bounce_honours_notify_and_ret(tmp_path, ret):
    sink = await start_sink(replies={"RCPT:never@remote.test": "550 5.1.1 no such user",
                                     "RCPT:fail@remote.test": "550 5.1.1 no such user"})
    running = await start(tmp_path, sink.port)
    try:
        await in_thread(send, running.port(), f"MAIL FROM:<{SENDER}> RET={ret} ENVID=QQ+3D1", [
            "RCPT TO:<never@remote.test> NOTIFY=NEVER",
            "RCPT TO:<fail@remote.test> NOTIFY=FAILURE ORCPT=rfc822;list+2Bfail@remote.test",
        ])
        await wait_for(lambda: mailbox(tmp_path), what="the bounce")
        await queue_empty(running)
    finally:
        await running.stop()
        await sink.stop()
    (bounce,) = mailbox(tmp_path)  # one bounce, and only for the recipient that asked
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, (block,), returned = report(bounce)
    assert per_message["Original-Envelope-Id"] == "QQ=1"
    assert block["Final-Recipient"] == "rfc822;fail@remote.test"
    assert block["Original-Recipient"] == "rfc822;list+fail@remote.test"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    assert "never@remote.test" not in bounce.as_string()
    if ret == "HDRS":
        assert returned.get_content_type() == "text/rfc822-headers"
        assert "Subject: dsn flow" in returned.get_payload()
        assert BODY_LINE not in returned.get_payload()
    else:
        assert returned.get_content_type() == "message/rfc822"
        (original,) = returned.get_payload()
        assert original["Subject"] == "dsn flow"
        assert original.get_payload().strip() == BODY_LINE


# --- delays ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delay_notice_only_for_recipients_that_want_one(tmp_path):
    sink = await start_sink(replies={f"RCPT:{u}@remote.test": "450 4.2.1 try later"
                                     for u in ("delay", "failure", "plain")})
    # delay_warning configured: recipients without NOTIFY are warned as before.
    running = await start(tmp_path, sink.port, delay_warning=1)
    try:
        await in_thread(send, running.port(), f"MAIL FROM:<{SENDER}>", [
            "RCPT TO:<delay@remote.test> NOTIFY=DELAY,FAILURE",
            "RCPT TO:<failure@remote.test> NOTIFY=FAILURE",
            "RCPT TO:<plain@remote.test>",
        ])
        await wait_for(lambda: mailbox(tmp_path), what="the delay notice")
        (env,) = [e for e in running.queued() if e.sender]  # the notice may be there too
        assert env.delay_warned
    finally:
        await running.stop()
        await sink.stop()
    (notice,) = mailbox(tmp_path)
    assert notice["Subject"] == "Delayed Mail (still being retried)"
    _, blocks, returned = report(notice)
    assert {b["Final-Recipient"]: b["Action"] for b in blocks} == {
        "rfc822;delay@remote.test": "delayed", "rfc822;plain@remote.test": "delayed"}
    assert returned.get_content_type() == "text/rfc822-headers"
