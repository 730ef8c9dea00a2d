"""DANE (RFC 7672) end to end: a real validating resolver, signed zones, a TLS sink.

The session's :class:`DaneWorld` signs the test zones with ldns, serves them
with NSD and puts Unbound (trusting the zones' keys) in front as the MTA's
validating resolver (:mod:`tests.dnssec`).  Every MX host is 127.0.0.1, where a
sink presents a certificate issued by an intermediate CA of the test CA; the
TLSA records name that certificate (DANE-EE), that intermediate (DANE-TA), or
something else (mismatch).  The MTA delivers through its queue runner, with
``delivery.tls_policy = "dane"``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.names import dns

from mta.delivery.dane import DanePolicy, TLSARecord, TLSAVerifier
from mta.system.dns import ValidatingResolver
from tests.dnssec import BOGUS, INSECURE, ValidatingDNS, Zone
from tests.harness import RawClient, in_thread, message_files, shared_ca, start_mta
from tests.sink import start_sink

pytestmark = pytest.mark.slow

MX_HOSTS = ("mx-pass", "mx-ta", "mx-bad", "mx-none", "mx-tamper", "mx-unusable")


def _spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _cert_sha256(pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()


class DaneWorld:
    """The signed zones, their servers and the receiving certificate (session-wide)."""

    def __init__(self, root: Path) -> None:
        self.issuer = shared_ca().create_child_ca()
        self.cert = self.issuer.issue_cert(*(f"{h}.dane.test" for h in MX_HOSTS),
                                           "mx.plain.test")
        leaf_pem = self.cert.cert_chain_pems[0].bytes()
        issuer_pem = self.cert.cert_chain_pems[1].bytes()
        ee, ta = _spki_sha256(leaf_pem), _cert_sha256(issuer_pem)
        other = hashlib.sha256(b"some other key").hexdigest()
        records = [f"{h.removeprefix('mx-')} IN MX 10 {h}" for h in MX_HOSTS]
        records += [f"{h} IN A 127.0.0.1" for h in MX_HOSTS]
        records += [
            f"_25._tcp.mx-pass IN TLSA 3 1 1 {ee}",
            f"_25._tcp.mx-ta IN TLSA 2 0 1 {ta}",
            f"_25._tcp.mx-bad IN TLSA 3 1 1 {other}",
            f"_25._tcp.mx-tamper IN TLSA 3 1 1 {ee}",
            f"_25._tcp.mx-unusable IN TLSA 1 1 1 {other}",  # PKIX-EE: not for SMTP
        ]
        # An MTA-STS policy beside DANE (tests/test_mtasts_delivery.py: DANE goes first).
        records += ['_mta-sts.pass IN TXT "v=STSv1; id=1"', "mta-sts.pass IN A 127.0.0.1",
                    '_mta-sts.none IN TXT "v=STSv1; id=1"', "mta-sts.none IN A 127.0.0.1"]
        self.dns = ValidatingDNS(root, [
            Zone("dane.test", records, tamper=("_25._tcp.mx-tamper",)),
            Zone("bogus.test", ["@ IN MX 10 mx", "mx IN A 127.0.0.1",
                                f"_25._tcp.mx IN TLSA 3 1 1 {ee}"], kind=BOGUS),
            Zone("plain.test", ["@ IN MX 10 mx", "mx IN A 127.0.0.1",
                                f"_25._tcp.mx IN TLSA 3 1 1 {other}"], kind=INSECURE),
        ])

    def start(self) -> None:
        self.dns.start()

    def stop(self) -> None:
        self.dns.stop()

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.dns.port}"


class Counted:
    """Records what the DANE policy counts for TLS reporting (the TLSReport seam)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def record(self, domain: str, policy_type: str, result: str, mx: str, details: str) -> None:
        self.rows.append((domain, policy_type, result, mx))


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


