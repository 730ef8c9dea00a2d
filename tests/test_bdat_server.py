"""CHUNKING and BINARYMIME inbound (RFC 3030): byte-exact BDAT dialogs on loopback.

Each test speaks BDAT to the real server over a socket and checks the replies,
that the session stays in step whatever the answer (the octets after a BDAT
line are always read), and the bytes that end up in the queue file.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from mta.queue.envelope import Envelope
from mta.queue.layout import read_embedded_envelope
from tests.harness import RawClient, in_thread, message_files, start_mta
from tests.sink import start_sink
from tests.test_commit import Hold
from tests.test_server_policy import login


@pytest.fixture
def mta(tmp_path):
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


def greeted(port: int) -> RawClient:
    c = RawClient(port)
    c.read_reply()
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def open_transaction(c: RawClient, body: str = "") -> None:
    assert c.cmd(f"MAIL FROM:<sender@remote.test>{body}")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def send_chunk(c: RawClient, data: bytes, last: bool = False) -> tuple[int, str]:
    c.send(bdat(data, last))
    return c.read_reply()


def stored(running, queue_id: str) -> bytes:
    """The message as queued, without our Received header (its first two lines)."""
    data = running.message_bytes(queue_id)
    assert data.startswith(b"Received: ")
    received_end = data.index(b"\r\n", data.index(b"\r\n\tfor ") + 2) + 2
    return data[received_end:]


MESSAGE = (b"Subject: chunked\r\nFrom: a@remote.test\r\n\r\n"
           b"line 1\r\n.a line starting with a dot\r\n..two dots\r\n.\r\nlast\r\n")


@pytest_twisted.ensureDeferred
async def test_ehlo_offers_chunking_and_binarymime(mta):
    def run():
        c = RawClient(mta.port())
        c.read_reply()
        reply = c.cmd("EHLO client.test")
        c.close()
        return reply

    code, text = await in_thread(run)
    assert code == 250
    assert "250-CHUNKING" in text and "250-BINARYMIME" in text


@pytest_twisted.ensureDeferred
async def test_single_chunk_is_stored_byte_exact(mta):
    """No dot-unstuffing, no terminator: the chunk's octets are the message."""
    def run():
        c = greeted(mta.port())
        open_transaction(c)
        c.send(bdat(MESSAGE, last=True))
        reply = c.read_reply()
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    (code, text), after = await in_thread(run)
    assert code == 250 and text.startswith("250 2.0.0 Ok: queued as ")
    assert after == (250, "250 2.0.0 Ok")
    queue_id = text.split()[-1]
    (envelope,) = mta.queued()
    assert envelope.id == queue_id and not envelope.binarymime
    assert stored(mta, queue_id) == MESSAGE
    on_disk = json.loads(read_embedded_envelope(mta.store.data_path(queue_id)))
    assert "binarymime" not in on_disk  # written only for a BINARYMIME message


@pytest_twisted.ensureDeferred
async def test_several_chunks_split_anywhere(mta):
    """Chunks cut in the middle of a line and between the CR and LF of a CRLF;
    each non-LAST chunk is answered with its size, the LAST one with the queue id."""
    cuts = [5, 17, MESSAGE.index(b"\r\n", 30) + 1, len(MESSAGE) - 3]
    pieces = [MESSAGE[a:b] for a, b in zip([0, *cuts], [*cuts, len(MESSAGE)], strict=True)]

    def run():
        c = greeted(mta.port())
        open_transaction(c)
        replies = []
        for piece in pieces[:-1]:
            c.send(bdat(piece))
            replies.append(c.read_reply())
        c.send(bdat(pieces[-1], last=True))
        replies.append(c.read_reply())
        c.close()
        return replies

    replies = await in_thread(run)
    assert replies[:-1] == [(250, f"250 2.0.0 {len(p)} octets received") for p in pieces[:-1]]
    code, text = replies[-1]
    assert code == 250 and "queued as" in text
    assert stored(mta, text.split()[-1]) == MESSAGE


