"""Real milters from the Debian packages, started by the tests (one each per test session):
rspamd's proxy worker in milter mode refuses GTUBE and adds its headers to a clean
message; OpenDKIM signs our users' submissions, and the signature in the delivered
mail verifies against the key served by the tests' loopback DNS server."""

from __future__ import annotations

import base64
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mta.config import DNSConfig
from mta.policy import dkim
from tests.harness import PASSWORD, RawClient, in_thread, start_mta
from tests.milter import DKIM_DOMAIN, DKIM_SELECTOR, opendkim, rspamd  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(subject: str, body: bytes) -> bytes:
    return (b"From: Alice <alice@example.test>\r\nTo: alice@example.test\r\n"
            b"Subject: " + subject.encode() + b"\r\nDate: Tue, 08 Dec 2026 01:00:00 +0000\r\n"
            b"Message-ID: <" + subject.encode() + b"@example.test>\r\n\r\n" + body + b"\r\n")


def send(port: int, body: bytes, sender: str = "someone@elsewhere.test",
         login: str | None = None) -> tuple[int, str]:
    c = RawClient(port, timeout=30)
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
    assert c.cmd("DATA")[0] == 354
    c.send(body + b".\r\n")
    reply = c.read_reply()
    c.cmd("QUIT")
    c.close()
    return reply


def delivered(tmp_path, count=1, timeout=15.0) -> list[bytes]:
    new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(new.glob("*")) if new.exists() else []
        if len(files) >= count:
            return [f.read_bytes() for f in files]
        time.sleep(0.05)
    raise AssertionError(f"nothing delivered to {new}")


async def start(tmp_path, milters: dict, lists: dict):
    tables = {name: {"socket": sock} for name, sock in milters.items()}
    return await start_mta(tmp_path, runner=None, extra={"milters": {**tables, **lists}})


@pytest_twisted.ensureDeferred
async def test_rspamd_rejects_gtube_and_marks_a_clean_message(tmp_path, rspamd):  # noqa: F811
    mta = await start(tmp_path, {"rspamd": rspamd.socket}, {"smtpd": ["rspamd"]})
    try:
        code, text = await in_thread(send, mta.port(), message("spam", GTUBE))
        assert code == 554 and text == "554 5.7.1 Gtube pattern"  # rspamd's own text
        code, text = await in_thread(send, mta.port(), message("clean", b"Hello Alice, lunch at noon?"))
        assert code == 250, text
        (mail,) = await in_thread(delivered, tmp_path)
        head = mail.split(b"\n\n")[0].decode()  # Maildir: LF line ends
        assert "\nX-Rspamd-Server: " in head
        assert "\nX-Rspamd-Queue-Id: " in head
        assert "\nX-Spamd-Result: default: False [" in head
        assert "Subject: clean" in head
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_opendkim_signs_a_submission(tmp_path, opendkim, dns_server):  # noqa: F811
    daemon, record = opendkim
    dns_server.load({f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}": {"TXT": [record]}})
    # The submission listener's own list (as master.cf's -o smtpd_milters=): OpenDKIM
    # signs there; the mx listener (smtpd) has none.
    mta = await start(tmp_path, {"opendkim": daemon.socket}, {"submission": ["opendkim"]})
    try:
        code, text = await in_thread(send, mta.port("submission"), message("signed", b"Signed."),
                                     sender="alice@example.test", login="alice@example.test")
        assert code == 250, text
        (mail,) = await in_thread(delivered, tmp_path)
        mail = mail.replace(b"\n", b"\r\n")  # Maildir's LF line ends, as it was sent
        assert b"\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;" in mail
        host, port = dns_server.address
        txt = dkim.make_dns_txt(DNSConfig(servers=((host, port),), timeout=1.0))
        (result,) = await Deferred.fromCoroutine(dkim.verify(mail, txt))
        assert result.result == "pass", result
        assert result.domain == DKIM_DOMAIN
    finally:
        await mta.stop()
