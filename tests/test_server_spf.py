"""SPF on MAIL FROM through the real server and a real DNS server on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.harness import RawClient, in_thread, start_mta

ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "softfail.test": {"TXT": ["v=spf1 ~all"]},
    "none.test": {"A": ["192.0.2.10"]},
    "broken.test": "SERVFAIL",
}


@pytest.fixture
def spf_mta(tmp_path, dns_server):
    dns_server.load(ZONE)
    host, port = dns_server.address
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(
        tmp_path,
        extra={"spf": {"enabled": True, "timeout": 3.0},
               "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0}},
    )))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


def send_from(port: int, sender: str) -> tuple[tuple[int, str], tuple[int, str] | None]:
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.pass.test")
    mail = c.cmd(f"MAIL FROM:<{sender}>")
    data = None
    if mail[0] == 250:
        c.cmd("RCPT TO:<alice@example.test>")
        c.cmd("DATA")
        c.send(b"Subject: spf\r\n\r\nbody\r\n.\r\n")
        data = c.read_reply()
    c.close()
    return mail, data


@pytest_twisted.ensureDeferred
async def test_spf_fail_rejected(spf_mta):
    mail, _ = await in_thread(send_from, spf_mta.port(), "user@fail.test")
    assert mail[0] == 550 and "5.7.23" in mail[1]
    assert spf_mta.queued() == []


@pytest.mark.parametrize("domain,result", [
    ("pass.test", "pass"),
    ("softfail.test", "softfail"),
    ("none.test", "none"),
    ("broken.test", "temperror"),
])
@pytest_twisted.ensureDeferred
async def test_spf_other_results_accepted_and_recorded(spf_mta, domain, result):
    mail, data = await in_thread(send_from, spf_mta.port(), f"user@{domain}")
    assert mail[0] == 250 and data is not None and data[0] == 250
    (env,) = spf_mta.queued()
    message = spf_mta.message_bytes(env.id)
    headers = message.split(b"\r\n\r\n")[0].decode()
    assert f"Received-SPF: {result}" in headers
    assert f"spf={result}" in headers
    assert "Authentication-Results: mx.example.test;" in headers
    # RFC 7208 §9.1: Received-SPF is prepended, above our own Received; the
    # Authentication-Results made at the end of DATA goes above both (RFC 8601 §5).
    names = [line.split(":")[0] for line in headers.split("\r\n") if line[:1] not in ("\t", " ")]
    assert names[:3] == ["Authentication-Results", "Received-SPF", "Received"]


@pytest_twisted.ensureDeferred
async def test_pipelined_mail_waits_for_spf(spf_mta):
    """Replies stay in order while the SPF check (in a thread) is pending."""
    def run():
        c = RawClient(spf_mta.port())
        c.read_reply()
        c.cmd("EHLO client.pass.test")
        c.send(b"MAIL FROM:<user@fail.test>\r\nRCPT TO:<alice@example.test>\r\n"
               b"MAIL FROM:<user@pass.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        replies = [c.read_reply()[0] for _ in range(5)]
        c.close()
        return replies

    assert await in_thread(run) == [550, 503, 250, 250, 354]


@pytest_twisted.ensureDeferred
async def test_input_while_a_check_is_pending_is_kept_in_order_and_bounded(spf_mta, monkeypatch):
    """While MAIL waits for its SPF answer the session keeps what the client
    pipelines, stops reading past BUSY_READ_LIMIT (memory stays bounded), and
    answers everything in order once the answer comes."""
    from mta.policy.spf import SPFResult
    from mta.smtp import framing as server_module

    pending: list[Deferred] = []

    def slow_check(ip, sender, helo):
        d = Deferred()
        pending.append(d)
        return d

    monkeypatch.setattr(spf_mta.context.spf, "check", slow_check)
    junk = b"x" * (3 * server_module.BUSY_READ_LIMIT)
    c = RawClient(spf_mta.port())

    def start():
        c.read_reply()
        c.cmd("EHLO client.pass.test")
        c.send(b"MAIL FROM:<user@pass.test>\r\nRCPT TO:<alice@example.test>\r\n")
        c.sock.settimeout(2)
        try:  # the server stops reading: this may block until the timeout
            c.sock.sendall(junk)
        except TimeoutError:
            pass

    await in_thread(start)
    (session,) = spf_mta.context.sessions
    for _ in range(200):  # bounded: up to 2 s for the reactor to read what was sent
        if session._paused:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert len(pending) == 1 and session._paused
    assert len(session._buf) <= server_module.BUSY_READ_LIMIT + 65536
    pending[0].callback(SPFResult("pass", "", "pass.test", "mailfrom"))

    def finish():
        c.sock.settimeout(10)
        c.send(b"\r\nQUIT\r\n")
        return [c.read_reply()[0] for _ in range(4)]

    # MAIL, RCPT, the over-long junk line, QUIT.
    assert await in_thread(finish) == [250, 250, 500, 221]
    c.close()


@pytest_twisted.ensureDeferred
async def test_a_2040_octet_helo_never_makes_a_header_line_over_998(tmp_path, dns_server):
    """helo_check = "off" takes a 2040-character EHLO name; Received-SPF (helo=) and
    Authentication-Results (smtp.helo for a null sender) carry it, yet every header
    line in the queue file is at most 998 octets, and the message passes through
    our own server, which refuses longer lines (550 5.6.0)."""
    from mta.delivery.client import ClientOptions, OutboundMessage, send
    from mta.queue.courier import Outcome

    dns_server.load(ZONE)
    host, port = dns_server.address
    name = "x" * 2040
    mta = await start_mta(tmp_path / "a", extra={
        "helo_check": "off", "spf": {"enabled": True, "timeout": 3.0},
        "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0}})
    other = await start_mta(tmp_path / "b")
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            replies = [c.cmd(f"EHLO {name}")]
            for sender in ("user@pass.test", ""):
                replies += [c.cmd(f"MAIL FROM:<{sender}>"), c.cmd("RCPT TO:<alice@example.test>"),
                            c.cmd("DATA"), c.cmd(b"Subject: long helo\r\n\r\nbody\r\n.")]
            c.close()
            return [code for code, _ in replies]

        assert await in_thread(run) == [250] + [250, 250, 354, 250] * 2
        messages = [mta.message_bytes(env.id) for env in mta.queued()]
        assert len(messages) == 2
        for data in messages:
            header = data.split(b"\r\n\r\n")[0]
            assert max(len(line) for line in header.split(b"\r\n")) <= 998
            assert b"Received-SPF: " in header and b"Authentication-Results: " in header
        assert any(b"smtp.helo=xxx" in data for data in messages)
        assert all(b"helo=" + b"x" * 900 in data for data in messages)  # cut, not dropped

        for i, data in enumerate(messages):
            path = tmp_path / f"msg{i}"
            path.write_bytes(data)
            result = await send(reactor, ("127.0.0.1", other.port()),
                                [OutboundMessage("user@pass.test", ["alice@example.test"], path, len(data))],
                                ClientOptions("client.test"))
            assert result.connection_error is None
            (reply,) = result.transactions[0].replies.values()
            assert reply.outcome is Outcome.DELIVERED, str(reply)
        assert len(other.queued()) == 2
    finally:
        await mta.stop()
        await other.stop()