async def start(tmp_path: Path, world: DaneWorld, sink_port: int, policy: str = "dane",
                **dane):
    running = await start_mta(tmp_path, runner=None, extra={
        "relay_networks": ["127.0.0.0/8"],
        "dns": {"servers": [world.resolver], "timeout": 2.0, "cache_max_ttl": 0},
        "dane": {"enabled": True, "check_name": "dane.test", "check_bogus": "bogus.test", **dane},
        "delivery": {"tls_policy": policy, "mx_port": sink_port, "retry_schedule": [600],
                     "retry_jitter": 0}})
    courier = running.service.runner.router.couriers["remote"]
    courier.dane.report = Counted()
    await wait_for(lambda: courier.dane.available is not None, what="the DNSSEC check")
    return running, courier


def send(port: int, rcpt: str, headers: str = "", requiretls: bool = False) -> None:
    c = RawClient(port)
    try:
        assert c.read_reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        if requiretls:
            assert c.cmd("STARTTLS")[0] == 220
            c.starttls()
            assert c.cmd("EHLO client.test")[0] == 250
        mail = "MAIL FROM:<alice@example.test>" + (" REQUIRETLS" if requiretls else "")
        assert c.cmd(mail)[0] == 250
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(f"Subject: dane\r\n{headers}\r\nsecret body\r\n.")[0] == 250
        c.cmd("QUIT")
    finally:
        c.close()


async def attempted(running) -> object:
    """The one queued message's recipient after its first attempt."""
    await wait_for(lambda: any(r.attempts for e in running.queued() for r in e.recipients),
                   what="a delivery attempt")
    (env,) = running.queued()
    return env.recipients[0]


@pytest.fixture
def dane_sink(dane_world):
    from twisted.internet.defer import ensureDeferred

    sink = pytest_twisted.blockon(ensureDeferred(start_sink(tls=dane_world.cert)))
    yield sink
    pytest_twisted.blockon(ensureDeferred(sink.stop()))


def test_resolver_validates(dane_world):
    """The test set-up itself: Unbound validates the signed zone and refuses the bogus one."""
    assert dane_world.dns.query("_25._tcp.mx-pass.dane.test", "TLSA")[:2] == (0, True)
    assert dane_world.dns.query("bogus.test", "MX")[0] == 2  # SERVFAIL
    assert dane_world.dns.query("_25._tcp.mx-tamper.dane.test", "TLSA")[0] == 2
    assert dane_world.dns.query("plain.test", "MX")[:2] == (0, False)


@pytest_twisted.ensureDeferred
async def test_validating_resolver_reports_the_ad_bit(dane_world):
    resolver = ValidatingResolver([dane_world.dns.address], 2.0, reactor)
    secure = await resolver.query("_25._tcp.mx-pass.dane.test", 52)
    assert (secure.rcode, secure.secure) == (dns.OK, True)
    (record,) = [TLSARecord.from_rdata(p.data) for p in secure.records(52)]
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1) and record.usable
    insecure = await resolver.query("plain.test", dns.MX)
    assert (insecure.rcode, insecure.secure) == (dns.OK, False)
    bogus = await resolver.query("bogus.test", dns.MX)
    assert bogus.rcode == dns.ESERVER