@pytest_twisted.ensureDeferred
async def test_pipelined_chunks_in_one_segment(mta):
    def run():
        c = greeted(mta.port())
        c.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
               + bdat(MESSAGE[:20]) + bdat(MESSAGE[20:50]) + bdat(MESSAGE[50:], last=True)
               + b"NOOP\r\n")
        replies = [c.read_reply() for _ in range(6)]
        c.close()
        return replies

    replies = await in_thread(run)
    assert [code for code, _ in replies] == [250] * 6
    assert replies[2][1] == "250 2.0.0 20 octets received"
    assert replies[3][1] == "250 2.0.0 30 octets received"
    assert "queued as" in replies[4][1] and replies[5][1] == "250 2.0.0 Ok"
    assert stored(mta, replies[4][1].split()[-1]) == MESSAGE


@pytest_twisted.ensureDeferred
async def test_bdat_zero_last_ends_the_message(mta):
    def run():
        c = greeted(mta.port())
        open_transaction(c)
        c.send(bdat(MESSAGE))
        first = c.read_reply()
        last = c.cmd("BDAT 0 LAST")
        c.close()
        return first, last

    first, (code, text) = await in_thread(run)
    assert first == (250, f"250 2.0.0 {len(MESSAGE)} octets received")
    assert code == 250 and "queued as" in text
    assert stored(mta, text.split()[-1]) == MESSAGE


@pytest_twisted.ensureDeferred
async def test_refused_bdat_octets_are_read_and_dropped(mta):
    """Without MAIL, without a valid RCPT, or after a refused MAIL, a BDAT gets its
    error, but its octets are still consumed: commands inside them are never run,
    and the next command is understood."""
    inside = b"RSET\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"

    def run():
        c = greeted(mta.port())
        no_mail = send_chunk(c, inside, last=True)
        after_no_mail = c.cmd("NOOP")
        bad_mail = c.cmd("MAIL FROM:<not an address>")
        after_bad_mail = send_chunk(c, inside)
        assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        bad_rcpt = c.cmd("RCPT TO:<nobody@example.test>")
        no_rcpt = send_chunk(c, inside, last=True)
        # In one segment too: both replies, in order, then the NOOP's.
        c.send(bdat(inside) + bdat(b"RSET\r\n", last=True) + b"NOOP\r\n")
        pipelined = [c.read_reply() for _ in range(3)]
        c.close()
        return no_mail, after_no_mail, bad_mail, after_bad_mail, bad_rcpt, no_rcpt, pipelined

    no_mail, after_no_mail, bad_mail, after_bad_mail, bad_rcpt, no_rcpt, pipelined = \
        await in_thread(run)
    assert no_mail == (503, "503 5.5.1 Send MAIL FROM first")
    assert after_no_mail == (250, "250 2.0.0 Ok")
    assert bad_mail[0] == 501
    assert after_bad_mail == (503, "503 5.5.1 Send MAIL FROM first")
    assert bad_rcpt[0] == 550
    assert no_rcpt == (554, "554 5.5.1 No valid recipients")
    assert pipelined == [(554, "554 5.5.1 No valid recipients")] * 2 + [(250, "250 2.0.0 Ok")]
    assert mta.queued() == []


@pytest_twisted.ensureDeferred
async def test_bad_bdat_syntax(mta):
    def run():
        c = greeted(mta.port())
        open_transaction(c)
        replies = [c.cmd(line) for line in (
            "BDAT", "BDAT x", "BDAT -1", "BDAT 1 FIRST", "BDAT 5LAST", "BDAT " + "9" * 21)]
        after = c.cmd("NOOP")
        c.close()
        return replies, after

    replies, after = await in_thread(run)
    assert replies == [(501, "501 5.5.4 Syntax: BDAT <size> [LAST]")] * 6
    assert after == (250, "250 2.0.0 Ok")


