"""Byte-exact SMTP dialogs against a real server on loopback (raw sockets and smtplib).

Each test speaks to the server as a client would and checks the replies and
what ended up in the queue.
"""

from __future__ import annotations

import base64
import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from mta.queue.layout import read_embedded_envelope
from tests.harness import PASSWORD, RawClient, in_thread, message_files, start_mta


@pytest.fixture
def mta(tmp_path):
    running = pytest_twisted.blockon(Deferred.fromCoroutine(_start(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(_stop(running)))


async def _start(tmp_path, **kw):
    return await start_mta(tmp_path, **kw)


async def _stop(running):
    await running.stop()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def dialog(port, script):
    """Run a list of (send, expected code) steps on a raw connection; returns replies."""
    c = RawClient(port)
    replies = [c.read_reply()]
    try:
        for send, expected in script:
            code, text = c.cmd(send)
            replies.append((code, text))
            assert code == expected, f"{send!r}: expected {expected}, got {text!r}"
    finally:
        c.close()
    return replies


# --- greeting, EHLO, simple verbs -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ehlo_advertises_extensions_and_no_auth_in_clear(mta):
    def run():
        c = RawClient(mta.port())
        code, greeting = c.read_reply()
        assert code == 220 and "mx.example.test" in greeting
        code, text = c.cmd("EHLO client.test")
        c.close()
        return code, text

    code, text = await in_thread(run)
    assert code == 250
    for ext in ("PIPELINING", "SIZE ", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"):
        assert ext in text
    assert "AUTH" not in text  # only under TLS


@pytest_twisted.ensureDeferred
async def test_simple_verbs(mta):
    replies = await in_thread(dialog, mta.port(), [
        ("HELO client.test", 250),
        ("NOOP", 250),
        ("HELP", 214),
        ("VRFY alice", 252),
        ("VRFY nosuchuser", 252),
        ("EXPN team", 502),
        ("RSET", 250),
        ("FOO bar", 500),
        ("QUIT", 221),
    ])
    assert "2.0.0" in replies[2][1]
    assert replies[4][1] == replies[5][1]  # VRFY reveals nothing about existence
    assert "5.5.1" in replies[8][1]


@pytest_twisted.ensureDeferred
async def test_helo_needs_argument_and_mail_needs_helo(mta):
    await in_thread(dialog, mta.port(), [
        ("MAIL FROM:<a@b.test>", 503),
        ("EHLO", 501),
        ("EHLO client.test", 250),
        ("RCPT TO:<alice@example.test>", 503),
        ("DATA", 503),
    ])


# --- a complete transaction and what lands on disk ------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_is_queued_with_received_header(mta):
    body = b"Subject: hi\r\nFrom: a@remote.test\r\n\r\nline 1\r\n..dot line\r\nlast\r\n"

    def run():
        c = RawClient(mta.port())
        c.read_reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\n")
        code, text = c.read_reply()
        c.cmd("QUIT")
        c.close()
        return code, text

    code, text = await in_thread(run)
    assert code == 250 and "2.0.0" in text
    queue_id = text.split()[-1]
    (envelope,) = mta.queued()
    assert envelope.id == queue_id
    assert envelope.sender == "sender@remote.test"
    assert [(r.address, str(r.kind), str(r.state)) for r in envelope.recipients] == [
        ("alice@example.test", "local", "pending")]
    data = mta.message_bytes(queue_id)
    assert data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.example.test with ESMTP id "
                           + queue_id.encode())
    assert b"\tfor <alice@example.test>; " in data
    # Body stored byte-exact, dot-unstuffed.
    assert data.endswith(b"\r\n" + b"Subject: hi\r\nFrom: a@remote.test\r\n\r\nline 1\r\n.dot line\r\nlast\r\n")
    # One file on disk: the envelope (readable JSON) in its header, then the message.
    raw = mta.store.data_path(queue_id).read_bytes()
    on_disk = json.loads(read_embedded_envelope(mta.store.data_path(queue_id)))
    assert raw.startswith(b"mta-envelope ") and raw.endswith(data)
    assert on_disk["recipients"][0]["original"] == "alice@example.test"
    assert on_disk["size"] == len(data)
    assert message_files(mta.store.msg_dir) == [f"{queue_id}.msg"]
    assert list(mta.store.tmp_dir.iterdir()) == []


def greeted_client(port: int) -> RawClient:
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    return c


def start_data(c: RawClient, rcpt: str = "alice@example.test") -> None:
    """MAIL, RCPT and DATA up to the 354."""
    c.cmd("MAIL FROM:<sender@remote.test>")
    c.cmd(f"RCPT TO:<{rcpt}>")
    assert c.cmd("DATA")[0] == 354


@pytest_twisted.ensureDeferred
async def test_queued_is_logged_after_the_250_even_for_a_client_already_gone(mta):
    """The 'queued' line is written once the 250 has gone out; a client that hung
    up right after its final dot still gets its message queued and logged."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        def run():
            c = greeted_client(mta.port())
            start_data(c)
            c.send(b"Subject: hung up\r\n\r\nbye\r\n.\r\n")
            c.close()

        await in_thread(run)
        for _ in range(200):  # bounded: up to 2 s for the commit
            if any(e.get("event") == "queued" for e in events):
                break
            await deferLater(reactor, 0.01, lambda: None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (envelope,) = mta.queued()
    [queued] = [e for e in events if e.get("event") == "queued"]
    assert queued["queue_id"] == envelope.id and queued["rcpts"] == "alice@example.test"


@pytest_twisted.ensureDeferred
async def test_the_writer_made_after_354_belongs_to_its_own_transaction(mta):
    """The queue writer and Received header made while the client sends the message
    (after the 354) are dropped with a refused message or a client gone; the next
    transaction gets its own id and trace."""
    def run():
        c = greeted_client(mta.port())
        start_data(c)
        c.send(b"Subject: bare\nLF\r\n.\r\n")  # refused after the dot (bare LF)
        refused = c.read_reply()[0]
        start_data(c, "bob@example.test")
        c.send(b"Subject: second\r\n\r\nfor bob\r\n.\r\n")
        accepted = c.read_reply()
        start_data(c)
        c.send(b"Subject: half a message\r\n")
        c.close()  # gone in the middle of the message
        return refused, accepted

    refused, (code, text) = await in_thread(run)
    assert refused == 550 and code == 250
    for _ in range(100):  # bounded: up to 1 s for the server to see the close
        if not mta.context.sessions:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert not mta.context.sessions
    (envelope,) = mta.queued()
    assert envelope.id == text.split()[-1]
    [received] = [line for line in mta.message_bytes(envelope.id).split(b"\r\n\t")[:4]
                  if line.startswith(b"for ")]
    assert received.startswith(b"for <bob@example.test>; ")
    assert f"ESMTP id {envelope.id}\r\n".encode() in mta.message_bytes(envelope.id)
    assert list(mta.store.tmp_dir.iterdir()) == []
    assert message_files(mta.store.msg_dir) == [f"{envelope.id}.msg"]


@pytest_twisted.ensureDeferred
async def test_null_sender_and_postmaster(mta):
    await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<>", 250),
        ("RCPT TO:<postmaster@example.test>", 250),
        ("RCPT TO:<Postmaster>", 250),
        ("RCPT TO:<POSTMASTER@EXAMPLE.TEST>", 250),
    ])


@pytest_twisted.ensureDeferred
async def test_unknown_local_user_rejected_at_rcpt(mta):
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<sender@remote.test>", 250),
        ("RCPT TO:<nobody@example.test>", 550),
        ("RCPT TO:<Alice@Example.Test>", 250),
    ])
    assert "5.1.1" in replies[3][1]


# --- relay protection -------------------------------------------------------------------


@pytest.mark.parametrize("rcpt,code", [
    ("<friend@remote.test>", 554),
    ("<friend%remote.test@example.test>", 550),
    ('<"friend@remote.test"@example.test>', 550),
    ("<@example.test:friend@remote.test>", 554),
    ("<friend!remote.test@example.test>", 550),
    ("<friend@remote.test@example.test>", 501),
])
@pytest_twisted.ensureDeferred
async def test_no_open_relay(mta, rcpt, code):
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<sender@remote.test>", 250),
        (f"RCPT TO:{rcpt}", code),
        ("DATA", 554),
    ])
    if code == 554:
        assert "5.7.1" in replies[3][1] and "Relay access denied" in replies[3][1]
    assert mta.queued() == []


# --- limits -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_too_many_recipients(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"max_recipients": 2}})
    try:
        replies = await in_thread(dialog, mta.port(), [
            ("EHLO client.test", 250),
            ("MAIL FROM:<s@remote.test>", 250),
            ("RCPT TO:<alice@example.test>", 250),
            ("RCPT TO:<bob@example.test>", 250),
            ("RCPT TO:<info@example.test>", 452),
        ])
        assert "4.5.3" in replies[-1][1]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_size_limit_declared_and_actual(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"max_message_size": 1000}})
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            code, text = c.cmd("EHLO client.test")
            assert "SIZE 1000" in text
            assert c.cmd("MAIL FROM:<s@remote.test> SIZE=5000")[0] == 552
            assert c.cmd("MAIL FROM:<s@remote.test> SIZE=500")[0] == 250
            assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 50 + b".\r\n")
            result = c.read_reply()
            after = c.cmd("NOOP")
            c.close()
            return result, after

        (code, text), after = await in_thread(run)
        assert code == 552 and "5.3.4" in text
        assert after[0] == 250  # the session continues
        assert mta.queued() == []
    finally:
        await mta.stop()


@pytest.mark.parametrize("hops,code", [(50, 250), (51, 554)])
@pytest_twisted.ensureDeferred
async def test_loop_detection(mta, hops, code):
    """More than limits.max_received_headers (50) Received headers: a mail loop."""
    headers = b"".join(b"Received: from hop%d.test by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                       for i in range(hops))

    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        c.cmd("DATA")
        c.send(headers + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        result = c.read_reply()
        c.close()
        return result

    got, text = await in_thread(run)
    assert got == code
    if code == 554:
        assert "5.4.6" in text and mta.queued() == []
    else:
        assert len(mta.queued()) == 1


@pytest_twisted.ensureDeferred
async def test_errors_per_session_close_connection(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"max_errors": 3}})
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("BAD1")
            c.cmd("BAD2")
            c.send(b"BAD3\r\n")
            first = c.read_reply()
            second = c.read_reply()
            closed = c.is_closed()
            c.close()
            return first, second, closed

        first, second, closed = await in_thread(run)
        assert first[0] == 500
        assert second[0] == 421 and "4.7.0" in second[1]
        assert closed
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_connections_per_ip_limited(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"max_connections_per_ip": 2}})
    try:
        def run():
            a, b = RawClient(mta.port()), RawClient(mta.port())
            a.read_reply()
            b.read_reply()
            c = RawClient(mta.port())
            third = c.read_reply()
            closed = c.is_closed()
            for x in (a, b, c):
                x.close()
            return third, closed

        third, closed = await in_thread(run)
        assert third[0] == 421 and "4.7.0" in third[1]
        assert closed
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_command_timeout(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"command_timeout": 0.3}})
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            reply = c.read_reply()  # sent by the server after the timeout
            closed = c.is_closed()
            c.close()
            return reply, closed

        (code, text), closed = await in_thread(run)
        assert code == 421 and "4.4.2" in text
        assert closed
    finally:
        await mta.stop()


@pytest.mark.parametrize("verb", ["GET / HTTP/1.1", "POST /x HTTP/1.0", "CONNECT example.com:443 HTTP/1.1"])
@pytest_twisted.ensureDeferred
async def test_http_verbs_rejected_and_closed(mta, verb):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        reply = c.cmd(verb)
        closed = c.is_closed()
        c.close()
        return reply, closed

    (code, _), closed = await in_thread(run)
    assert code == 554
    assert closed


# --- over-long and malformed input ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_mebibyte_command_line(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.send(b"MAIL FROM:<" + b"a" * (1024 * 1024) + b"@remote.test>\r\n")
        too_long = c.read_reply()
        after = c.cmd("MAIL FROM:<s@remote.test>")
        c.close()
        return too_long, after

    too_long, after = await in_thread(run)
    assert too_long[0] == 500 and "5.5.2" in too_long[1]
    assert after[0] == 250  # still in sync


@pytest_twisted.ensureDeferred
async def test_input_without_crlf_is_bounded(mta):
    """8 MiB without a line end: discarded as it streams, then one 500 reply."""
    def run():
        c = RawClient(mta.port(), timeout=60)
        c.read_reply()
        chunk = b"x" * 65536
        for _ in range(128):
            c.send(chunk)
        c.send(b"\r\n")
        reply = c.read_reply()
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    reply, after = await in_thread(run)
    assert reply[0] == 500
    assert after[0] == 250
    for session in mta.context.sessions:
        assert len(session._buf) < 4096


@pytest_twisted.ensureDeferred
async def test_bare_lf_in_command_refused(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.send(b"EHLO client.test\nMAIL FROM:<s@remote.test>\r\n")
        reply = c.read_reply()
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    reply, after = await in_thread(run)
    assert reply[0] == 500 and "5.5.2" in reply[1]
    assert after[0] == 250


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_rejected_without_desync(mta):
    """A 20 KiB line in DATA: the rest of the body is never run as commands."""
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\n" + b"y" * 20000 + b"\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n"
               b"RCPT TO:<bob@example.test>\r\n.\r\n")
        reply = c.read_reply()
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    reply, after = await in_thread(run)
    assert reply[0] == 550 and "5.6.0" in reply[1] and "998" in reply[1]
    assert after[0] == 250
    assert mta.queued() == []


SMUGGLING = [
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
]


@pytest.mark.parametrize("terminator", SMUGGLING)
@pytest_twisted.ensureDeferred
async def test_smtp_smuggling_is_not_a_message_end(mta, terminator):
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n")

    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: innocent\r\n\r\nhello" + terminator + smuggled + b".\r\n")
        reply = c.read_reply()
        # Exactly one reply: nothing of the smuggled part was run as a command.
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    reply, after = await in_thread(run)
    assert reply[0] == 550 and "5.6.0" in reply[1]
    assert after == (250, "250 2.0.0 Ok")
    assert mta.queued() == []


# --- addresses and parameters ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mail_parameters(mta):
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test> FOO=BAR", 555),
        ("MAIL FROM:<s@remote.test> BODY=9BIT", 501),
        ("MAIL FROM:<s@remote.test> SIZE=abc", 501),
        ("MAIL FROM:<s@remote.test> SMTPUTF8=yes", 501),
        ("MAIL FROM:<s@remote.test> BODY=8BITMIME SIZE=100 SMTPUTF8", 250),
        ("RCPT TO:<alice@example.test> XFOO=1", 555),
    ])
    assert "5.5.4" in replies[2][1]


@pytest_twisted.ensureDeferred
async def test_helo_session_refuses_parameters(mta):
    await in_thread(dialog, mta.port(), [
        ("HELO client.test", 250),
        ("MAIL FROM:<s@remote.test> BODY=8BITMIME", 555),
    ])


@pytest_twisted.ensureDeferred
async def test_bad_addresses(mta):
    long_local = "a" * 250
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test", 501),
        ("MAIL FROM:<s@xn--.test>", 501),
        (f"MAIL FROM:<{long_local}@remote.test>", 501),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<alice@xn--zz.test>", 501),
        ("RCPT TO:<alice@-bad-.test>", 501),
        ("RCPT TO:<ñandú@example.test>", 501),  # UTF-8 without SMTPUTF8
    ])
    assert "5.1.8" in replies[3][1]
    assert "5.1.2" in replies[6][1]


@pytest_twisted.ensureDeferred
async def test_paths_without_angle_brackets_are_accepted_by_default(mta):
    """Postfix's strict_rfc821_envelopes = no: a bare address is the first word
    after the colon; parameters still follow it, <> is still the null sender."""
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:", 501),
        ("MAIL FROM: ", 501),
        ("MAIL FROM: s@remote.test SIZE=100", 250),
        ("RCPT TO:", 501),
        ("RCPT TO: alice@example.test", 250),
        ("RCPT TO:bob@example.test NOTIFY=BOGUS", 501),  # the parameter is read
        ("RCPT TO:bob@example.test", 250),
        ("RCPT TO: \"a b\"@example.test", 501),  # a quoted space needs the brackets
        ("RCPT TO: postmaster", 250),
        ("RSET", 250),
        ("MAIL FROM: s@remote.test SIZE=999999999999", 552),
        ("MAIL FROM: <>", 250),
        ("RCPT TO: alice@example.test", 250),
        ("DATA", 354),
        ("Subject: bare\r\n\r\nhi\r\n.", 250),
    ])
    assert "5.5.4" in replies[2][1] and "5.5.4" in replies[5][1]
    (env,) = mta.queued()
    assert env.sender == ""
    assert [r.address for r in env.recipients] == ["alice@example.test"]


@pytest_twisted.ensureDeferred
async def test_strict_envelopes_require_angle_brackets(tmp_path):
    running = await start_mta(tmp_path, extra={"strict_envelopes": True})
    try:
        await in_thread(dialog, running.port(), [
            ("EHLO client.test", 250),
            ("MAIL FROM: s@remote.test", 501),
            ("MAIL FROM:s@remote.test SIZE=100", 501),
            ("MAIL FROM: <s@remote.test> SIZE=100", 250),
            ("RCPT TO: alice@example.test", 501),
            ("RCPT TO:<alice@example.test>", 250),
        ])
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_smtputf8_addresses_normalised(tmp_path):
    mta = await start_mta(tmp_path, users={"ñandú": PASSWORD})
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<josé@bücher.test> SMTPUTF8")[0] == 250
            assert c.cmd("RCPT TO:<ÑANDÚ@example.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send("Subject: ¡hola!\r\n\r\ncañón\r\n.\r\n".encode())
            reply = c.read_reply()
            c.close()
            return reply

        code, _ = await in_thread(run)
        assert code == 250
        (env,) = mta.queued()
        assert env.sender == "josé@xn--bcher-kva.test"
        assert env.smtputf8 and env.body_8bit
        assert env.recipients[0].mailbox == "ñandú@example.test"
        data = mta.message_bytes(env.id)
        assert b"with UTF8SMTP id" in data
        assert "cañón".encode() in data
    finally:
        await mta.stop()


# --- aliases ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_alias_expansion_in_envelope(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        assert c.cmd("RCPT TO:<team@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<info@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<outside@example.test>")[0] == 250
        loop = c.cmd("RCPT TO:<loop1@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: a\r\n\r\nb\r\n.\r\n")
        reply = c.read_reply()
        c.close()
        return loop, reply

    loop, reply = await in_thread(run)
    assert loop[0] == 550 and "5.4.6" in loop[1]
    assert reply[0] == 250
    (env,) = mta.queued()
    got = [(r.original, r.address, str(r.kind)) for r in env.recipients]
    assert got == [
        ("team@example.test", "alice@example.test", "local"),
        ("team@example.test", "bob@example.test", "local"),
        ("outside@example.test", "friend@remote.test", "remote"),
    ]
    # Two recipients: no "for" clause naming one of them.
    data = mta.message_bytes(env.id)
    assert b"for <" not in data.split(b"\r\n\r\n")[0]


@pytest_twisted.ensureDeferred
async def test_alias_drop_characters_and_suffix(mta):
    await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<a.lice@example.test>", 250),
        ("RCPT TO:<alice+tag@example.test>", 250),
        ("RCPT TO:<nobody+tag@example.test>", 550),
    ])


@pytest_twisted.ensureDeferred
async def test_same_mailbox_through_suffix_and_alias_gets_one_copy(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        for rcpt in ("bob+x@example.test", "bob@example.test", "team@example.test"):
            assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        c.cmd("DATA")
        c.send(b"Subject: a\r\n\r\nb\r\n.\r\n")
        reply = c.read_reply()
        c.close()
        return reply

    assert (await in_thread(run))[0] == 250
    (env,) = mta.queued()
    assert sorted(r.mailbox for r in env.recipients) == ["alice@example.test", "bob@example.test"]


def test_every_reply_in_the_table_is_ascii():
    """Replies go to clients that did not ask for SMTPUTF8: ASCII only (RFC 5321 §4.2)."""
    import mta.mail.replies as R

    replies = [v for v in vars(R).values() if isinstance(v, R.Reply)]
    replies += [R.greeting("mx.test"), R.queued("abc"), R.unknown_user("a@b.test"),
                R.relay_denied("a@b.test"), R.spf_fail("x"), R.sender_not_owned("a@b.test")]
    assert len(replies) > 40
    for reply in replies:
        assert reply.format().isascii(), reply
        assert reply.format().endswith(b"\r\n") and reply.format()[:3].isdigit()


# --- the EHLO/HELO name (helo_check) ---------------------------------------------------


@pytest.mark.parametrize("name", [
    "..", "<script>", "a" * 2040, "mail..example.org", ".example.org", "a" * 64 + ".example.org",
    "[127.0.0.1", "[1.2.3]", "[IPv6:zz::1]", "[IPv6:::1", "mail.example.org/x", "mail@example.org",
])
@pytest_twisted.ensureDeferred
async def test_bad_helo_names_are_refused(mta, name):
    replies = await in_thread(dialog, mta.port(), [
        (f"EHLO {name}", 501), (f"HELO {name}", 501), ("MAIL FROM:<a@remote.test>", 503)])
    for _code, text in replies[1:3]:
        assert text.startswith("501 5.5.2 Invalid EHLO/HELO name"), text


@pytest.mark.parametrize("name", [
    "[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "localhost", "mail.example.org.",
    "mail.example.org", "DESKTOP-1A2B", "my_host.example.org", "a" * 63 + ".example.org",
])
@pytest_twisted.ensureDeferred
async def test_good_helo_names_are_accepted(mta, name):
    await in_thread(dialog, mta.port(), [(f"EHLO {name}", 250), ("MAIL FROM:<a@remote.test>", 250)])


@pytest_twisted.ensureDeferred
async def test_strict_helo_check_wants_an_fqdn_on_mx_only(tmp_path):
    mta = await start_mta(tmp_path, extra={"helo_check": "strict"})
    try:
        replies = await in_thread(dialog, mta.port(), [
            ("EHLO localhost", 501), ("EHLO my_host.example.org", 501), ("EHLO 192.0.2.1", 501),
            ("EHLO mail.example.org.", 250), ("EHLO [192.0.2.1]", 250)])
        assert replies[1][1].startswith("501 5.5.2 EHLO/HELO name must be a fully-qualified domain name")
        assert replies[2][1].startswith("501 5.5.2 Invalid EHLO/HELO name")
        # Submission clients (laptops) keep the normal check.
        await in_thread(dialog, mta.port("submission"), [("EHLO localhost", 250), ("EHLO ..", 501)])
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_helo_check_off_and_relay_networks_accept_any_word(tmp_path):
    off = await start_mta(tmp_path / "off", extra={"helo_check": "off"})
    trusted = await start_mta(tmp_path / "trusted", extra={"relay_networks": ["127.0.0.0/8"]})
    try:
        for running in (off, trusted):
            await in_thread(dialog, running.port(), [("EHLO <script>", 250), ("EHLO ..", 250)])
    finally:
        await off.stop()
        await trusted.stop()


def test_helo_check_setting(tmp_path):
    from mta.config import ConfigError, config_from_dict

    assert config_from_dict({"hostname": "h.test"}, tmp_path).helo_check == "normal"
    assert config_from_dict({"hostname": "h.test", "helo_check": "off"}, tmp_path).helo_check == "off"
    with pytest.raises(ConfigError, match="helo_check.*strict, normal, off"):
        config_from_dict({"hostname": "h.test", "helo_check": "lenient"}, tmp_path)
