"""The daily TLS report (RFC 8460) is DKIM-signed with the configured key of its
From domain (§3 "SHOULD"), as mail submitted over SMTP is: the report enters the
queue through the Intake, which does not sign, so the reporter signs it.  The
report goes out through the real queue runner and remote courier to an MX sink
on loopback; the signature is verified against the key published in the
loopback DNS server, by the MTA's own DKIM verifier."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from mta.delivery.tlsrpt import ReportSettings, TLSReporter
from mta.policy import dkim
from mta.queue.runner import QueueRunner, Router
from tests.harness import start_mta
from tests.test_mtasts_delivery import dns, setup, zone  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_the_report_mail_carries_a_dkim_signature_that_verifies(setup, dns, tmp_path):  # noqa: F811
    key = tmp_path / "rpt1.pem"
    record = dkim.generate_key("rsa", key)  # the TXT record's text
    dns.load(zone("dst.test"))
    dns.load({"_smtp._tls.dst.test": {"TXT": ["v=TLSRPTv1; rua=mailto:reports@rpt.test"]},
              "rpt.test": {"MX": [(10, "mx.rpt.test")]}, "mx.rpt.test": {"A": ["127.0.0.1"]},
              "rpt1._domainkey.example.test": {"TXT": [record]}})
    courier = await setup.start()
    assert courier.tlsrpt.signer is None  # built without a signer: nothing to sign with
    # The daemon hands its reporter the signer of the SMTP side ([dkim] keys).
    mta = await start_mta(tmp_path / "mta", runner=None, extra={
        "tls_reports": {"enabled": True},
        "dkim": {"keys": [{"domain": "example.test", "selector": "rpt1", "key_file": str(key)}]}})
    try:
        reporter = mta.service.runner.router.couriers["remote"].tlsrpt
        signer = reporter.signer
        assert signer is mta.service.context.authenticator.signer
        assert isinstance(signer, dkim.DKIMSigner)
    finally:
        await mta.stop()

    clock = Clock()
    clock.advance(time.time() - 86400)
    reporter = TLSReporter(setup.store, courier.sts.txt_resolver, clock, tmp_path / "tlsrpt",
                           ReportSettings("out.example.test", "Out Org",
                                          "postmaster@out.example.test",
                                          "tlsrpt@out.example.test"),
                           signer=signer)
    reporter.record("dst.test", "sts", "success", "mx.dst.test")
    clock.advance(86400)  # the next day: yesterday's report is due
    router = Router({"remote": courier, "local": None, "pipe": None})
    runner = QueueRunner(setup.store, router, clock, setup.config.delivery, "out.example.test")
    runner.start()
    try:
        reporter.start()
        for _ in range(500):
            if any(m.recipients == ["reports@rpt.test"] for m in setup.sink.messages):
                break
            clock.advance(0)
            await deferLater(reactor, 0.01, lambda: None)
    finally:
        reporter.stop()
        await runner.stop()
    [mail] = [m for m in setup.sink.messages if m.recipients == ["reports@rpt.test"]]
    assert mail.data.startswith(b"DKIM-Signature: ")
    # The From domain out.example.test has no key of its own: its parent's signed
    # (relaxed DMARC alignment, as the submission path does).
    [result] = await dkim.verify(mail.data, dkim.make_dns_txt(dns.dns_config()))
    assert (result.result, result.domain, result.selector) == ("pass", "example.test", "rpt1")
    # Changed on the way, it would not verify: the signature covers the report.
    tampered = mail.data.replace(b"Subject: Report Domain: dst.test", b"Subject: Report Domain: dst.tesT")
    assert tampered != mail.data
    [broken] = await dkim.verify(tampered, dkim.make_dns_txt(dns.dns_config()))
    assert broken.result == "fail"