@pytest_twisted.ensureDeferred
async def test_size_limit_counts_all_chunks(tmp_path):
    running = await start_mta(tmp_path, extra={"limits": {"max_message_size": 1000}})
    try:
        def run():
            c = greeted(running.port())
            open_transaction(c)
            first = send_chunk(c, b"Subject: big\r\n\r\n" + b"x" * 582 + b"\r\n")
            second = send_chunk(c, b"x" * 598 + b"\r\n")  # 1200 in all
            # The whole transaction is discarded: the next chunk has no MAIL.
            third = send_chunk(c, b"y" * 10 + b"\r\n", last=True)
            after = c.cmd("NOOP")
            # A chunk that goes over the limit on its own, read and dropped in one go.
            open_transaction(c)
            alone = send_chunk(c, b"z" * 1200, last=True)
            c.close()
            return first, second, third, after, alone

        first, second, third, after, alone = await in_thread(run)
    finally:
        await running.stop()
    assert first == (250, "250 2.0.0 600 octets received")
    assert second == (552, "552 5.3.4 Message size exceeds fixed maximum message size")
    assert third == (503, "503 5.5.1 Send MAIL FROM first")
    assert after == (250, "250 2.0.0 Ok")
    assert alone[0] == 552
    assert running.queued() == []


@pytest_twisted.ensureDeferred
async def test_bdat_and_data_do_not_mix(mta):
    """DATA (or another RCPT) once chunks have begun is refused, and the BDAT
    transaction goes on; after DATA ended a transaction, BDAT has no MAIL."""
    def run():
        c = greeted(mta.port())
        open_transaction(c)
        chunk = send_chunk(c, MESSAGE[:10])
        data = c.cmd("DATA")
        rcpt = c.cmd("RCPT TO:<bob@example.test>")
        last = send_chunk(c, MESSAGE[10:], last=True)  # the BDAT transaction goes on
        open_transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: data\r\n\r\nBDAT 5 LAST\r\nhello\r\n.\r\n")  # content, not a command
        by_data = c.read_reply()
        then_bdat = send_chunk(c, b"hello\r\n", last=True)
        c.close()
        return chunk, data, rcpt, last, by_data, then_bdat

    chunk, data, rcpt, last, by_data, then_bdat = await in_thread(run)
    assert chunk[0] == 250
    assert data == (503, "503 5.5.1 DATA not allowed after BDAT in the same transaction")
    assert rcpt == (503, "503 5.5.1 RCPT not allowed after BDAT in the same transaction")
    assert last[0] == 250 and "queued as" in last[1]
    assert by_data[0] == 250 and "queued as" in by_data[1]
    assert then_bdat == (503, "503 5.5.1 Send MAIL FROM first")  # DATA ended that transaction
    assert stored(mta, last[1].split()[-1]) == MESSAGE
    assert stored(mta, by_data[1].split()[-1]).endswith(b"BDAT 5 LAST\r\nhello\r\n")


BINARY = (b"Subject: binary\r\nFrom: a@remote.test\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Transfer-Encoding: binary\r\n\r\n"
          + bytes(range(256)) + b"\n.\n\r.\r" + b"\xff" * 3000 + b"\r\n.\r\n\x00end")


@pytest_twisted.ensureDeferred
async def test_binarymime_is_stored_octet_for_octet_and_refuses_data(mta):
    def run():
        c = greeted(mta.port())
        open_transaction(c, " BODY=BINARYMIME")
        data = c.cmd("DATA")
        c.send(bdat(BINARY[:70]) + bdat(BINARY[70:1000]) + bdat(BINARY[1000:], last=True))
        replies = [c.read_reply() for _ in range(3)]
        c.close()
        return data, replies

    data, replies = await in_thread(run)
    assert data == (503, "503 5.5.1 BODY=BINARYMIME requires BDAT, not DATA")
    assert [code for code, _ in replies] == [250, 250, 250]
    queue_id = replies[-1][1].split()[-1]
    assert stored(mta, queue_id) == BINARY  # bare CR/LF, NUL, a 3000-octet line, no final CRLF
    (envelope,) = mta.queued()
    assert envelope.binarymime and envelope.body_8bit
    assert json.loads(read_embedded_envelope(mta.store.data_path(queue_id)))["binarymime"] is True


