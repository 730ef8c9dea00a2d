"""DKIM, DMARC and Authentication-Results through the real server and loopback DNS.

Inbound mail gets one Authentication-Results header (SPF, DKIM, DMARC) and a forged
one claiming our name is removed; mail from our users is DKIM-signed at queue time;
DMARC p=reject is recorded, and refused only when configured.
"""

from __future__ import annotations

import base64

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from mta.daemon.logs import classic_formatter
from mta.policy.dkim import DKIMSigner, dns_record_name, generate_key, make_dns_txt, verify
from tests.harness import PASSWORD, RawClient, in_thread, start_mta

SIGNED_DOMAIN = "signed.test"


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("dkim") / "sel1.pem"
    return path, generate_key("ed25519", path)


def message_from(domain: str, subject: str = "hello") -> bytes:
    return (f"From: Someone <someone@{domain}>\r\nTo: alice@example.test\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject}@{domain}>\r\n\r\nbody line\r\n").encode()


def zone(key_txt: str) -> dict:
    return {
        SIGNED_DOMAIN: {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        dns_record_name("sel1", SIGNED_DOMAIN): {"TXT": [key_txt]},
        f"_dmarc.{SIGNED_DOMAIN}": {"TXT": ["v=DMARC1; p=reject"]},
        "strict.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject"]},
    }


async def start(tmp_path, dns_server, **extra):
    host, port = dns_server.address
    settings = {"spf": {"enabled": True, "reject_fail": False},
                "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0},
                "dkim": {"verify": True}, "dmarc": {"enabled": True}}
    for k, v in extra.items():
        settings[k] = {**settings.get(k, {}), **v}
    return await start_mta(tmp_path, extra=settings)


def send(port: int, sender: str, body: bytes, login: str | None = None,
         chunked: bool = False) -> tuple[int, str]:
    """One message by DATA, or (``chunked``) in two BDAT chunks (RFC 3030)."""
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    if login:
        c.cmd("STARTTLS")
        c.starttls()
        c.cmd("EHLO client.test")
        token = base64.b64encode(f"\0{login}\0{PASSWORD}".encode()).decode()
        assert c.cmd("AUTH PLAIN " + token)[0] == 235
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    if chunked:
        half = len(body) // 2
        c.send(b"BDAT %d\r\n%s" % (half, body[:half]))
        assert c.read_reply()[0] == 250
        c.send(b"BDAT %d LAST\r\n%s" % (len(body) - half, body[half:]))
    else:
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\n")
    reply = c.read_reply()
    c.close()
    return reply


def headers_of(data: bytes) -> str:
    return data.split(b"\r\n\r\n")[0].decode()


@pytest.mark.parametrize("chunked", [False, True], ids=["DATA", "BDAT"])
@pytest_twisted.ensureDeferred
async def test_inbound_signed_message_gets_one_authentication_results(tmp_path, dns_server, key,
                                                                      chunked):
    path, txt = key
    dns_server.load(zone(txt))
    signer = DKIMSigner({SIGNED_DOMAIN: [("sel1", path)]})
    body = message_from(SIGNED_DOMAIN)
    signed = b"\r\n".join(signer.sign(body, SIGNED_DOMAIN)) + b"\r\n" + body
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
    mta = await start(tmp_path, dns_server)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, _ = await in_thread(send, mta.port(), f"someone@{SIGNED_DOMAIN}", forged + signed,
                                  chunked=chunked)
        assert code == 250
        # The log line holds the header's value unfolded: one line, no CR/LF.
        (logged,) = [e for e in events if e.get("event") == "msgauth"]
        assert "\r" not in logged["header"] and "\n" not in logged["header"]
        assert logged["header"].startswith("Authentication-Results: mx.example.test;")
        assert "dkim=pass" in logged["header"] and "dmarc=pass" in logged["header"]
        assert classic_formatter()(logged).count("\n") == 1
        (env,) = mta.queued()
        headers = headers_of(mta.message_bytes(env.id))
        assert headers.count("Authentication-Results:") == 1
        ar = headers.split("Authentication-Results:")[1].split("\r\n\t")[0:6]
        ar_text = " ".join(ar)
        assert "spf=pass" in ar_text and "dkim=pass" in ar_text and "dmarc=pass" in ar_text
        assert "bank.test" not in headers  # the forged field is gone
        # Each hop's fields go on top (RFC 8601 §5, RFC 7208 §9.1): A-R (made last),
        # Received-SPF, our Received, then the message's own header.
        assert headers.startswith("Authentication-Results:")
        assert headers.index("Authentication-Results:") < headers.index(
            "Received-SPF:") < headers.index("Received:") < headers.index("DKIM-Signature:")
    finally:
        globalLogPublisher.removeObserver(events.append)
        await mta.stop()


