"""CHUNKING and BINARYMIME outbound (RFC 3030): the client's BDAT against real servers.

Real TCP on 127.0.0.1: the scripted sink taught CHUNKING, our own server (a
real BDAT receiver, byte-exact into its queue) and Postfix's smtp-sink (which
offers no CHUNKING: DATA, and BINARYMIME refused).  The tests check what the
receiving side got (commands, how they were grouped, every chunk's size, the
message's bytes) and each recipient's reply and outcome.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from mta.delivery import protocol
from mta.delivery.cache import ConnectionCache
from mta.delivery.client import ClientOptions, Timeouts, send
from mta.delivery.session import BDAT_WINDOW
from mta.queue.courier import Outcome
from tests.harness import start_mta
from tests.sink import wait_until
from tests.test_client import (
    BODY,
    _free_port,
    _wait_for_listener,
    deliver,
    message,
    outcomes,
    running,
    tx,
    verbs,
)

CHUNK = protocol.CHUNK_SIZE
# Bare LF and CR, lines starting with dots, a "CRLF.CRLF": BDAT sends all of it as it is.
AWKWARD = b"Subject: raw\r\n\r\n.dot\r\n..two\r\nbare\nLF and bare\rCR\r\n.\r\nafter the dot\r\n"


def big_message(size: int) -> bytes:
    line = b".a line with a leading dot, then text to fill it up to seventy-odd octets\r\n"
    data = b"Subject: big\r\n\r\n" + line * (size // len(line) + 1)
    return data[:size]


@pytest_twisted.ensureDeferred
async def test_small_message_goes_as_one_pipelined_bdat_last(tmp_path: Path) -> None:
    async with running(chunking=True) as sink:
        result = await deliver(sink, [tx(message(tmp_path, AWKWARD), ("b@dst.test", "c@dst.test"))])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED),
                                "c@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert msg.data == AWKWARD and msg.chunks == [len(AWKWARD)]  # octet for octet, no dot-stuffing
    session = sink.sessions[0]
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "RCPT", "BDAT", "QUIT"]
    assert session.command_batches[1] == [  # one segment: MAIL, RCPTs and the message
        f"MAIL FROM:<a@src.test> SIZE={len(AWKWARD)}", "RCPT TO:<b@dst.test>",
        "RCPT TO:<c@dst.test>", f"BDAT {len(AWKWARD)} LAST"]


@pytest_twisted.ensureDeferred
async def test_large_message_goes_in_exact_chunks_streamed_from_the_file(tmp_path: Path) -> None:
    data = big_message(3 * CHUNK + 1234)
    async with running(chunking=True) as sink:
        result = await deliver(sink, [tx(message(tmp_path, data))])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert msg.data == data
    assert msg.chunks == [CHUNK, CHUNK, CHUNK, 1234]
    bdats = [c for c in sink.sessions[0].commands if c.startswith("BDAT")]
    assert bdats == [f"BDAT {CHUNK}"] * 3 + ["BDAT 1234 LAST"]
    # MAIL and RCPT went together; the chunks only once the RCPT was accepted.
    assert sink.sessions[0].command_batches[1] == [f"MAIL FROM:<a@src.test> SIZE={len(data)}",
                                                   "RCPT TO:<b@dst.test>"]


@pytest_twisted.ensureDeferred
async def test_message_of_a_whole_number_of_chunks_and_an_empty_one(tmp_path: Path) -> None:
    exact = big_message(2 * CHUNK)
    async with running(chunking=True) as sink:
        result = await deliver(sink, [tx(message(tmp_path, exact)),
                                      tx(message(tmp_path, b"", "empty"))])
    assert outcomes(result, 0) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert outcomes(result, 1) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert [m.data for m in sink.messages] == [exact, b""]
    assert [c for c in sink.sessions[0].commands if c.startswith("BDAT")] == [
        f"BDAT {CHUNK}", f"BDAT {CHUNK} LAST", "BDAT 0 LAST"]
    # After a LAST answered 250, the next MAIL follows without RSET.
    assert "RSET" not in verbs(sink)


@pytest_twisted.ensureDeferred
async def test_without_pipelining_each_chunk_waits_for_its_reply(tmp_path: Path) -> None:
    data = big_message(2 * CHUNK + 10)
    async with running(chunking=True, pipelining=False) as sink:
        result = await deliver(sink, [tx(message(tmp_path, data))])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert sink.messages[0].data == data
    batches = sink.sessions[0].command_batches
    assert all(len(batch) == 1 for batch in batches)  # one command per read: nothing pipelined
    assert [b[0] for b in batches if b[0].startswith("BDAT")] == [
        f"BDAT {CHUNK}", f"BDAT {CHUNK}", "BDAT 10 LAST"]


@pytest_twisted.ensureDeferred
async def test_data_is_still_used_to_a_server_without_chunking(tmp_path: Path) -> None:
    async with running() as sink:
        result = await deliver(sink, [tx(message(tmp_path))])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert sink.messages[0].data == BODY and sink.messages[0].chunks == []


@pytest_twisted.ensureDeferred
async def test_binarymime_goes_with_body_binarymime_over_bdat(tmp_path: Path) -> None:
    binary = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n" + bytes(range(256)) * 300
    async with running(chunking=True, binarymime=True) as sink:
        result = await deliver(sink, [tx(message(tmp_path, binary), binarymime=True, body_8bit=True)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert msg.data == binary
    assert "BODY=BINARYMIME" in msg.mail_params and "BODY=8BITMIME" not in msg.mail_params


@pytest_twisted.ensureDeferred
async def test_binarymime_is_refused_locally_to_a_server_without_it(tmp_path: Path) -> None:
    """554 5.6.3 (RFC 3463: conversion required but not supported) for every
    recipient, and no MAIL is sent; the next message goes normally."""
    path = message(tmp_path, b"Subject: bin\r\n\r\n\x00\xff\n")
    for options in ({"chunking": True}, {}):  # CHUNKING without BINARYMIME; neither
        async with running(**options) as sink:
            result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"), binarymime=True),
                                          tx(message(tmp_path, name="plain"))])
        replies = result.transactions[0].replies
        assert {r: (rep.code, rep.enhanced, rep.outcome) for r, rep in replies.items()} == {
            r: (554, "5.6.3", Outcome.FAILED) for r in ("b@dst.test", "c@dst.test")}
        assert "conversion required but not supported" in replies["b@dst.test"].text
        assert outcomes(result, 1) == {"b@dst.test": (250, Outcome.DELIVERED)}
        assert [m.data for m in sink.messages] == [BODY]  # only the plain one
        assert verbs(sink).count("MAIL") == 1


@pytest_twisted.ensureDeferred
async def test_refused_chunk_stops_the_message_and_rset_follows(tmp_path: Path) -> None:
    data = big_message(6 * CHUNK)
    async with running(chunking=True, replies={"BDAT": "552 5.3.4 too much"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path, data)),
                                      tx(message(tmp_path, name="next"), ("c@dst.test",))])
    assert outcomes(result, 0) == {"b@dst.test": (552, Outcome.FAILED)}
    assert outcomes(result, 1) == {"c@dst.test": (250, Outcome.DELIVERED)}
    commands = sink.sessions[0].commands
    bdats = [c for c in commands if c.startswith("BDAT")]
    # No more chunks once the refusal came (at most the window was in flight), never LAST.
    assert 1 <= len(bdats) - 1 <= BDAT_WINDOW and f"BDAT {CHUNK} LAST" not in bdats
    assert verbs(sink)[-5:] == ["RSET", "MAIL", "RCPT", "BDAT", "QUIT"]
    assert [m.data for m in sink.messages] == [BODY]


@pytest_twisted.ensureDeferred
async def test_refused_last_chunk_fails_the_recipients_and_rset_follows(tmp_path: Path) -> None:
    async with running(chunking=True, replies={"DATA_END": "554 5.7.1 no thanks"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path)), tx(message(tmp_path, name="second"))])
    assert outcomes(result, 0) == {"b@dst.test": (554, Outcome.FAILED)}
    assert outcomes(result, 1) == {"b@dst.test": (554, Outcome.FAILED)}
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_pipelined_bdat_after_refused_recipients_keeps_the_session_in_step(tmp_path: Path) -> None:
    """All RCPTs refused: the pipelined BDAT LAST is answered 554 by the server
    and read; the next transaction (after RSET) is delivered."""
    async with running(chunking=True, replies={"RCPT:b@dst.test": "550 5.1.1 unknown"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path)),
                                      tx(message(tmp_path, name="second"), ("c@dst.test",))])
    assert outcomes(result, 0) == {"b@dst.test": (550, Outcome.FAILED)}
    assert outcomes(result, 1) == {"c@dst.test": (250, Outcome.DELIVERED)}
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "QUIT"]
    assert [m.recipients for m in sink.messages] == [["c@dst.test"]]


@pytest_twisted.ensureDeferred
async def test_421_to_a_chunk_fails_the_server(tmp_path: Path) -> None:
    async with running(chunking=True, replies={"BDAT": "421 4.3.2 going down"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path, big_message(3 * CHUNK)))])
    assert result.connection_error is not None and "421" in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_421_to_a_pipelined_bdat_last_keeps_the_rcpt_replies_before_it(tmp_path: Path) -> None:
    async with running(chunking=True, replies={"RCPT:c@dst.test": "550 5.1.1 unknown",
                                               "DATA_END": "421 4.3.2 going down"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path), ("b@dst.test", "c@dst.test"))])
    assert result.connection_error is not None and "421" in result.connection_error
    assert outcomes(result) == {"c@dst.test": (550, Outcome.FAILED)}
    assert result.transactions[0].unanswered() == ["b@dst.test"]


@pytest_twisted.ensureDeferred
async def test_stalled_chunk_reply_times_out_after_data_block(tmp_path: Path) -> None:
    clock = Clock()
    async with running(chunking=True, stall={"BDAT"}) as sink:
        d = Deferred.fromCoroutine(deliver(sink, [tx(message(tmp_path, big_message(4 * CHUNK)))],
                                           clock=clock))
        await wait_until(lambda: bool(sink.sessions) and sink.sessions[0].stalled_at == "BDAT")
        await deferLater(reactor, 0.05, lambda: None)
        clock.advance(Timeouts().data_block - 1)  # RFC 5321 §4.5.3.2.5: 3 minutes
        await deferLater(reactor, 0.05, lambda: None)
        assert not d.called
        clock.advance(2)
        result = await d
    assert result.connection_error is not None and "timeout after 180s" in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]


@pytest_twisted.ensureDeferred
async def test_stalled_last_reply_times_out_after_data_end(tmp_path: Path) -> None:
    clock = Clock()
    async with running(chunking=True, stall={"DATA_END"}) as sink:
        d = Deferred.fromCoroutine(deliver(sink, [tx(message(tmp_path))], clock=clock))
        await wait_until(lambda: bool(sink.sessions) and sink.sessions[0].stalled_at == "DATA_END")
        clock.advance(Timeouts().data_end - 1)  # RFC 5321 §4.5.3.2.6: 10 minutes
        await deferLater(reactor, 0.05, lambda: None)
        assert not d.called
        clock.advance(2)
        result = await d
    assert result.connection_error is not None and "timeout after 600s" in result.connection_error
    assert "BDAT LAST" in result.connection_error


@pytest_twisted.ensureDeferred
async def test_connection_is_reused_after_bdat(tmp_path: Path) -> None:
    cache = ConnectionCache(reactor, idle_time=5.0)
    options = ClientOptions("client.test")
    async with running(chunking=True) as sink:
        first = await send(reactor, ("127.0.0.1", sink.port), [tx(message(tmp_path))], options,
                           cache=cache)
        second = await send(reactor, ("127.0.0.1", sink.port),
                            [tx(message(tmp_path, big_message(CHUNK + 1), "big"))], options,
                            cache=cache)
        await cache.close()
    assert outcomes(first) == outcomes(second) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert len(sink.sessions) == 1
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "BDAT", "MAIL", "RCPT", "BDAT", "BDAT", "QUIT"]
    assert [m.chunks for m in sink.messages] == [[len(BODY)], [CHUNK, 1]]


@pytest_twisted.ensureDeferred
async def test_lmtp_over_bdat_answers_each_recipient_after_last(tmp_path: Path) -> None:
    """RFC 2033 §4.2 with CHUNKING: one reply per accepted RCPT after the LAST chunk,
    for a small pipelined message and a large one sent chunk by chunk."""
    replies = {"RCPT:d@dst.test": "550 5.1.1 unknown", "DATA_END:c@dst.test": "452 4.2.2 full"}
    big = big_message(2 * CHUNK + 5)
    async with running(lmtp=True, chunking=True, replies=replies) as sink:
        result = await deliver(sink, [tx(message(tmp_path), ("b@dst.test", "c@dst.test", "d@dst.test")),
                                      tx(message(tmp_path, big, "big"), ("b@dst.test", "c@dst.test"))],
                               lmtp=True)
    for index in (0, 1):
        assert outcomes(result, index) == {
            "b@dst.test": (250, Outcome.DELIVERED), "c@dst.test": (452, Outcome.DEFERRED),
            **({"d@dst.test": (550, Outcome.FAILED)} if index == 0 else {})}
    assert result.connection_error is None
    assert [(m.data, m.delivered_to, m.chunks) for m in sink.messages] == [
        (BODY, ["b@dst.test"], [len(BODY)]), (big, ["b@dst.test"], [CHUNK, CHUNK, 5])]
    # The transaction ended with the replies to LAST: the next MAIL needs no RSET.
    assert verbs(sink) == ["LHLO", "MAIL", "RCPT", "RCPT", "RCPT", "BDAT",
                           "MAIL", "RCPT", "RCPT", "BDAT", "BDAT", "BDAT", "QUIT"]
    # Large message: each chunk waited for its reply (one command per read).
    assert [b for b in sink.sessions[0].command_batches if b[0].startswith("BDAT")] == [
        [f"BDAT {CHUNK}"], [f"BDAT {CHUNK}"], ["BDAT 5 LAST"]]


@pytest_twisted.ensureDeferred
async def test_our_own_server_receives_chunks_byte_exact(tmp_path: Path) -> None:
    """Client to our server, both speaking BDAT for real: the queued message is the file."""
    running_mta = await start_mta(tmp_path / "mta", tls=False)
    try:
        # Text ending in CRLF (our server would complete a last line without one).
        data = big_message(3 * CHUNK + 99)[:-2].replace(b"Subject: big", b"Subject: ours") + b"\r\n"
        small = AWKWARD.replace(b"bare\nLF and bare\rCR\r\n", b"")  # 7bit text: no bare CR/LF
        result = await send(reactor, ("127.0.0.1", running_mta.port()),
                            [tx(message(tmp_path, data), ("alice@example.test",)),
                             tx(message(tmp_path, small, "small"), ("bob@example.test",))],
                            ClientOptions("client.test", tls_policy="none"))
        assert outcomes(result, 0) == {"alice@example.test": (250, Outcome.DELIVERED)}
        assert outcomes(result, 1) == {"bob@example.test": (250, Outcome.DELIVERED)}
        queued = {e.recipients[0].address: e for e in running_mta.queued()}
        for rcpt, expected in (("alice@example.test", data), ("bob@example.test", small)):
            stored = running_mta.message_bytes(queued[rcpt].id)
            assert stored.startswith(b"Received: ") and stored.endswith(b"\r\n" + expected)
    finally:
        await running_mta.stop()


@pytest_twisted.ensureDeferred
async def test_postfix_smtp_sink_without_chunking_gets_data_and_no_binarymime(tmp_path: Path) -> None:
    """Postfix's smtp-sink offers no CHUNKING: a plain message goes with DATA, a
    BINARYMIME one is refused here with 554 5.6.3 and never sent."""
    port = _free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(["smtp-sink", *user, "-d", f"{dump}/msg.", f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await _wait_for_listener(port, proc)
        binary = message(tmp_path, b"Subject: bin\r\n\r\n\x00\x01\xff\r\n", "binary")
        result = await send(reactor, ("127.0.0.1", port),
                            [tx(binary, binarymime=True), tx(message(tmp_path))],
                            ClientOptions("client.test"))
        await wait_until(lambda: any(dump.iterdir()))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert result.connection_error is None
    [(code, enhanced, outcome)] = [(r.code, r.enhanced, r.outcome)
                                   for r in result.transactions[0].replies.values()]
    assert (code, enhanced, outcome) == (554, "5.6.3", Outcome.FAILED)
    assert outcomes(result, 1) == {"b@dst.test": (250, Outcome.DELIVERED)}
    [dumped] = list(dump.iterdir())
    text = dumped.read_bytes()
    assert BODY.replace(b"\r\n", b"\n") in text and b"\x00" not in text
