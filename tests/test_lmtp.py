"""LMTP delivery (RFC 2033): the client's LMTP mode, the LMTP courier and its wiring.

Every test talks to the scripted sink in LMTP mode over a real UNIX socket or
real TCP on 127.0.0.1 and checks what a user would see: each recipient's
outcome and reply, the commands the server received and the bytes it stored.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString
from twisted.internet.ssl import Certificate

from mta.config import ConfigError, config_from_dict
from mta.delivery.client import ClientOptions, OutboundMessage, Timeouts, send
from mta.delivery.lmtp import LMTPCourier
from mta.delivery.wiring import build_couriers
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from tests.sink import Sink, start_sink

SENDER = "alice@example.org"
ALICE, BOB, CAROL = "alice@x.test", "bob@x.test", "carol@x.test"
BODY = (b"Received: from client by mx.example.com\r\nSubject: hello\r\n"
        b"From: Alice <alice@example.org>\r\n\r\nline one\r\n.leading dot\r\n.\r\n"
        b"..two dots\r\nlast line\r\n")
CA = trustme.CA()
CERT = CA.issue_cert("lmtp.test")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path holds 108 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="lmtp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rcpt(mailbox: str, original: str | None = None) -> Recipient:
    return Recipient(address=mailbox or original or "", kind=RecipientKind.LOCAL,
                     original=original or mailbox, mailbox=mailbox)


def envelope(*recipients: Recipient, sender: str = SENDER) -> Envelope:
    return Envelope(id="0000lmtp0001", sender=sender, recipients=list(recipients),
                    created=time.time())


def message(tmp_path: Path, data: bytes = BODY) -> Path:
    path = tmp_path / "msg"
    path.write_bytes(data)
    return path


@asynccontextmanager
async def running(where: str, sock_dir: Path, **options: Any) -> AsyncIterator[Sink]:
    unix_path = str(sock_dir / "lmtp.sock") if where == "unix" else None
    sink = await start_sink(unix_path=unix_path, lmtp=True, **options)
    try:
        yield sink
    finally:
        await sink.stop()


async def deliver(endpoint: str, recipients: list[Recipient], data_path: Path,
                  timeouts: Timeouts | None = None) -> list[DeliveryResult]:
    courier = LMTPCourier(endpoint, reactor, "mta.test", timeouts)
    return await courier.deliver(envelope(*recipients), recipients, data_path)


def summary(results: list[DeliveryResult]) -> dict[str, tuple[Outcome, str]]:
    return {r.recipient.original: (r.outcome, r.reply) for r in results}


def verbs(sink: Sink, session: int = 0) -> list[str]:
    return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in sink.sessions[session].commands]


# --- per-recipient replies ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["unix", "tcp"])
@pytest.mark.parametrize("pipelining", [True, False])
@pytest_twisted.ensureDeferred
async def test_each_recipient_gets_its_own_reply_after_data(
        tmp_path: Path, sock_dir: Path, where: str, pipelining: bool) -> None:
    replies = {f"DATA_END:{BOB}": "452 4.2.2 <bob@x.test> mailbox full",
               f"DATA_END:{CAROL}": "550 5.1.1 <carol@x.test> no such mailbox"}
    async with running(where, sock_dir, replies=replies, pipelining=pipelining) as sink:
        assert sink.endpoint.startswith(f"{where}:")
        results = await deliver(sink.endpoint, [rcpt(ALICE), rcpt(BOB), rcpt(CAROL)],
                                message(tmp_path))
    assert summary(results) == {
        ALICE: (Outcome.DELIVERED, "250 2.0.0 <alice@x.test> Ok: delivered as M1"),
        BOB: (Outcome.DEFERRED, "452 4.2.2 <bob@x.test> mailbox full"),
        CAROL: (Outcome.FAILED, "550 5.1.1 <carol@x.test> no such mailbox"),
    }
    assert [r.status for r in results] == ["2.0.0", "4.2.2", "5.1.1"]
    assert verbs(sink) == ["LHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    assert sink.sessions[0].helo == "mta.test"
    assert sink.sessions[0].commands[1] == f"MAIL FROM:<{SENDER}> SIZE={len(BODY)}"
    [msg] = sink.messages
    assert (msg.sender, msg.recipients, msg.delivered_to) == (SENDER, [ALICE, BOB, CAROL], [ALICE])


@pytest_twisted.ensureDeferred
async def test_a_refused_rcpt_has_no_reply_after_data(tmp_path: Path, sock_dir: Path) -> None:
    """RFC 2033 §4.2: only accepted recipients are answered after the final dot."""
    replies = {f"RCPT:{BOB}": "550 5.1.1 <bob@x.test> unknown user",
               f"DATA_END:{CAROL}": "452 4.2.2 <carol@x.test> over quota"}
    async with running("unix", sock_dir, replies=replies) as sink:
        # A client that waited for a third reply would time out and leave carol unanswered.
        results = await deliver(sink.endpoint, [rcpt(ALICE), rcpt(BOB), rcpt(CAROL)],
                                message(tmp_path), Timeouts(data_end=3.0))
    assert summary(results) == {
        ALICE: (Outcome.DELIVERED, "250 2.0.0 <alice@x.test> Ok: delivered as M1"),
        BOB: (Outcome.FAILED, "550 5.1.1 <bob@x.test> unknown user"),
        CAROL: (Outcome.DEFERRED, "452 4.2.2 <carol@x.test> over quota"),
    }
    [msg] = sink.messages
    assert msg.recipients == [ALICE, CAROL] and msg.delivered_to == [ALICE]
    assert verbs(sink)[-1] == "QUIT"  # the session ended normally, nothing left waiting


@pytest_twisted.ensureDeferred
async def test_connection_lost_between_replies_defers_the_rest(tmp_path: Path, sock_dir: Path) -> None:
    async with running("unix", sock_dir, drop={f"DATA_END:{BOB}"}) as sink:
        results = await deliver(sink.endpoint, [rcpt(ALICE), rcpt(BOB), rcpt(CAROL)],
                                message(tmp_path))
    by = {r.recipient.original: r for r in results}
    assert by[ALICE].outcome is Outcome.DELIVERED
    for who in (BOB, CAROL):
        assert by[who].outcome is Outcome.DEFERRED
        assert by[who].reply.startswith(f"LMTP {sink.endpoint}: lost connection")
        assert by[who].status == "4.4.2"
    assert sink.sessions[0].dropped_at == "DATA_END"


@pytest_twisted.ensureDeferred
async def test_421_for_one_recipient_defers_it_and_the_rest(tmp_path: Path, sock_dir: Path) -> None:
    replies = {f"DATA_END:{BOB}": "421 4.3.2 shutting down"}
    async with running("tcp", sock_dir, replies=replies) as sink:
        results = await deliver(sink.endpoint, [rcpt(ALICE), rcpt(BOB), rcpt(CAROL)],
                                message(tmp_path))
    outcomes = {r.recipient.original: (r.outcome, r.status) for r in results}
    assert outcomes == {ALICE: (Outcome.DELIVERED, "2.0.0"), BOB: (Outcome.DEFERRED, "4.3.2"),
                        CAROL: (Outcome.DEFERRED, "4.3.2")}
    assert "421 4.3.2 shutting down" in results[1].reply


# --- connecting ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix-refused", "unix-missing", "tcp-refused"])
@pytest_twisted.ensureDeferred
async def test_unreachable_server_defers_everyone(tmp_path: Path, sock_dir: Path, kind: str) -> None:
    holder = socket.socket(socket.AF_UNIX if kind.startswith("unix") else socket.AF_INET)
    try:
        if kind == "unix-refused":  # a socket file nobody listens on
            holder.bind(str(sock_dir / "dead.sock"))
            endpoint = f"unix:{sock_dir / 'dead.sock'}"
        elif kind == "unix-missing":
            endpoint = f"unix:{sock_dir / 'missing.sock'}"
        else:  # a bound TCP port without listen() refuses connections
            holder.bind(("127.0.0.1", 0))
            endpoint = f"tcp:127.0.0.1:{holder.getsockname()[1]}"
        results = await deliver(endpoint, [rcpt(ALICE), rcpt(BOB)], message(tmp_path))
    finally:
        holder.close()
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    for r in results:
        assert r.status == "4.4.1"
        assert r.reply.startswith(f"LMTP {endpoint}: connect to {endpoint} failed:")


# --- the message --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_message_arrives_byte_exact(tmp_path: Path, sock_dir: Path) -> None:
    lines = []
    for i in range(40_000):  # about 730 KB: many chunks, dots at every kind of place
        lines.append([b".", b"..", b".dot %d" % i, b"plain line %d" % i, b"", b"x" * 70][i % 6])
    body = BODY + b"\r\n".join(lines) + b"\r\n.\r\nend\r\n"
    async with running("unix", sock_dir) as sink:
        results = await deliver(sink.endpoint, [rcpt(ALICE)], message(tmp_path, body))
    assert results[0].outcome is Outcome.DELIVERED
    [msg] = sink.messages
    assert msg.data == body  # exactly the queue file: no prelude added, CRLF kept
    assert b"\r\n..dot 2\r\n" in msg.raw and msg.raw.endswith(b"end\r\n.\r\n")


@pytest_twisted.ensureDeferred
async def test_same_mailbox_twice_is_one_rcpt(tmp_path: Path, sock_dir: Path) -> None:
    both = [rcpt(ALICE, "a1@y.test"), rcpt(ALICE, "a2@y.test")]
    async with running("unix", sock_dir) as sink:
        results = await deliver(sink.endpoint, both, message(tmp_path))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [r.recipient for r in results] == both
    assert sink.sessions[0].commands.count(f"RCPT TO:<{ALICE}>") == 1


@pytest_twisted.ensureDeferred
async def test_unusable_mailboxes_fail_without_being_sent(tmp_path: Path, sock_dir: Path) -> None:
    nobody = rcpt("", "nobody@x.test")
    evil = rcpt("eve@x.test>\r\nRCPT TO:<root@x.test")
    async with running("unix", sock_dir) as sink:
        results = await deliver(sink.endpoint, [nobody, rcpt(ALICE), evil], message(tmp_path))
    assert [(r.outcome, r.status) for r in results] == [
        (Outcome.FAILED, "5.1.1"), (Outcome.DELIVERED, "2.0.0"), (Outcome.FAILED, "5.1.3")]
    assert results[0].reply == "550 5.1.1 <nobody@x.test>: no such user here"
    assert [c for c in sink.sessions[0].commands if c.startswith("RCPT")] == [f"RCPT TO:<{ALICE}>"]


@pytest_twisted.ensureDeferred
async def test_only_unusable_mailboxes_make_no_connection(tmp_path: Path, sock_dir: Path) -> None:
    async with running("unix", sock_dir) as sink:
        results = await deliver(sink.endpoint, [rcpt("", "nobody@x.test")], message(tmp_path))
    assert results[0].outcome is Outcome.FAILED
    assert sink.sessions == []


# --- the client's LMTP mode ----------------------------------------------------------------


async def send_lmtp(sink: Sink, data_path: Path, **options: Any) -> Any:
    tx = OutboundMessage(SENDER, [ALICE], data_path, data_path.stat().st_size)
    return await send(reactor, clientFromString(reactor, sink.endpoint), [tx],
                      ClientOptions("mta.test", lmtp=True, **options))


@pytest_twisted.ensureDeferred
async def test_lhlo_refused_does_not_fall_back_to_helo(tmp_path: Path) -> None:
    sink = await start_sink()  # an SMTP server: LHLO is an unknown command
    try:
        result = await send_lmtp(sink, message(tmp_path))
    finally:
        await sink.stop()
    assert verbs(sink) == ["LHLO", "QUIT"]
    assert "502 5.5.1 command not implemented (in reply to LHLO)" in result.connection_error
    assert result.transactions[0].unanswered() == [ALICE]


@pytest_twisted.ensureDeferred
async def test_lmtp_sink_refuses_ehlo_and_helo(tmp_path: Path, sock_dir: Path) -> None:
    async with running("tcp", sock_dir) as sink:
        tx = OutboundMessage(SENDER, [ALICE], message(tmp_path), len(BODY))
        result = await send(reactor, ("127.0.0.1", sink.port), [tx], ClientOptions("mta.test"))
    assert verbs(sink) == ["EHLO", "HELO", "QUIT"]  # the SMTP client's fallback, both refused
    assert result.connection_error.startswith("500 5.5.1")


@pytest_twisted.ensureDeferred
async def test_starttls_only_when_required(tmp_path: Path, sock_dir: Path) -> None:
    trust = Certificate.loadPEM(CA.cert_pem.bytes())
    async with running("unix", sock_dir, tls=CERT) as sink:
        plain = await send_lmtp(sink, message(tmp_path))  # default policy: opportunistic
        secure = await send_lmtp(sink, message(tmp_path), tls_policy="verify",
                                 tls_hostname="lmtp.test", trust_root=trust)
    assert verbs(sink, 0) == ["LHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert plain.tls == "" and plain.transactions[0].replies[ALICE].outcome is Outcome.DELIVERED
    assert verbs(sink, 1) == ["LHLO", "STARTTLS", "LHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert secure.tls_verified and secure.transactions[0].replies[ALICE].outcome is Outcome.DELIVERED
    assert [m.tls for m in sink.messages] == [False, True]


# --- configuration and wiring ---------------------------------------------------------------


def config(tmp_path: Path, **delivery: Any) -> Any:
    return config_from_dict({"hostname": "mx.test", "local_domains": ["x.test"],
                             "dns": {"servers": ["127.0.0.1:53"]}, "delivery": delivery},
                            tmp_path)


@pytest_twisted.ensureDeferred
async def test_wiring_sends_local_mail_over_lmtp(tmp_path: Path, sock_dir: Path) -> None:
    async with running("unix", sock_dir) as sink:
        couriers = build_couriers(config(tmp_path, lmtp=sink.endpoint), reactor)
        local = couriers["local"]
        assert isinstance(local, LMTPCourier)
        results = await local.deliver(envelope(rcpt(BOB)), [rcpt(BOB)], message(tmp_path))
    assert results[0].outcome is Outcome.DELIVERED
    assert sink.sessions[0].helo == "mx.test"
    assert sink.messages[0].delivered_to == [BOB]
    assert not (tmp_path / "var" / "mail").exists()  # nothing went to a Maildir


def test_wiring_without_lmtp_keeps_maildir(tmp_path: Path) -> None:
    assert type(build_couriers(config(tmp_path), reactor)["local"]).__name__ == "MaildirCourier"


def test_lmtp_and_mailbox_command_together_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, lmtp="unix:/run/dovecot/lmtp", mailbox_command="/usr/lib/dovecot/deliver")
    assert err.value.key == "delivery.lmtp"


@pytest.mark.parametrize("bad", ["", "nonsense:/x", "tcp:127.0.0.1"])
def test_bad_lmtp_endpoint_is_a_config_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, lmtp=bad)
    assert err.value.key == "delivery.lmtp"