@pytest_twisted.ensureDeferred
async def test_text_bdat_keeps_the_line_rules(mta):
    """Without BODY=BINARYMIME, a bare LF or an over-long line is refused as in DATA,
    at the chunk that has it, and the transaction's message is discarded."""
    def run():
        c = greeted(mta.port())
        open_transaction(c)
        bare = send_chunk(c, b"Subject: x\r\n\r\nbare\nLF\r\n")
        next_chunk = send_chunk(c, b"more\r\n", last=True)
        open_transaction(c)
        long = send_chunk(c, b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n", last=True)
        c.close()
        return bare, next_chunk, long

    bare, next_chunk, long = await in_thread(run)
    assert bare[0] == 550 and "5.6.0" in bare[1] and "bare CR or LF" in bare[1]
    assert next_chunk == (503, "503 5.5.1 Send MAIL FROM first")
    assert long[0] == 550 and "998" in long[1]
    assert mta.queued() == []


@pytest.mark.parametrize("inside", [b"\n.\n", b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n"])
@pytest_twisted.ensureDeferred
async def test_smuggling_inside_a_chunk_is_just_content(mta, inside):
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    message = b"Subject: innocent\r\n\r\nhello" + inside + smuggled

    def run():
        c = greeted(mta.port())
        open_transaction(c, " BODY=BINARYMIME" if b"\n.\n" in inside else "")
        reply = send_chunk(c, message, last=True)
        after = c.cmd("NOOP")  # exactly one reply came for the chunk
        c.close()
        return reply, after

    (code, text), after = await in_thread(run)
    assert code == 250 and after == (250, "250 2.0.0 Ok")
    (envelope,) = mta.queued()
    assert [r.address for r in envelope.recipients] == ["alice@example.test"]
    assert stored(mta, envelope.id) == message


@pytest_twisted.ensureDeferred
async def test_last_chunk_answered_only_once_the_message_is_on_disk(mta):
    """The 250 to BDAT LAST waits for the group commit, as DATA's does; a non-LAST
    chunk is answered at once."""
    hold = Hold()

    def run():
        c = greeted(mta.port())
        open_transaction(c)
        first = send_chunk(c, MESSAGE[:10])
        hold.hold(mta.store.committer)  # the commit thread is busy until released
        c.send(bdat(MESSAGE[10:], last=True))
        c.sock.settimeout(0.5)
        try:
            early = c.sock.recv(100)
        except TimeoutError:
            early = b""
        files_before = message_files(mta.store.msg_dir)
        hold.release()
        c.sock.settimeout(10)
        last = c.read_reply()
        files_after = message_files(mta.store.msg_dir)
        c.close()
        return first, early, files_before, last, files_after

    first, early, files_before, (code, text), files_after = await in_thread(run)
    assert first[0] == 250
    assert early == b"" and files_before == []
    assert code == 250
    assert files_after == [f"{text.split()[-1]}.msg"]


@pytest_twisted.ensureDeferred
async def test_header_hooks_apply_to_bdat(tmp_path):
    """Forged Authentication-Results are stripped and Received headers counted;
    a message past dkim.max_message_size spills to disk and stays exact."""
    running = await start_mta(tmp_path, extra={"dkim": {"max_message_size": 4096}})
    forged = b"Authentication-Results: mx.example.test; dkim=pass\r\n"
    body = b"".join(b"line %05d %s\r\n" % (i, b"z" * 60) for i in range(1000))  # ~72 KB
    try:
        def run():
            c = greeted(running.port())
            open_transaction(c)
            c.send(bdat(forged + b"Subject: big\r\n\r\n" + body[:5000]) + bdat(body[5000:], last=True))
            big = [c.read_reply() for _ in range(2)]
            open_transaction(c)
            loop = send_chunk(c, b"Received: from x\r\n" * 60 + b"\r\nbody\r\n", last=True)
            c.close()
            return big, loop

        big, loop = await in_thread(run)
        assert big[0][0] == 250 and big[1][0] == 250
        assert loop[0] == 554 and "5.4.6" in loop[1]
        (envelope,) = running.queued()
        assert stored(running, envelope.id) == b"Subject: big\r\n\r\n" + body
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_idle_timeout_applies_while_octets_trickle(tmp_path):
    running = await start_mta(tmp_path, extra={"limits": {"command_timeout": 0.6}})
    try:
        def run():
            c = greeted(running.port())
            open_transaction(c)
            c.send(b"BDAT 100 LAST\r\n")
            for _ in range(6):  # 1.2 s of progress, each piece within the timeout
                c.send(b"x" * 5)
                time.sleep(0.2)
            c.sock.settimeout(5)
            t0 = time.monotonic()
            reply = c.read_reply()  # then silence: the idle timeout ends the session
            waited = time.monotonic() - t0
            closed = c.is_closed()
            c.close()
            return reply, waited, closed

        (code, text), waited, closed = await in_thread(run)
    finally:
        await running.stop()
    assert code == 421 and "4.4.2" in text
    assert 0.3 < waited < 3 and closed
    assert running.queued() == []


def test_envelope_without_binarymime_field_still_loads():
    plain = Envelope(id="x", sender="a@b.test", recipients=[], created=1.0).to_bytes()
    assert b"binarymime" not in plain  # an envelope as written before CHUNKING support
    assert Envelope.from_bytes(plain).binarymime is False
    binary = Envelope(id="y", sender="", recipients=[], created=1.0, binarymime=True).to_bytes()
    assert json.loads(binary)["binarymime"] is True
    assert Envelope.from_bytes(binary).binarymime is True


@pytest_twisted.ensureDeferred
async def test_submission_over_bdat_completes_headers_and_binds_from(tmp_path):
    """On the submission port the same hooks run for BDAT: missing Date and
    Message-ID are added, and a From the user does not own is refused."""
    running = await start_mta(tmp_path, extra={"sender_binding_from": True})
    try:
        def run():
            c, code = login(running.port("submission"))
            assert code == 235
            assert c.cmd("MAIL FROM:<alice@example.test>")[0] == 250
            assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
            ok = send_chunk(c, b"From: alice@example.test\r\nSubject: s\r\n\r\nbody\r\n", last=True)
            assert c.cmd("MAIL FROM:<alice@example.test>")[0] == 250
            assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
            c.send(bdat(b"From: bob@example.test\r\n"))
            first = c.read_reply()
            forged = send_chunk(c, b"Subject: not mine\r\n\r\nbody\r\n", last=True)
            c.close()
            return ok, first, forged

        ok, first, forged = await in_thread(run)
        assert ok[0] == 250 and first[0] == 250
        assert forged[0] == 553 and "5.7.1" in forged[1]
        (envelope,) = running.queued()
        data = stored(running, envelope.id)
        assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data
        assert data.startswith(b"From: alice@example.test\r\nSubject: s\r\n")
        assert data.endswith(b"\r\n\r\nbody\r\n")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_bdat_message_reaches_the_maildir_and_leaves_by_bdat(tmp_path, dns_server):
    """End to end: received in chunks, delivered to a local Maildir and relayed to
    a remote MX that offers CHUNKING, which gets it byte for byte."""
    dns_server.load({"remote.test": {"MX": [(10, "mx.remote.test")]},
                     "mx.remote.test": {"A": ["127.0.0.1"]}})
    sink = await start_sink(chunking=True)
    host, port = dns_server.address
    running = None
    try:
        running = await start_mta(tmp_path, runner=None, extra={
            "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0},
            "delivery": {"mx_port": sink.port},
            "relay_networks": ["127.0.0.0/8"],
        })

        def run():
            c = greeted(running.port())
            assert c.cmd("MAIL FROM:<sender@example.test>")[0] == 250
            assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
            assert c.cmd("RCPT TO:<friend@remote.test>")[0] == 250
            c.send(bdat(MESSAGE[:33]) + bdat(MESSAGE[33:], last=True))
            replies = [c.read_reply() for _ in range(2)]
            c.close()
            return replies

        replies = await in_thread(run)
        assert [code for code, _ in replies] == [250, 250]
        new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
        deadline = time.monotonic() + 15
        while not (sink.messages and new.exists() and any(new.iterdir())):
            assert time.monotonic() < deadline, "not delivered"
            await deferLater(reactor, 0.05, lambda: None)
        (remote,) = sink.messages
        assert remote.chunks and remote.data.endswith(b"\r\n" + MESSAGE)
        assert remote.data.startswith(b"Received: from client.test")
        (local,) = new.iterdir()
        assert local.read_bytes().endswith(b"\n" + MESSAGE.replace(b"\r\n", b"\n"))
    finally:
        if running is not None:
            await running.stop()
        await sink.stop()
