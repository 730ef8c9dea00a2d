"""STARTTLS, implicit TLS and AUTH against the real server, with a trustme CA.

Covers: AUTH refused in clear text, STARTTLS injection (pipelined commands after
STARTTLS are discarded), session reset after TLS, second STARTTLS, AUTH PLAIN and
LOGIN in all their forms, failure delay and lock-out, submission rules, and
pipelined replies staying in order while the password check runs in a thread.
"""

from __future__ import annotations

import base64
import smtplib
import time
from email.message import EmailMessage

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.harness import PASSWORD, RawClient, client_tls_context, in_thread, start_mta


@pytest.fixture
def mta(tmp_path):
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def tls_client(port: int) -> RawClient:
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls()
    return c


@pytest_twisted.ensureDeferred
async def test_auth_refused_before_tls(mta):
    def run():
        c = RawClient(mta.port("submission"))
        c.read_reply()
        c.cmd("EHLO client.test")
        auth = c.cmd("AUTH PLAIN " + plain("alice@example.test", PASSWORD))
        mail = c.cmd("MAIL FROM:<alice@example.test>")
        c.close()
        return auth, mail

    auth, mail = await in_thread(run)
    assert auth[0] == 538 and "5.7.11" in auth[1]
    assert mail[0] == 530 and "STARTTLS" in mail[1]