@pytest_twisted.ensureDeferred
async def test_dane_ee_pass_delivers_over_tls(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        assert courier.dane.available is True
        await in_thread(send, running.port(), "bob@pass.dane.test")
        await wait_for(lambda: dane_sink.messages, what="the message at the sink")
        (msg,) = dane_sink.messages
        assert msg.tls and msg.recipients == ["bob@pass.dane.test"]
        assert b"secret body" in msg.data
        await wait_for(lambda: not message_files(running.store.msg_dir), what="the queue to empty")
        assert ("pass.dane.test", "tlsa", "success", "mx-pass.dane.test") in courier.dane.report.rows
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_dane_ta_pass_checks_chain_and_name(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@ta.dane.test")
        await wait_for(lambda: dane_sink.messages, what="the message at the sink")
        assert dane_sink.messages[0].tls
        await wait_for(lambda: not message_files(running.store.msg_dir), what="the queue to empty")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_tlsa_mismatch_defers_and_sends_nothing(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@bad.dane.test")
        r = await attempted(running)
        assert r.state == "deferred"
        assert "TLS authentication failed" in r.last_reply
        assert "no TLSA record matches" in r.last_reply
        assert dane_sink.messages == []
        # The session went as far as the handshake and not one command further.
        (session,) = dane_sink.sessions
        assert session.tls and session.commands == ["EHLO mx.example.test", "STARTTLS"]
        assert ("bad.dane.test", "tlsa", "tlsa-invalid", "mx-bad.dane.test") in courier.dane.report.rows
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_bogus_zone_defers_without_connecting(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@bogus.test")
        r = await attempted(running)
        assert r.state == "deferred"
        assert "SERVFAIL" in r.last_reply
        assert dane_sink.sessions == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_bogus_tlsa_defers_and_is_counted(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@tamper.dane.test")
        r = await attempted(running)
        assert r.state == "deferred"
        assert "4.7.5" in r.last_reply or "DANE" in r.last_reply
        assert "the TLSA records do not validate" in r.last_reply
        assert dane_sink.sessions == []
        assert ("tamper.dane.test", "tlsa", "dnssec-invalid",
                "mx-tamper.dane.test") in courier.dane.report.rows
    finally:
        await running.stop()


@pytest.mark.parametrize("rcpt", ["bob@none.dane.test", "bob@plain.test"])
@pytest_twisted.ensureDeferred
async def test_no_usable_dane_falls_back_to_opportunistic(tmp_path, dane_world, rcpt):
    # No TLSA records (secure), or an insecure zone whose TLSA would not match:
    # delivered with the domain's other policy, opportunistic TLS.
    sink = await start_sink(tls=dane_world.cert)
    running, courier = await start(tmp_path, dane_world, sink.port)
    try:
        await in_thread(send, running.port(), rcpt)
        await wait_for(lambda: sink.messages, what="the message at the sink")
        assert sink.messages[0].tls
    finally:
        await running.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_unusable_tlsa_requires_tls(tmp_path, dane_world):
    # TLSA present but none usable (PKIX-EE): TLS is required, unauthenticated (RFC 7672 §2.2).
    sink = await start_sink()  # no STARTTLS
    running, courier = await start(tmp_path, dane_world, sink.port)
    try:
        await in_thread(send, running.port(), "bob@unusable.dane.test")
        r = await attempted(running)
        assert r.state == "deferred" and "does not offer STARTTLS" in r.last_reply
        assert sink.messages == []
    finally:
        await running.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_dane_only_refuses_hosts_without_tlsa(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port, policy="dane-only")
    try:
        await in_thread(send, running.port(), "bob@none.dane.test")
        r = await attempted(running)
        assert r.state == "deferred" and "DANE is required" in r.last_reply
        assert dane_sink.sessions == []
        assert ("none.dane.test", "tlsa", "dane-required",
                "mx-none.dane.test") in courier.dane.report.rows
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_resolver_that_does_not_validate_refuses_dane(tmp_path, dane_world, dane_sink):
    # A check name outside every trust anchor comes back without AD: DANE refused,
    # logged, and mail to a domain with a mismatching TLSA goes out opportunistically.
    events = []
    from twisted.logger import globalLogPublisher

    def observer(event):
        if event.get("event") == "dnssec_check":
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        running, courier = await start(tmp_path, dane_world, dane_sink.port,
                                       check_name="plain.test")
    finally:
        globalLogPublisher.removeObserver(observer)
    try:
        assert courier.dane.available is False
        assert events and events[0]["result"] == "failed"
        assert "without the AD bit" in events[0]["problem"]
        await in_thread(send, running.port(), "bob@bad.dane.test")
        await wait_for(lambda: dane_sink.messages, what="the message at the sink")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_unanswered_check_refuses_dane(dane_world):
    policy = DanePolicy(ValidatingResolver([("127.0.0.1", 9)], 0.3, reactor), reactor,
                        check_name="dane.test")
    assert await policy.start() is False
    assert "did not answer" in policy.check_problem
    assert await policy.plan("pass.dane.test", []) is None


def test_tlsa_verifier_names_and_anchor(dane_world):
    from OpenSSL import crypto

    chain = [crypto.load_certificate(crypto.FILETYPE_PEM, p.bytes())
             for p in dane_world.cert.cert_chain_pems]
    issuer = chain[1]
    ta = TLSARecord(2, 1, 1, hashlib.sha256(issuer.to_cryptography().public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest())
    assert TLSAVerifier([ta], ["mx-ta.dane.test"]).verify(chain) is None
    # DANE-TA checks the name (RFC 7672 §3.2.2); DANE-EE does not.
    problem = TLSAVerifier([ta], ["other.example"]).verify(chain)
    assert problem and "names none of other.example" in problem
    ee = TLSARecord(3, 0, 2, hashlib.sha512(crypto.dump_certificate(
        crypto.FILETYPE_ASN1, chain[0])).digest())
    assert TLSAVerifier([ee], ["other.example"]).verify(chain) is None
    # The anchor must be in the chain: without the intermediate, DANE-TA fails.
    assert TLSAVerifier([ta], ["mx-ta.dane.test"]).verify(chain[:1]) is not None
    assert not TLSARecord(3, 1, 1, b"short").usable
    assert not TLSARecord(0, 1, 1, bytes(32)).usable


@pytest_twisted.ensureDeferred
async def test_tls_required_no_ignores_dane(tmp_path, dane_world, dane_sink):
    # RFC 8689 §4.1: the sender asks that the recipient's DANE policy be ignored.
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@bad.dane.test", headers="TLS-Required: No\r\n")
        await wait_for(lambda: dane_sink.messages, what="the message at the sink")
        assert dane_sink.messages[0].tls
        assert not any(row[2] == "tlsa-invalid" for row in courier.dane.report.rows)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_requiretls_relayed_over_dane(tmp_path, dane_world):
    # A DANE-authenticated hop that offers REQUIRETLS takes a REQUIRETLS message
    # (RFC 8689 §4.2.1), and TLS-Required: No is ignored for it.
    sink = await start_sink(tls=dane_world.cert, requiretls=True)
    running, courier = await start(tmp_path, dane_world, sink.port)
    try:
        await in_thread(send, running.port(), "bob@pass.dane.test", requiretls=True,
                        headers="TLS-Required: No\r\n")
        await wait_for(lambda: sink.messages, what="the message at the sink")
        assert "REQUIRETLS" in sink.messages[0].mail_params
    finally:
        await running.stop()
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_requiretls_over_a_dane_host_without_it_bounces(tmp_path, dane_world, dane_sink):
    running, courier = await start(tmp_path, dane_world, dane_sink.port)
    try:
        await in_thread(send, running.port(), "bob@pass.dane.test", requiretls=True)
        new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
        await wait_for(lambda: new.exists() and any(new.iterdir()), what="the bounce")
        assert dane_sink.messages == []
        (bounce,) = [p.read_bytes() for p in new.iterdir()]
        assert b"Status: 5.7.30" in bounce and b"REQUIRETLS support required" in bounce
    finally:
        await running.stop()


@pytest.mark.parametrize("rcpt, secure", [("bob@none.dane.test", True), ("bob@plain.test", False)])
@pytest_twisted.ensureDeferred
async def test_requiretls_under_verify_needs_a_dnssec_authenticated_mx(tmp_path, dane_world, rcpt,
                                                                     secure):
    """RFC 8689 §4.2.1 under delivery.tls_policy "verify": a host of a validated MX
    RRset (no TLSA records) takes a REQUIRETLS message over TLS verified for its
    name; a host of an insecure MX answer is not authenticated, so the message
    bounces with 5.7.10 and that host is not even connected to."""
    from twisted.internet.ssl import Certificate

    sink = await start_sink(tls=dane_world.cert, requiretls=True)
    running, courier = await start(tmp_path, dane_world, sink.port, policy="verify")
    courier.trust_root = Certificate.loadPEM(shared_ca().cert_pem.bytes())
    try:
        await in_thread(send, running.port(), rcpt, requiretls=True)
        if secure:
            await wait_for(lambda: sink.messages, what="the message at the sink")
            assert sink.messages[0].tls and "REQUIRETLS" in sink.messages[0].mail_params
        else:
            new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
            await wait_for(lambda: new.exists() and any(new.iterdir()), what="the bounce")
            (bounce,) = [p.read_bytes() for p in new.iterdir()]
            assert b"Status: 5.7.10" in bounce
            assert b"not authenticated by DNSSEC or an MTA-STS policy" in bounce
            assert sink.messages == [] and sink.sessions == []
    finally:
        await running.stop()
        await sink.stop()
