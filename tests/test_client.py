"""The outbound SMTP client against the scripted sink (and Postfix's smtp-sink).

Every test runs real TCP on 127.0.0.1, real TLS with trustme certificates, and
checks what a user would see: the per-recipient replies and outcomes, and the
bytes and commands the server received.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mta.delivery import protocol
from mta.delivery.client import ClientOptions, OutboundMessage, SessionResult, Timeouts, send
from mta.delivery.wire import ReplyError, ReplyParser
from mta.queue.courier import Outcome
from tests.sink import Sink, start_sink, wait_until

CA = trustme.CA()
OTHER_CA = trustme.CA()
MX_NAME = "mx.example.test"
CERT = CA.issue_cert(MX_NAME)
BODY = (b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: test\r\n\r\n"
        b"Hello.\r\n.a line with a leading dot\r\n.\r\nlast line\r\n")


def trust(ca: trustme.CA) -> Certificate:
    return Certificate.loadPEM(ca.cert_pem.bytes())


def message(tmp_path: Path, data: bytes = BODY, name: str = "msg") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def tx(path: Path, recipients: tuple[str, ...] = ("b@dst.test",), sender: str = "a@src.test",
       **kw: Any) -> OutboundMessage:
    return OutboundMessage(sender, list(recipients), path, path.stat().st_size, **kw)


async def deliver(sink: Sink, transactions: list[OutboundMessage], clock: Any = None,
                  **options: Any) -> SessionResult:
    return await send(reactor, ("127.0.0.1", sink.port), transactions,
                      ClientOptions("client.test", **options), clock=clock)


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[Sink]:
    sink = await start_sink(**options)
    try:
        yield sink
    finally:
        await sink.stop()


def outcomes(result: SessionResult, index: int = 0) -> dict[str, tuple[int, Outcome]]:
    return {r: (rep.code, rep.outcome) for r, rep in result.transactions[index].replies.items()}


def verbs(sink: Sink, session: int = 0) -> list[str]:
    return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in sink.sessions[session].commands]


# --- the reply parser ---------------------------------------------------------------------


def test_reply_is_only_complete_at_its_last_line() -> None:
    parser = ReplyParser()
    wire = b"250-mx.example.test hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    got = [r for byte in wire for r in parser.feed(bytes([byte]))]
    assert len(got) == 1
    assert got[0].code == 250 and got[0].lines == ("mx.example.test hello", "PIPELINING", "SIZE 1000")
    assert not parser.pending


def test_reply_enhanced_code_and_text() -> None:
    [reply] = ReplyParser().feed(b"550-5.1.1 no such user\r\n550 5.1.1 here\r\n")
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "no such user here")
    [plain] = ReplyParser().feed(b"250 ok 4.2.0\r\n")
    assert plain.enhanced == "" and str(plain) == "250 ok 4.2.0"


@pytest.mark.parametrize("wire", [
    b"hello there\r\n",  # not a reply at all
    b"250-first\r\n251 second\r\n",  # codes differ within one reply
    b"25O ok\r\n",
    b"250" + b"x" * 5000,  # a line without end, too long
])
def test_garbage_replies_are_errors(wire: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(wire)


def test_too_many_reply_lines_is_an_error() -> None:
    with pytest.raises(ReplyError):
        ReplyParser(max_lines=5).feed(b"250-x\r\n" * 6 + b"250 x\r\n")


# --- ordinary delivery --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delivers_with_pipelining(tmp_path: Path) -> None:
    path = message(tmp_path)
    async with running() as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"))])
    assert result.connection_error is None
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED),
                                "c@dst.test": (250, Outcome.DELIVERED)}
    assert str(result.transactions[0].replies["b@dst.test"]) == "250 2.0.0 Ok: queued as M1"
    [msg] = sink.messages
    assert msg.sender == "a@src.test" and msg.recipients == ["b@dst.test", "c@dst.test"]
    assert msg.data == BODY
    assert msg.raw == BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert msg.mail_params == [f"SIZE={len(BODY)}"]
    # RFC 2920: MAIL, both RCPTs and DATA left in one write.
    assert [f"MAIL FROM:<a@src.test> SIZE={len(BODY)}", "RCPT TO:<b@dst.test>",
            "RCPT TO:<c@dst.test>", "DATA"] in sink.sessions[0].command_batches
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_without_pipelining_one_command_at_a_time(tmp_path: Path) -> None:
    path = message(tmp_path)
    async with running(pipelining=False, size=None) as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"))])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED),
                                "c@dst.test": (250, Outcome.DELIVERED)}
    assert all(len(batch) == 1 for batch in sink.sessions[0].command_batches)
    assert sink.sessions[0].commands[1] == "MAIL FROM:<a@src.test>"  # SIZE not offered
    assert sink.messages[0].data == BODY


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_mixed_recipient_replies(tmp_path: Path, pipelining: bool) -> None:
    path = message(tmp_path)
    replies = {"RCPT:soft@dst.test": "450 4.2.1 mailbox busy", "RCPT:bad@dst.test": "550 5.1.1 no such user"}
    async with running(pipelining=pipelining, replies=replies) as sink:
        result = await deliver(sink, [tx(path, ("ok@dst.test", "soft@dst.test", "bad@dst.test"))])
    assert result.connection_error is None
    assert outcomes(result) == {"ok@dst.test": (250, Outcome.DELIVERED),
                                "soft@dst.test": (450, Outcome.DEFERRED),
                                "bad@dst.test": (550, Outcome.FAILED)}
    bad = result.transactions[0].replies["bad@dst.test"]
    assert (bad.enhanced, bad.text) == ("5.1.1", "no such user")
    assert [m.recipients for m in sink.messages] == [["ok@dst.test"]]


@pytest_twisted.ensureDeferred
async def test_too_many_recipients_go_in_further_transactions(tmp_path: Path) -> None:
    path = message(tmp_path)
    rcpts = tuple(f"r{i}@dst.test" for i in range(5))
    async with running(max_recipients=2) as sink:
        result = await deliver(sink, [tx(path, rcpts)])
    assert result.connection_error is None
    assert {r: o for r, (_, o) in outcomes(result).items()} == dict.fromkeys(rcpts, Outcome.DELIVERED)
    assert [m.recipients for m in sink.messages] == [list(rcpts[0:2]), list(rcpts[2:4]), [rcpts[4]]]
    assert len(sink.sessions) == 1 and all(m.data == BODY for m in sink.messages)


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_5xx_on_mail_fails_every_recipient(tmp_path: Path, pipelining: bool) -> None:
    path = message(tmp_path)
    async with running(pipelining=pipelining, replies={"MAIL": "553 5.7.1 sender rejected"}) as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"))])
    assert result.connection_error is None
    assert outcomes(result) == {"b@dst.test": (553, Outcome.FAILED), "c@dst.test": (553, Outcome.FAILED)}
    assert sink.messages == []
    assert verbs(sink)[-1] == "QUIT"


@pytest_twisted.ensureDeferred
async def test_421_after_a_refused_sender_still_fails_every_recipient(tmp_path: Path) -> None:
    """chasquid closes with 421 at the third error: MAIL 553, RCPT 503, then 421.
    The 553 came first, so every recipient fails (a DSN, not a deferral for the
    queue lifetime); the 421 only ends the session."""
    path = message(tmp_path)
    async with running(max_errors=3, replies={"MAIL": "553 5.7.1 sender rejected"}) as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test", "d@dst.test"))])
    assert outcomes(result) == dict.fromkeys(("b@dst.test", "c@dst.test", "d@dst.test"),
                                             (553, Outcome.FAILED))
    assert result.transactions[0].unanswered() == []
    assert result.connection_error is not None and "421 4.5.0 Too many errors" in result.connection_error
    assert sink.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_421_after_refused_recipients_applies_the_earlier_replies(tmp_path: Path,
                                                                         pipelining: bool) -> None:
    """RCPT 250, 550, 550, then 421 instead of the third error: the two refused
    recipients fail; the accepted one and the one the 421 answered stay unanswered
    (for the next server or a retry); nothing is delivered."""
    path = message(tmp_path)
    replies = {"RCPT:b@dst.test": "550 5.1.1 no such user", "RCPT:c@dst.test": "550 5.1.1 no such user",
               "RCPT:d@dst.test": "450 4.2.1 mailbox busy"}
    rcpts = ("ok@dst.test", "b@dst.test", "c@dst.test", "d@dst.test")
    async with running(pipelining=pipelining, max_errors=3, replies=replies) as sink:
        result = await deliver(sink, [tx(path, rcpts)])
    assert outcomes(result) == {"b@dst.test": (550, Outcome.FAILED), "c@dst.test": (550, Outcome.FAILED)}
    assert result.transactions[0].unanswered() == ["ok@dst.test", "d@dst.test"]
    assert result.connection_error is not None and "421 4.5.0 Too many errors" in result.connection_error
    assert "in reply to RCPT TO" in result.connection_error
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_421_to_pipelined_data_after_every_recipient_refused(tmp_path: Path) -> None:
    """Both RCPTs 550, then 421 in reply to the pipelined DATA: both fail at once."""
    path = message(tmp_path)
    replies = {"RCPT:b@dst.test": "550 5.1.1 no such user", "RCPT:c@dst.test": "550 5.7.1 refused"}
    async with running(max_errors=3, replies=replies) as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"))])
    assert outcomes(result) == {"b@dst.test": (550, Outcome.FAILED), "c@dst.test": (550, Outcome.FAILED)}
    assert result.connection_error is not None and "in reply to DATA" in result.connection_error
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]


@pytest_twisted.ensureDeferred
async def test_4xx_on_mail_means_next_server(tmp_path: Path) -> None:
    path = message(tmp_path)
    async with running(replies={"MAIL": "451 4.3.0 try later"}) as sink:
        result = await deliver(sink, [tx(path)])
    assert result.connection_error is not None and "451 4.3.0 try later" in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]
    assert result.error_status == "4.3.0"
    assert verbs(sink)[-1] == "QUIT"


@pytest.mark.parametrize(("stage", "reply", "outcome"), [
    ("DATA_END", "554 5.6.0 content rejected", Outcome.FAILED),
    ("DATA_END", "452 4.3.1 insufficient storage", Outcome.DEFERRED),
    ("DATA", "554 5.5.1 no data", Outcome.FAILED),
])
@pytest_twisted.ensureDeferred
async def test_data_replies(tmp_path: Path, stage: str, reply: str, outcome: Outcome) -> None:
    path = message(tmp_path)
    async with running(replies={stage: reply}) as sink:
        result = await deliver(sink, [tx(path, ("b@dst.test", "c@dst.test"))])
    assert result.connection_error is None
    code = int(reply[:3])
    assert outcomes(result) == {"b@dst.test": (code, outcome), "c@dst.test": (code, outcome)}
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_pipelined_data_after_all_recipients_rejected_then_rset(tmp_path: Path) -> None:
    first, second = message(tmp_path, name="one"), message(tmp_path, b"second\r\n", name="two")
    async with running(replies={"RCPT:bad@dst.test": "550 5.1.1 unknown"}) as sink:
        result = await deliver(sink, [tx(first, ("bad@dst.test",)), tx(second, ("ok@dst.test",))])
    assert result.connection_error is None
    assert outcomes(result, 0) == {"bad@dst.test": (550, Outcome.FAILED)}
    assert outcomes(result, 1) == {"ok@dst.test": (250, Outcome.DELIVERED)}
    # The pipelined DATA got 554 (no valid recipients); RSET before the next transaction.
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [m.data for m in sink.messages] == [b"second\r\n"]


@pytest_twisted.ensureDeferred
async def test_several_transactions_on_one_connection(tmp_path: Path) -> None:
    first, second = message(tmp_path, b"one\r\n", "one"), message(tmp_path, b"two\r\n", "two")
    async with running() as sink:
        result = await deliver(sink, [tx(first, ("x@dst.test",)), tx(second, ("y@dst.test",))])
    assert [outcomes(result, i) for i in (0, 1)] == [{"x@dst.test": (250, Outcome.DELIVERED)},
                                                     {"y@dst.test": (250, Outcome.DELIVERED)}]
    assert len(sink.sessions) == 1
    assert [(m.recipients, m.data) for m in sink.messages] == [(["x@dst.test"], b"one\r\n"),
                                                               (["y@dst.test"], b"two\r\n")]


@pytest_twisted.ensureDeferred
async def test_log_events_only_for_a_failed_server_and_tcp_nodelay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A session that went well logs nothing here (the queue runner logs each
    # recipient's outcome); a failed server gets one line per transaction.
    events: list[dict[str, Any]] = []
    nodelay: list[bool] = []
    made = protocol.SMTPClientProtocol.connectionMade

    def spy(self: protocol.SMTPClientProtocol) -> None:
        made(self)
        nodelay.append(bool(self.transport.getTcpNoDelay()))

    monkeypatch.setattr(protocol.SMTPClientProtocol, "connectionMade", spy)
    globalLogPublisher.addObserver(events.append)
    try:
        first, second = message(tmp_path, b"one\r\n", "one"), message(tmp_path, b"two\r\n", "two")
        async with running(tls=CERT, replies={"RCPT:no@dst.test": "550 5.1.1 unknown"}) as sink:
            await deliver(sink, [tx(first, ("x@dst.test", "no@dst.test")), tx(second, ("y@dst.test",))])
        quiet = [e for e in events if e.get("log_namespace") == "mta.delivery.client"]
        async with running(tls=CERT, replies={"RCPT:y@dst.test": "421 4.3.2 closing"}) as sink:
            await deliver(sink, [tx(first, ("x@dst.test", "no@dst.test")), tx(second, ("y@dst.test",))])
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert nodelay == [True, True]
    assert quiet == []
    mine = [e for e in events if e.get("log_namespace") == "mta.delivery.client"]
    assert len(mine) == 2
    assert mine[0]["server"] == "127.0.0.1" and mine[0]["tls"].startswith("TLSv1.")
    assert mine[0]["replies"] == {"x@dst.test": "250 2.0.0 Ok: queued as M1",
                                  "no@dst.test": "250 2.0.0 Ok: queued as M1"}
    assert "x@dst.test=delivered" in formatEvent(mine[0])
    assert "y@dst.test=unanswered; server failed: 421 4.3.2 closing" in formatEvent(mine[1])


# --- the server fails ---------------------------------------------------------------------


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.7.1 no service for you"])
@pytest_twisted.ensureDeferred
async def test_refusing_greeting_means_next_server(tmp_path: Path, greeting: str) -> None:
    async with running(replies={"greeting": greeting}) as sink:
        result = await deliver(sink, [tx(message(tmp_path))])
    assert result.connection_error is not None and greeting in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]
    # RFC 5321 §3.1: after a 554 greeting the client sends QUIT; after 421 it just closes.
    assert sink.sessions[0].commands == ([] if greeting.startswith("421") else ["QUIT"])


@pytest_twisted.ensureDeferred
async def test_connection_refused(tmp_path: Path) -> None:
    sink = await start_sink()
    port = sink.port
    await sink.stop()
    result = await send(reactor, ("127.0.0.1", port), [tx(message(tmp_path))], ClientOptions("client.test"))
    assert result.connection_error is not None and "refused" in result.connection_error.lower()
    assert result.error_status == "4.4.1"
    assert result.transactions[0].unanswered() == ["b@dst.test"]


@pytest.mark.parametrize(("options", "expected"), [
    ({"replies": {"MAIL": "this is not smtp"}}, "protocol error"),
    ({"replies": {"EHLO": "250-a\n251 b"}}, "protocol error"),
    ({"drop": {"DATA"}}, "lost connection"),
    ({"replies": {"RCPT": "421 4.4.2 going down"}}, "421 4.4.2 going down"),
])
@pytest_twisted.ensureDeferred
async def test_broken_servers_mean_next_server(tmp_path: Path, options: dict[str, Any],
                                               expected: str) -> None:
    async with running(pipelining=False, **options) as sink:
        result = await deliver(sink, [tx(message(tmp_path))])
    assert result.connection_error is not None and expected in result.connection_error
    assert result.transactions[0].replies == {}
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_ehlo_rejected_falls_back_to_helo(tmp_path: Path) -> None:
    path = message(tmp_path)
    async with running(esmtp=False) as sink:
        result = await deliver(sink, [tx(path)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert verbs(sink) == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert sink.messages[0].mail_params == []  # HELO: no extensions, so no SIZE


@pytest_twisted.ensureDeferred
async def test_stall_at_data_end_times_out_on_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    async with running(stall={"DATA_END"}) as sink:
        d = Deferred.fromCoroutine(deliver(sink, [tx(message(tmp_path))], clock=clock))
        await wait_until(lambda: bool(sink.sessions) and sink.sessions[0].stalled_at == "DATA_END")
        clock.advance(Timeouts().data_end - 1)  # RFC 5321 §4.5.3.2.6: 10 minutes
        await deferLater(reactor, 0.05, lambda: None)
        assert not d.called
        clock.advance(2)
        result = await d
    assert result.connection_error is not None and "timeout after 600s" in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]


@pytest_twisted.ensureDeferred
async def test_stall_at_greeting_times_out(tmp_path: Path) -> None:
    clock = Clock()
    async with running(stall={"greeting"}) as sink:
        d = Deferred.fromCoroutine(deliver(sink, [tx(message(tmp_path))], clock=clock))
        await wait_until(lambda: bool(sink.sessions))
        clock.advance(Timeouts().greeting + 1)
        result = await d
    assert result.connection_error is not None and "greeting" in result.connection_error


# --- extensions ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtputf8_needed_but_not_offered_fails_with_5_6_7(tmp_path: Path) -> None:
    path = message(tmp_path)
    async with running(smtputf8=False) as sink:
        result = await deliver(sink, [tx(path, ("jörg@dst.test", "b@dst.test"), smtputf8=True)])
    assert result.connection_error is None
    for reply in result.transactions[0].replies.values():
        assert (reply.code, reply.enhanced, reply.outcome) == (553, "5.6.7", Outcome.FAILED)
    assert "MAIL" not in verbs(sink)


@pytest_twisted.ensureDeferred
async def test_a_refused_transaction_does_not_stop_the_next_one(tmp_path: Path) -> None:
    utf8, plain = message(tmp_path, name="utf8"), message(tmp_path, name="plain")
    async with running(smtputf8=False) as sink:
        result = await deliver(sink, [tx(utf8, ("jörg@dst.test",)), tx(plain, ("b@dst.test",))])
    assert outcomes(result, 0) == {"jörg@dst.test": (553, Outcome.FAILED)}
    assert outcomes(result, 1) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert verbs(sink) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_smtputf8_and_8bitmime_parameters_when_offered(tmp_path: Path) -> None:
    data = "Subject: grüße\r\n\r\nnaïve\r\n".encode()
    path = message(tmp_path, data)
    async with running() as sink:
        result = await deliver(sink, [tx(path, ("jörg@dst.test",), smtputf8=True, body_8bit=True)])
    assert outcomes(result) == {"jörg@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert msg.recipients == ["jörg@dst.test"] and msg.data == data
    assert msg.mail_params == [f"SIZE={len(data)}", "BODY=8BITMIME", "SMTPUTF8"]


@pytest_twisted.ensureDeferred
async def test_8bit_message_is_sent_as_is_without_8bitmime(tmp_path: Path) -> None:
    data = "Subject: x\r\n\r\nnaïve\r\n".encode()
    async with running(eightbitmime=False) as sink:
        result = await deliver(sink, [tx(message(tmp_path, data), body_8bit=True)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert sink.messages[0].mail_params == [f"SIZE={len(data)}"] and sink.messages[0].data == data


@pytest_twisted.ensureDeferred
async def test_message_bigger_than_the_declared_size_fails_without_sending(tmp_path: Path) -> None:
    async with running(size=10) as sink:
        result = await deliver(sink, [tx(message(tmp_path))])
    assert outcomes(result) == {"b@dst.test": (552, Outcome.FAILED)}
    assert result.transactions[0].replies["b@dst.test"].enhanced == "5.3.4"
    assert "MAIL" not in verbs(sink)


# --- TLS ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_with_an_untrusted_certificate(tmp_path: Path) -> None:
    async with running(tls=CERT) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_hostname=MX_NAME,
                               trust_root=trust(OTHER_CA))
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert result.tls.startswith("TLSv1.") and len(result.tls.split()) == 2
    assert not result.tls_verified
    assert sink.messages[0].tls and sink.messages[0].data == BODY
    assert verbs(sink) == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_verify_with_an_untrusted_certificate_fails_the_server(tmp_path: Path) -> None:
    async with running(tls=CERT) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy="verify",
                               tls_hostname=MX_NAME, trust_root=trust(OTHER_CA))
    assert result.connection_error is not None and "TLS handshake failed" in result.connection_error
    assert result.tls_failed and result.transactions[0].unanswered() == ["b@dst.test"]
    assert "MAIL" not in verbs(sink)


@pytest_twisted.ensureDeferred
async def test_verify_with_the_wrong_name_fails_the_server(tmp_path: Path) -> None:
    async with running(tls=CERT) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy="verify",
                               tls_hostname="other.example.test", trust_root=trust(CA))
    assert result.connection_error is not None and result.tls_failed
    assert "MAIL" not in verbs(sink)


@pytest_twisted.ensureDeferred
async def test_verify_with_the_right_ca_and_name(tmp_path: Path) -> None:
    async with running(tls=CERT) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy="verify",
                               tls_hostname=MX_NAME, trust_root=trust(CA))
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert result.tls_verified and result.tls.startswith("TLSv1.")
    assert sink.messages[0].tls


@pytest.mark.parametrize("policy", ["require", "verify"])
@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered(tmp_path: Path, policy: str) -> None:
    async with running() as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy=policy, tls_hostname=MX_NAME)
    assert result.connection_error is not None and "STARTTLS" in result.connection_error
    assert result.error_status == "4.7.10"
    assert verbs(sink) == ["EHLO", "QUIT"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("policy", ["opportunistic", "require"])
async def test_next_connection_resumes_the_tls_session(tmp_path: Path, policy: str) -> None:
    """The second connection to a server (no connection cache: a new TCP
    connection each) resumes the first one's TLS session: the server sees a
    resumed handshake, and the mail goes through it as before."""
    async with running(tls=CERT) as sink:
        for i in range(3):
            result = await deliver(sink, [tx(message(tmp_path, name=f"m{i}"))], tls_policy=policy,
                                   tls_hostname=MX_NAME)
            assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert [s.tls for s in sink.sessions] == [True, True, True]
    assert [s.tls_resumed for s in sink.sessions] == [False, True, True]
    assert [m.data for m in sink.messages] == [BODY] * 3


@pytest_twisted.ensureDeferred
async def test_verified_tls_is_never_resumed(tmp_path: Path) -> None:
    """Under verify a resumed session would skip the certificate check: a full
    handshake every time."""
    async with running(tls=CERT) as sink:
        for i in range(2):
            result = await deliver(sink, [tx(message(tmp_path, name=f"v{i}"))], tls_policy="verify",
                                   tls_hostname=MX_NAME, trust_root=trust(CA))
            assert result.tls_verified
    assert [s.tls_resumed for s in sink.sessions] == [False, False]


@pytest_twisted.ensureDeferred
async def test_tls_policy_none_never_starts_tls(tmp_path: Path) -> None:
    async with running(tls=CERT) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy="none")
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert result.tls == "" and "STARTTLS" not in verbs(sink)


@pytest_twisted.ensureDeferred
async def test_plaintext_injected_after_starttls_is_not_taken_as_ehlo_reply(tmp_path: Path) -> None:
    inject = b"250-evil.example\r\n250 AUTH PLAIN\r\n"
    async with running(tls=CERT, starttls_inject=inject) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_hostname=MX_NAME)
    assert result.connection_error is not None and "injection" in result.connection_error
    assert result.transactions[0].unanswered() == ["b@dst.test"]
    assert verbs(sink) == ["EHLO", "STARTTLS"]  # nothing sent after the injected reply


# --- AUTH ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanisms", [("PLAIN", "LOGIN"), ("LOGIN",)])
@pytest_twisted.ensureDeferred
async def test_auth_over_tls(tmp_path: Path, mechanisms: tuple[str, ...]) -> None:
    async with running(tls=CERT, auth={"relay": "s3cret pass"}, auth_required=True,
                       auth_mechanisms=mechanisms) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], tls_policy="require",
                               username="relay", password="s3cret pass")
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert sink.sessions[0].auth_user == "relay" and sink.messages[0].auth_user == "relay"
    auth = [c for c in sink.sessions[0].commands if c.startswith("AUTH")]
    assert auth == (["AUTH LOGIN"] if mechanisms == ("LOGIN",) else [auth[0]])
    assert mechanisms == ("LOGIN",) or auth[0].startswith("AUTH PLAIN ")


@pytest_twisted.ensureDeferred
async def test_auth_never_without_tls(tmp_path: Path) -> None:
    async with running(auth={"relay": "s3cret"}, auth_requires_tls=False) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], username="relay", password="s3cret")
    assert result.connection_error is not None and "not encrypted" in result.connection_error
    assert verbs(sink) == ["EHLO", "QUIT"]
    assert not any("czNjcmV0" in c or "s3cret" in c for c in sink.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_auth_rejected_fails_the_server(tmp_path: Path) -> None:
    async with running(tls=CERT, auth={"relay": "right"}) as sink:
        result = await deliver(sink, [tx(message(tmp_path))], username="relay", password="wrong")
    assert result.connection_error is not None
    assert "authentication failed: 535 5.7.8" in result.connection_error
    assert "MAIL" not in verbs(sink)


# --- the message body ---------------------------------------------------------------------


def pad_to(data: bytearray, offset: int) -> None:
    """Append CRLF-ended filler lines so that the next line starts at ``offset``."""
    while offset - len(data) > 1000:
        data += b"y" * 998 + b"\r\n"
    assert offset - len(data) >= 2
    data += b"y" * (offset - len(data) - 2) + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_dots_at_chunk_boundaries_arrive_byte_exact(tmp_path: Path) -> None:
    data = bytearray()
    for boundary in (16 * 1024, 64 * 1024, 2 * 64 * 1024, 3 * 64 * 1024):
        pad_to(data, boundary)
        data += b".dot at offset %d\r\n" % boundary
    # The 4th chunk boundary falls between CR and LF, and a dot line follows.
    pad_to(data, 4 * 64 * 1024 - 10)
    data += b"z" * 9 + b"\r\n.after a split CRLF\r\n"
    assert data[4 * 64 * 1024 - 1 : 4 * 64 * 1024 + 2] == b"\r\n."
    path = message(tmp_path, bytes(data))
    async with running() as sink:
        result = await deliver(sink, [tx(path)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert msg.data == bytes(data)
    assert msg.raw == bytes(data).replace(b"\r\n.", b"\r\n..") + b".\r\n"


@pytest_twisted.ensureDeferred
async def test_bare_lf_and_missing_final_newline_become_crlf(tmp_path: Path) -> None:
    path = message(tmp_path, b"Subject: lf\n\n.dot\nbare\rcr\nend")
    async with running() as sink:
        result = await deliver(sink, [tx(path)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    assert sink.messages[0].raw == b"Subject: lf\r\n\r\n..dot\r\nbare\r\ncr\r\nend\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_20mb_message_is_streamed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = b"0123456789" * 7 + b"\r\n"
    block = line * 999 + b".dotted line\r\n"
    data = block * (20 * 1024 * 1024 // len(block) + 1)
    path = message(tmp_path, data)
    reads: list[tuple[int, int]] = []  # (bytes read so far, bytes the server had then)
    sinks: list[Sink] = []
    original = protocol._BodyProducer._read_chunk

    def spy(self: Any) -> bytes:
        chunk = original(self)
        total = (reads[-1][0] if reads else 0) + len(chunk)
        reads.append((total, sinks[0].sessions[0].data_bytes_received))
        return chunk

    monkeypatch.setattr(protocol._BodyProducer, "_read_chunk", spy)
    async with running() as sink:
        sinks.append(sink)
        result = await deliver(sink, [tx(path)])
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED)}
    [msg] = sink.messages
    assert hashlib.sha256(msg.data).digest() == hashlib.sha256(data).digest()
    sizes = [b - a for (a, _), (b, _) in zip([(0, 0), *reads], reads, strict=False)]
    assert max(sizes) <= 64 * 1024 and len(reads) >= len(data) // (64 * 1024)
    # Reading follows the network: the client never runs far ahead of what the server took.
    assert max(total - received for total, received in reads) < len(data) // 2


# --- interoperability ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_for_listener(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, "smtp-sink exited"
        try:
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1).connect(
                Factory.forProtocol(Protocol))
        except Exception:
            if time.monotonic() > deadline:
                raise
            await deferLater(reactor, 0.05, lambda: None)
            continue
        proto.transport.abortConnection()
        return


@pytest_twisted.ensureDeferred
async def test_interop_with_postfix_smtp_sink(tmp_path: Path) -> None:
    port = _free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    # As root smtp-sink insists on -u; it then keeps root so it can write the dump.
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(["smtp-sink", *user, "-d", f"{dump}/msg.", f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await _wait_for_listener(port, proc)
        path = message(tmp_path)
        result = await send(reactor, ("127.0.0.1", port), [tx(path, ("b@dst.test", "c@dst.test"))],
                            ClientOptions("client.test"))
        await wait_until(lambda: any(dump.iterdir()))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert result.connection_error is None
    assert outcomes(result) == {"b@dst.test": (250, Outcome.DELIVERED),
                                "c@dst.test": (250, Outcome.DELIVERED)}
    [dumped] = list(dump.iterdir())
    text = dumped.read_bytes()
    assert b"X-Mail-Args: <a@src.test>" in text
    assert b"X-Rcpt-Args: <b@dst.test>" in text and b"X-Rcpt-Args: <c@dst.test>" in text
    # smtp-sink stores lines with LF endings, dots un-stuffed.
    assert BODY.replace(b"\r\n", b"\n") in text


@pytest_twisted.ensureDeferred
async def test_small_message_in_one_write_bigger_one_streamed(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    producers: list[Any] = []
    original = protocol._BodyProducer.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        producers.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(protocol._BodyProducer, "__init__", spy)
    small = b".starts with a dot\nbare LF\r\n" + b"x" * (protocol.SMALL_BODY - 100) + b"\r\n.\r\nend"
    big = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n.\r\n") * 400
    assert len(small) <= protocol.SMALL_BODY < len(big)
    async with running() as sink:
        result = await deliver(sink, [tx(message(tmp_path, small, "small"), ("a@dst.test",)),
                                      tx(message(tmp_path, big, "big"), ("b@dst.test",))])
    assert [outcomes(result, i) for i in (0, 1)] == [{"a@dst.test": (250, Outcome.DELIVERED)},
                                                     {"b@dst.test": (250, Outcome.DELIVERED)}]
    assert len(producers) == 1  # only the big one needed a producer
    small_raw, big_raw = (m.raw for m in sink.messages)
    assert small_raw == (b"..starts with a dot\r\nbare LF\r\n" + b"x" * (protocol.SMALL_BODY - 100)
                         + b"\r\n..\r\nend\r\n.\r\n")
    assert big_raw == b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n..\r\n") * 400 + b".\r\n"


def test_one_reply_timer_per_connection_moved_to_each_wait() -> None:
    """The client keeps one timer per connection: each wait moves it to its own
    deadline; running out while nothing is awaited does nothing; a wait after
    that gets a new one; the connection's end stops it."""
    from twisted.internet.testing import StringTransport

    clock = Clock()
    proto = protocol.SMTPClientProtocol(clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    first = proto.read_reply(300, "the greeting")
    timer = proto._timer
    clock.advance(299)
    proto.dataReceived(b"220 sink.test ESMTP\r\n")
    assert first.result.code == 220
    assert clock.getDelayedCalls() == [timer]  # kept, not cancelled and made again
    second = proto.read_reply(60, "the reply to MAIL")
    assert proto._timer is timer and timer.getTime() == 299 + 60
    clock.advance(59)
    proto.dataReceived(b"250 ok\r\n")
    assert second.result.code == 250
    clock.advance(10)  # idle between transactions: the timer runs out harmlessly
    assert proto.alive and not transport.disconnecting and clock.getDelayedCalls() == []
    third = proto.read_reply(120, "the reply to DATA")
    clock.advance(119)
    assert not third.called
    clock.advance(1)
    failures = []
    third.addErrback(failures.append)
    assert "timeout after 120s waiting for the reply to DATA" in failures[0].getErrorMessage()
    fourth_conn = protocol.SMTPClientProtocol(clock)
    fourth_conn.makeConnection(StringTransport())
    fourth_conn.read_reply(300, "the greeting")
    fourth_conn.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []  # the connection's end stopped its timer