@pytest_twisted.ensureDeferred
async def test_starttls_injection_is_discarded(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        # The classic injection: commands in the same packet as STARTTLS.
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
        ready = c.read_reply()
        c.starttls()
        # The session was reset: MAIL needs a new EHLO, and no injected reply arrives.
        first = c.cmd("MAIL FROM:<s@remote.test>")
        ehlo = c.cmd("EHLO client.test")
        again = c.cmd("STARTTLS")
        c.close()
        return ready, first, ehlo, again

    ready, first, ehlo, again = await in_thread(run)
    assert ready[0] == 220
    assert first[0] == 503 and "EHLO" in first[1]
    assert "STARTTLS" not in ehlo[1] and "AUTH PLAIN LOGIN" in ehlo[1]
    assert again[0] == 503 and "5.5.1" in again[1]


@pytest_twisted.ensureDeferred
async def test_tls_session_recorded_in_received_header(mta):
    def run():
        c = tls_client(mta.port())
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: tls\r\n\r\nhi\r\n.\r\n")
        reply = c.read_reply()
        c.close()
        return reply

    code, _ = await in_thread(run)
    assert code == 250
    (env,) = mta.queued()
    assert env.tls.startswith("TLSv1.")
    data = mta.message_bytes(env.id)
    assert b"with ESMTPS id" in data and b"(version=TLSv1." in data


@pytest.mark.parametrize("steps", [
    # AUTH PLAIN with an initial response
    [("AUTH PLAIN {plain}", 235)],
    # AUTH PLAIN without: empty challenge then the response
    [("AUTH PLAIN", 334), ("{plain}", 235)],
    # AUTH LOGIN, fully interactive
    [("AUTH LOGIN", 334), ("{user}", 334), ("{password}", 235)],
    # AUTH LOGIN with the user name as initial response
    [("AUTH LOGIN {user}", 334), ("{password}", 235)],
])
@pytest_twisted.ensureDeferred
async def test_auth_mechanisms(mta, steps):
    values = {"plain": plain("alice@example.test", PASSWORD), "user": b64("alice@example.test"),
              "password": b64(PASSWORD)}

    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        for send, expected in steps:
            code, text = c.cmd(send.format(**values))
            assert code == expected, text
        mail = c.cmd("MAIL FROM:<alice@example.test>")
        relay = c.cmd("RCPT TO:<friend@remote.test>")
        c.close()
        return mail, relay

    mail, relay = await in_thread(run)
    assert mail[0] == 250
    assert relay[0] == 250  # an authenticated user may relay


@pytest_twisted.ensureDeferred
async def test_auth_failures_delay_and_lockout(mta):
    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        t0 = time.monotonic()
        first = c.cmd("AUTH PLAIN " + plain("alice@example.test", "wrong"))
        elapsed = time.monotonic() - t0
        unknown = c.cmd("AUTH PLAIN " + plain("nobody@example.test", "wrong"))
        cancel = c.cmd("AUTH LOGIN")
        cancelled = c.cmd("*")
        empty = c.cmd("AUTH PLAIN =")
        closed = c.is_closed()
        c.close()
        return first, elapsed, unknown, cancel, cancelled, empty, closed

    first, elapsed, unknown, cancel, cancelled, empty, closed = await in_thread(run)
    assert first[0] == 535 and "5.7.8" in first[1]
    assert elapsed >= 0.05  # the configured constant delay
    assert unknown == first  # same answer whether or not the user exists
    assert cancel[0] == 334 and cancelled[0] == 501
    assert empty[0] == 421 and "4.7.0" in empty[1]  # third failure closes
    assert closed


@pytest_twisted.ensureDeferred
async def test_auth_errors(mta):
    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        out = [c.cmd("AUTH"), c.cmd("AUTH CRAM-MD5"), c.cmd("AUTH PLAIN !!!notbase64")]
        c.close()
        return out

    no_mech, unknown, bad = await in_thread(run)
    assert no_mech[0] == 504 and unknown[0] == 504
    assert bad[0] == 501 and "5.5.2" in bad[1]


@pytest_twisted.ensureDeferred
async def test_auth_plain_undecodable_base64_is_501_and_not_a_failure(mta):
    """RFC 4954 §4: a response that is not base64 gets 501 5.5.2, as initial response
    and as continuation line; it is no failed attempt (max_auth_failures is 3 here,
    so counting would have closed the session before the right password)."""
    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        out = [c.cmd("AUTH PLAIN !!!notbase64"),
               c.cmd("AUTH PLAIN AGFsaWNl="),  # wrong padding
               c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0\xff\xfe").decode()),  # not UTF-8
               c.cmd("AUTH PLAIN"), c.cmd("not base64 at all"),
               c.cmd("AUTH PLAIN"), c.cmd("AGFsaWNl=")]
        out.append(c.cmd("AUTH PLAIN " + plain("alice@example.test", PASSWORD)))
        c.close()
        return out

    out = await in_thread(run)
    codes = [code for code, _ in out]
    assert codes == [501, 501, 501, 334, 501, 334, 501, 235], out
    for code, text in out:
        if code == 501:
            assert "501 5.5.2 Cannot decode the authentication data" in text


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_answered_in_order_across_async_auth(mta):
    """AUTH runs its check in a thread; pipelined MAIL/RCPT must wait for it."""
    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        c.send(("AUTH PLAIN " + plain("alice@example.test", PASSWORD) + "\r\n"
                "MAIL FROM:<alice@example.test>\r\n"
                "RCPT TO:<bob@example.test>\r\n"
                "RCPT TO:<nobody@example.test>\r\n"
                "DATA\r\n").encode())
        replies = [c.read_reply()[0] for _ in range(5)]
        c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nMAIL FROM:<alice@example.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        replies += [c.read_reply()[0] for _ in range(4)]
        c.send(b"Subject: second\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies += [c.read_reply()[0] for _ in range(2)]
        c.close()
        return replies

    replies = await in_thread(run)
    assert replies == [235, 250, 250, 550, 354, 250, 250, 250, 354, 250, 221]
    assert len(mta.queued()) == 2


@pytest_twisted.ensureDeferred
async def test_smtplib_submission_with_starttls_and_auth(mta):
    def run():
        msg = EmailMessage()
        msg["From"] = "alice@example.test"
        msg["To"] = "friend@remote.test"
        msg["Bcc"] = "secret@remote.test"
        msg["Subject"] = "submitted"
        msg.set_content("hello\n")
        with smtplib.SMTP("127.0.0.1", mta.port("submission"), timeout=10) as s:
            s.starttls(context=client_tls_context())
            s.login("alice@example.test", PASSWORD)
            return s.send_message(msg, to_addrs=["friend@remote.test", "secret@remote.test"])

    refused = await in_thread(run)
    assert refused == {}
    (env,) = mta.queued()
    assert env.auth_user == "alice@example.test"
    assert sorted(r.address for r in env.recipients) == ["friend@remote.test", "secret@remote.test"]
    data = mta.message_bytes(env.id)
    headers = data.split(b"\r\n\r\n")[0]
    assert b"\nBcc:" not in headers and b"secret@" not in headers
    assert b"\r\nMessage-ID: <" in headers and b"\r\nDate: " in headers
    assert b"with ESMTPSA id" in headers


@pytest_twisted.ensureDeferred
async def test_implicit_tls_submissions_port(mta):
    def run():
        with smtplib.SMTP_SSL("127.0.0.1", mta.port("submissions"), timeout=10,
                              context=client_tls_context()) as s:
            code, text = s.ehlo("client.test")
            assert b"AUTH PLAIN LOGIN" in text and b"STARTTLS" not in text
            s.login("bob@example.test", PASSWORD)
            s.sendmail("bob@example.test", ["alice@example.test"], b"Subject: x\r\n\r\nhi\r\n")

    await in_thread(run)
    (env,) = mta.queued()
    assert env.auth_user == "bob@example.test"


@pytest_twisted.ensureDeferred
async def test_submission_requires_auth_after_tls(mta):
    def run():
        c = tls_client(mta.port("submission"))
        c.cmd("EHLO client.test")
        mail = c.cmd("MAIL FROM:<alice@example.test>")
        c.close()
        return mail

    code, text = await in_thread(run)
    assert code == 530 and "5.7.0" in text and "Authentication required" in text