@pytest.mark.parametrize("reject", [False, True])
@pytest_twisted.ensureDeferred
async def test_dmarc_reject_recorded_or_enforced(tmp_path, dns_server, key, reject):
    dns_server.load(zone(key[1]))
    mta = await start(tmp_path, dns_server, dmarc={"reject": reject})
    try:
        code, text = await in_thread(send, mta.port(), "someone@strict.test", message_from("strict.test"))
        if reject:
            assert code == 550 and "5.7.1" in text and "DMARC" in text
            assert mta.queued() == []
        else:
            assert code == 250
            (env,) = mta.queued()
            headers = headers_of(mta.message_bytes(env.id))
            assert "spf=fail" in headers and "dmarc=fail" in headers
    finally:
        await mta.stop()


def send_twice(port: int) -> list[tuple[int, str]]:
    """Two transactions on one session: one DMARC refuses, then one it passes."""
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    replies = []
    for sender, rcpt, domain in (("someone@strict.test", "alice@example.test", "strict.test"),
                                 ("someone@other.test", "bob@example.test", "other.test")):
        assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(message_from(domain) + b".\r\n")
        replies.append(c.read_reply())
    c.close()
    return replies


@pytest_twisted.ensureDeferred
async def test_transaction_after_dmarc_refusal_has_its_own_received_header(tmp_path, dns_server, key):
    # The refused message's queue writer (made ready at its 354, with a Received
    # header naming alice) must not be reused by the next transaction.
    dns_server.load(zone(key[1]))
    mta = await start(tmp_path, dns_server, dmarc={"reject": True})
    try:
        (first, second) = await in_thread(send_twice, mta.port())
        assert first[0] == 550 and "DMARC" in first[1]
        assert second[0] == 250
        (env,) = mta.queued()
        headers = headers_of(mta.message_bytes(env.id))
        assert headers.count("Received:") == 1
        assert "for <bob@example.test>" in headers and "alice@example.test>;" not in headers
        assert env.id in headers.split("Received:")[1]  # the Received header's own id
    finally:
        await mta.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["DATA", "BDAT"])
@pytest_twisted.ensureDeferred
async def test_submission_is_dkim_signed_and_verifies(tmp_path, dns_server, key, chunked):
    path, txt = key
    dns_server.load(zone(txt))
    mta = await start(tmp_path, dns_server, dkim={
        "keys": [{"domain": SIGNED_DOMAIN, "selector": "sel1", "key_file": str(path)}]})
    (tmp_path / "domains" / "example.test" / "identities").write_text(f"alice: @{SIGNED_DOMAIN}\n")
    mta.service.reload()
    try:
        code, _ = await in_thread(send, mta.port("submission"), f"alice@{SIGNED_DOMAIN}",
                                  message_from(SIGNED_DOMAIN), login="alice@example.test",
                                  chunked=chunked)
        assert code == 250
        (env,) = mta.queued()
        data = mta.message_bytes(env.id)
        assert b"DKIM-Signature:" in data and b"d=signed.test" in data
        # Our signature is on top, above our Received (each hop prepends its fields).
        assert data.startswith(b"DKIM-Signature:")
        # What leaves (minus our own Received header) verifies against the published key.
        above, _, below = data.partition(b"\r\nReceived: ")
        below = below.split(b"\r\n", 1)[1]
        while below.startswith((b"\t", b" ")):
            below = below.split(b"\r\n", 1)[1]
        message = above + b"\r\n" + below
        host, port = dns_server.address
        from mta.config import DNSConfig

        results = await Deferred.fromCoroutine(verify(message, make_dns_txt(DNSConfig(((host, port),), 1.0))))
        assert [r.result for r in results] == ["pass"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_large_message_streamed_with_spf_only(tmp_path, dns_server, key):
    dns_server.load(zone(key[1]))
    mta = await start(tmp_path, dns_server, dkim={"max_message_size": 2000})
    try:
        body = message_from(SIGNED_DOMAIN) + (b"x" * 70 + b"\r\n") * 100
        assert len(body) > 2000
        code, _ = await in_thread(send, mta.port(), f"someone@{SIGNED_DOMAIN}", body)
        assert code == 250
        (env,) = mta.queued()
        data = mta.message_bytes(env.id)
        assert data.endswith(body)
        headers = headers_of(data)
        assert "spf=pass" in headers and "dkim=" not in headers
        # Streamed to disk as it came, the trace fields still stand in order on top.
        assert data.startswith(b"Authentication-Results:")
        assert headers.index("Received-SPF:") < headers.index("Received:")
    finally:
        await mta.stop()
