"""MTA-STS (RFC 8461) end to end on loopback, and the TLS reports (RFC 8460) it feeds.

Everything is real: the ``_mta-sts`` TXT, MX and address records come from a
loopback DNS server (tests/dnsserver.py) through the configured resolver;
policies are served over HTTPS by twisted.web with a trustme certificate for
``mta-sts.<domain>`` (tests/stsserver.py; the fetcher resolves the name
through the same DNS and connects to the test's port, ``delivery.mta_sts.https_port``);
the MX is a scripted SMTP sink whose STARTTLS certificate matches the MX name
or not.  The courier is the one the daemon builds (mta.delivery.wiring).
"""

from __future__ import annotations

import email
import gzip
import json
import time
from datetime import datetime
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from mta.config import (
    Config,
    ConfigError,
    DeliveryConfig,
    STSDeliveryConfig,
    TLSReportsConfig,
    config_from_dict,
)
from mta.delivery.mtasts import (
    MTASTS,
    PolicyCache,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mta.delivery.remote import RemoteCourier
from mta.delivery.tlsrpt import ReportSettings, TLSReporter, build_report
from mta.delivery.wiring import build_couriers
from mta.queue.courier import Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.runner import QueueRunner, Router
from mta.queue.store import QueueStore
from tests.dnsserver import LoopbackDNS
from tests.sink import start_sink
from tests.stsserver import Answer, PolicyServer, policy_text, start_policy_server

CA = trustme.CA()
OTHER_CA = trustme.CA()
DOMAINS = ("dst.test", "slow.test", "huge.test", "junk.test", "rpt.test", "badca.test",
           "chunked.test")
POLICY_CERT = CA.issue_cert(*(f"mta-sts.{d}" for d in DOMAINS))
MX_CERT = CA.issue_cert(*(f"mx.{d}" for d in DOMAINS))
WRONG_NAME_CERT = CA.issue_cert("other.example")
UNTRUSTED_CERT = OTHER_CA.issue_cert("mx.dst.test")
EXPIRED_CERT = CA.issue_cert("mx.dst.test", not_before=datetime(2020, 1, 1),
                             not_after=datetime(2021, 1, 1))
BODY = b"Subject: sts\r\n\r\nbody\r\n"


def zone(domain: str, policy_id: str = "1") -> dict[str, Any]:
    return {
        f"_mta-sts.{domain}": {"TXT": [f"v=STSv1; id={policy_id}"]},
        f"mta-sts.{domain}": {"A": ["127.0.0.1"]},
        domain: {"MX": [(10, f"mx.{domain}")]},
        f"mx.{domain}": {"A": ["127.0.0.1"]},
    }


@pytest.fixture
def dns():
    """A loopback DNS server whose answers may not be kept (TTL 0): a changed TXT id
    is seen by the next delivery."""
    server = LoopbackDNS(ttl=0)
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.stop())


def make_config(tmp_path: Path, dns: LoopbackDNS, mx_port: int, https_port: int,
                **sts: Any) -> Config:
    ca_file = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(ca_file))
    sts.setdefault("fetch_timeout", 2.0)
    return Config(
        hostname="out.example.test", listeners=(), local_domains=(), data_dir=tmp_path,
        queue_dir=tmp_path / "queue", mail_dir=tmp_path / "mail", domains_dir=tmp_path / "domains",
        control_socket=tmp_path / "control.sock", dns=dns.dns_config(timeout=1.0),
        delivery=DeliveryConfig(mx_port=mx_port, connection_cache_time=0),
        delivery_sts=STSDeliveryConfig(enabled=True, https_port=https_port, ca_file=ca_file, **sts),
        tls_reports=TLSReportsConfig(enabled=True, organization="Out Org",
                                     contact="postmaster@out.example.test",
                                     from_address="tlsrpt@out.example.test"),
    )


def courier_for(config: Config, store: QueueStore) -> RemoteCourier:
    return build_couriers(config, reactor, store=store)["remote"]


def envelope(tmp_path: Path, *recipients: str) -> tuple[Envelope, Path]:
    path = tmp_path / "m.msg"
    path.write_bytes(BODY)
    rcpts = [Recipient(a, RecipientKind.REMOTE, a) for a in recipients]
    return Envelope("q1", "sender@src.test", rcpts, 0.0, size=len(BODY)), path


async def deliver(courier: RemoteCourier, tmp_path: Path, *recipients: str) -> list[Any]:
    env, path = envelope(tmp_path, *recipients)
    return await courier.deliver(env, env.recipients, path)


def counts(courier: RemoteCourier, domain: str = "dst.test") -> dict[str, Any]:
    """Today's TLS report counts for ``domain``'s STS policy: success and failures by type."""
    day = next(iter(courier.tlsrpt.days.values()), {})
    entry = day.get(f"{domain} sts", {"success": 0, "failures": {}})
    failures: dict[str, int] = {}
    for key, n in entry["failures"].items():
        failures[key.split("|")[0]] = failures.get(key.split("|")[0], 0) + n
    return {"success": entry["success"], "failures": failures}


def sent_mail(sink: Any) -> bool:
    return any(c.upper().startswith("MAIL") for s in sink.sessions for c in s.commands)


class Setup:
    """DNS, policy server, MX sink, queue store and the courier, stopped in order."""

    def __init__(self, tmp_path: Path, dns: LoopbackDNS) -> None:
        self.tmp_path, self.dns = tmp_path, dns
        self.policies: PolicyServer | None = None
        self.sinks: list[Any] = []
        self.couriers: list[RemoteCourier] = []
        self.store = QueueStore(tmp_path / "queue", fsync=False)

    async def start(self, sink_options: dict[str, Any] | None = None, **sts: Any) -> RemoteCourier:
        self.policies = await start_policy_server(POLICY_CERT)
        sink = await start_sink(**(sink_options if sink_options is not None
                                   else {"tls": MX_CERT}))
        self.sinks.append(sink)
        self.config = make_config(self.tmp_path, self.dns, sink.port, self.policies.port, **sts)
        return self.courier()

    def courier(self) -> RemoteCourier:
        courier = courier_for(self.config, self.store)
        self.couriers.append(courier)
        return courier

    @property
    def sink(self) -> Any:
        return self.sinks[0]

    async def stop(self) -> None:
        for courier in self.couriers:
            await courier.close()
        for sink in self.sinks:
            await sink.stop()
        if self.policies is not None:
            await self.policies.stop()


@pytest.fixture
def setup(tmp_path, dns):
    s = Setup(tmp_path, dns)
    yield s
    pytest_twisted.blockon(Deferred.fromCoroutine(s.stop()))


# --- the parsers ---------------------------------------------------------------------


def test_policy_parsing() -> None:
    text = "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmx: *.example.org\nmax_age: 604800\n"
    p = parse_policy(text, "example.net", "abc", 100.0)
    assert (p.mode, p.mx, p.max_age, p.expires_at) == ("enforce", ("mx1.example.net",
                                                                   "*.example.org"), 604800, 604900.0)
    crlf = "version: STSv1\r\nmode: testing\r\nmx: a.test\r\nmax_age: 31557600\r\nextension: x\r\n"
    assert parse_policy(crlf, "d", "1", 0).mode == "testing"
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1\n", "d", "1", 0).mx == ()
    for bad, why in [
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 10\n", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: a b\nmax_age: 10\n", "mx pattern"),
        ("<html>hello</html>\n", "key: value"),
    ]:
        with pytest.raises(PolicyError, match=why) as e:
            parse_policy(bad, "d", "1", 0)
        assert e.value.result_type == "sts-policy-invalid"


def test_txt_record_and_mx_patterns() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    for bad in (["v=STSv1; id=1", "v=STSv1; id=2"], ["v=STSv1; id=a-b"], ["v=STSv1"], []):
        with pytest.raises(PolicyError):
            parse_txt(bad)
    assert mx_matches("*.example.net", "mx1.example.net")
    assert mx_matches("*.example.net", "MX1.Example.NET.")
    assert not mx_matches("*.example.net", "a.b.example.net")  # one label only (§4.1)
    assert not mx_matches("*.example.net", "example.net")
    assert mx_matches("mx.example.net", "mx.example.net")
    assert not mx_matches("mx.example.net", "mx2.example.net")


def test_config_is_validated(tmp_path: Path) -> None:
    base = {"hostname": "h.test", "data_dir": str(tmp_path)}
    cfg = config_from_dict({**base, "delivery": {"mta_sts": {"enabled": True}},
                            "tls_reports": {"enabled": True}}, tmp_path)
    assert cfg.delivery_sts.enabled and cfg.delivery_sts.https_port == 443
    assert cfg.delivery_sts.ca_file is None
    assert cfg.tls_reports.from_address == "MAILER-DAEMON@h.test"
    assert cfg.tls_reports.organization == "h.test"
    for table, key, value, message in [
        ("delivery.mta_sts", "fetch_timeout", 0, "greater than zero"),
        ("delivery.mta_sts", "max_policy_size", 0, "from 1 to"),
        ("delivery.mta_sts", "ca_file", "missing.pem", "is not a file"),
        ("delivery.mta_sts", "colour", "red", "unknown key"),
        ("tls_reports", "from_address", "not an address", "is not an address"),
        ("tls_reports", "send_delay", 90000, "from 0 to 86399"),
    ]:
        raw: dict[str, Any] = {table: {key: value}}
        if table.startswith("delivery."):
            raw = {"delivery": {"mta_sts": {key: value}}}
        with pytest.raises(ConfigError, match=message) as e:
            config_from_dict({**base, **raw}, tmp_path)
        assert f"{table}.{key}" in str(e.value)


# --- enforce ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enforce_with_matching_mx_delivers_over_verified_tls(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["*.dst.test"]))
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DELIVERED, result.reply
    [msg] = setup.sink.messages
    assert msg.tls and msg.recipients == ["a@dst.test"]
    assert counts(courier) == {"success": 1, "failures": {}}
    cached = json.loads((tmp_path / "mta-sts" / "dst.test.json").read_text())
    assert (cached["mode"], cached["mx"], cached["id"], cached["max_age"]) == \
        ("enforce", ["*.dst.test"], "1", 86400)
    # The second message uses the cached policy: no new fetch.
    [again] = await deliver(courier, tmp_path, "b@dst.test")
    assert again.outcome is Outcome.DELIVERED and setup.policies.hits["dst.test"] == 1


@pytest_twisted.ensureDeferred
async def test_enforce_mx_not_in_the_patterns_defers(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mail.elsewhere.test"]))
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.startswith("451 4.7.0 no MX host of dst.test matches its MTA-STS policy")
    assert result.status == "4.7.0"
    assert setup.sink.sessions == []  # the MX was never contacted
    assert counts(courier) == {"success": 0, "failures": {"validation-failure": 1}}


@pytest.mark.parametrize("sink_options, result_type", [
    ({"tls": WRONG_NAME_CERT}, "certificate-host-mismatch"),
    ({"tls": UNTRUSTED_CERT}, "certificate-not-trusted"),
    ({"tls": EXPIRED_CERT}, "certificate-expired"),
    ({}, "starttls-not-supported"),
])
@pytest_twisted.ensureDeferred
async def test_enforce_bad_certificate_or_no_tls_defers_and_nothing_goes_in_clear(
        setup, dns, tmp_path, sink_options, result_type) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start(sink_options)
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DEFERRED and result.status.startswith("4.7."), result.reply
    assert setup.sink.messages == [] and not sent_mail(setup.sink)
    assert len(setup.sink.sessions) == 1  # no second, clear-text try
    assert counts(courier) == {"success": 0, "failures": {result_type: 1}}


# --- testing ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_testing_mode_delivers_and_counts_the_failure(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start({"tls": UNTRUSTED_CERT})
    setup.policies.serve("dst.test", policy_text("testing", ["mx.dst.test"]))
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DELIVERED, result.reply
    [msg] = setup.sink.messages
    assert msg.tls  # the retry without the policy: opportunistic TLS, certificate unchecked
    assert counts(courier) == {"success": 0, "failures": {"certificate-not-trusted": 1}}


@pytest_twisted.ensureDeferred
async def test_testing_mode_mx_not_in_patterns_delivers_and_counts(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("testing", ["mx.other.test"]))
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DELIVERED and len(setup.sink.messages) == 1
    assert counts(courier) == {"success": 0, "failures": {"validation-failure": 1}}


# --- fetching, caching, refreshing ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_id_change_refetches_and_none_clears_the_cache(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test", "v1"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    assert (await deliver(courier, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    # New policy, same id: not fetched, the cached one still applies.
    setup.policies.serve("dst.test", policy_text("enforce", ["mx9.dst.test"]))
    assert (await deliver(courier, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    assert setup.policies.hits["dst.test"] == 1
    # The id changes: fetched again, and the new patterns defer.
    dns.set("_mta-sts.dst.test", "TXT", ["v=STSv1; id=v2"])
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert setup.policies.hits["dst.test"] == 2
    assert result.outcome is Outcome.DEFERRED and "4.7.0" in result.reply
    assert json.loads((tmp_path / "mta-sts" / "dst.test.json").read_text())["id"] == "v2"
    # mode none withdraws the policy: the cache file goes, delivery is as without one.
    setup.policies.serve("dst.test", policy_text("none", []))
    dns.set("_mta-sts.dst.test", "TXT", ["v=STSv1; id=v3"])
    [result] = await deliver(courier, tmp_path, "a@dst.test")
    assert result.outcome is Outcome.DELIVERED
    assert not (tmp_path / "mta-sts" / "dst.test.json").exists()
    assert "dst.test" not in courier.sts.policies


@pytest_twisted.ensureDeferred
async def test_slow_huge_and_garbage_policy_hosts_do_not_block_others(setup, dns, tmp_path) -> None:
    for domain in ("dst.test", "slow.test", "huge.test", "junk.test", "chunked.test"):
        dns.load(zone(domain))
    dns.load(zone("badca.test"))
    dns.set("mta-sts.badca.test", "A", ["127.0.0.2"])
    courier = await setup.start(fetch_timeout=1.5)
    # badca.test's policy host has a certificate from a CA nobody trusts.
    impostor = await start_policy_server(OTHER_CA.issue_cert("mta-sts.badca.test"),
                                         interface="127.0.0.2", port=setup.policies.port)
    impostor.serve("badca.test", policy_text("enforce", ["nothing.test"]))
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    setup.policies.serve("slow.test", Answer(stall=True))
    setup.policies.serve("huge.test", Answer(b"version: STSv1\n" + b"x" * 200_000))
    setup.policies.serve("chunked.test", Answer(b"version: STSv1\n" + b"x" * 200_000,
                                                chunked=True))
    setup.policies.serve("junk.test", Answer(b"\x00\xff<html>garbage", content_type="text/html"))
    started = time.monotonic()
    finished: dict[str, float] = {}

    async def one(domain: str) -> Any:
        [result] = await deliver(courier, tmp_path / domain, f"a@{domain}")
        finished[domain] = time.monotonic() - started
        return result

    for domain in ("dst.test", "slow.test", "huge.test", "junk.test", "badca.test",
                   "chunked.test"):
        (tmp_path / domain).mkdir()
    (tmp_path / "slow2").mkdir()

    async def second_slow() -> Any:  # a concurrent message to slow.test shares the fetch
        [result] = await deliver(courier, tmp_path / "slow2", "b@slow.test")
        return result

    try:
        results = await gatherResults([Deferred.fromCoroutine(one(d)) for d in
                                       ("slow.test", "huge.test", "junk.test", "badca.test",
                                        "chunked.test", "dst.test")]
                                      + [Deferred.fromCoroutine(second_slow())])
    finally:
        await impostor.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 7  # no policy: as before
    assert impostor.hits == {}  # the TLS handshake failed: no request was sent
    assert finished["dst.test"] < 1.0 < finished["slow.test"] < 5.0
    assert setup.policies.hits["slow.test"] == 1
    # The next message to slow.test does not wait again for the broken host.
    again = time.monotonic()
    assert (await deliver(courier, tmp_path / "slow2", "c@slow.test"))[0].outcome \
        is Outcome.DELIVERED
    assert time.monotonic() - again < 1.0 and setup.policies.hits["slow.test"] == 1
    for domain, result_type in (("slow.test", "sts-policy-fetch-error"),
                                ("huge.test", "sts-policy-fetch-error"),
                                ("chunked.test", "sts-policy-fetch-error"),
                                ("junk.test", "sts-policy-invalid"),
                                ("badca.test", "sts-webpki-invalid")):
        assert counts(courier, domain)["failures"] == {result_type: 1}, domain
    assert counts(courier, "dst.test") == {"success": 1, "failures": {}}
    day = next(iter(courier.tlsrpt.days.values()))
    assert "larger than 65536 octets" in str(day["chunked.test sts"]["failures"])  # cut at 64 KiB
    assert "is 200015 octets" in str(day["huge.test sts"]["failures"])  # refused by its length
    assert "no answer from mta-sts.slow.test within 1.5s" in str(day["slow.test sts"]["failures"])


@pytest_twisted.ensureDeferred
async def test_a_cached_enforce_policy_outlives_a_broken_policy_host(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test", "v1"))
    courier = await setup.start(fetch_timeout=1.0)
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    assert (await deliver(courier, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    # The id changes, the policy host now stalls, then serves garbage, then redirects;
    # the MX loses its TLS.  The cached enforce policy stays: deferred, never in clear.
    plain = await start_sink(port=setup.sink.port, interface="127.0.0.2")
    dns.set("mx.dst.test", "A", ["127.0.0.2"])
    setup.sinks.append(plain)
    for new_id, answer in (("v2", Answer(stall=True)), ("v3", Answer(b"garbage")),
                           ("v4", Answer(status=301, redirect="https://evil.test/"))):
        dns.set("_mta-sts.dst.test", "TXT", [f"v=STSv1; id={new_id}"])
        setup.policies.serve("dst.test", answer)
        [result] = await deliver(courier, tmp_path, "a@dst.test")
        assert result.outcome is Outcome.DEFERRED, result.reply
        assert "does not offer STARTTLS" in result.reply
    assert plain.messages == [] and not sent_mail(plain)
    assert courier.sts.policies["dst.test"].id == "v1" and setup.policies.hits["dst.test"] == 4
    assert counts(courier)["failures"] == {"sts-policy-fetch-error": 2, "sts-policy-invalid": 1,
                                           "starttls-not-supported": 3}


@pytest_twisted.ensureDeferred
async def test_cache_survives_restart_and_is_refreshed_before_expiry(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"], max_age=1000))
    assert (await deliver(courier, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    fetched_at = courier.sts.policies["dst.test"].fetched_at
    await courier.close()
    # A new process: the policy comes from disk (no fetch), and still applies.
    setup.policies.serve("dst.test", Answer(status=500))
    restarted = setup.courier()
    assert restarted.sts.cached("dst.test").fetched_at == fetched_at
    assert (await deliver(restarted, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    assert setup.policies.hits["dst.test"] == 1
    # The refresh timer on a fake clock: past half of max_age the policy is fetched again.
    clock = Clock()
    clock.advance(fetched_at + 400)
    sts = MTASTS(restarted.sts.txt_resolver, restarted.sts.fetcher,
                 PolicyCache(tmp_path / "mta-sts"), clock, refresh_interval=60)
    setup.policies.serve("dst.test", policy_text("enforce", ["*.dst.test"], max_age=2000))
    sts.start()
    clock.advance(60)  # 460 s old: not yet
    assert sts.fetches == 0
    clock.advance(60)  # 520 s: past half of 1000
    assert sts.fetches == 1
    for _ in range(200):
        if sts.policies["dst.test"].max_age == 2000:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert sts.policies["dst.test"].mx == ("*.dst.test",)
    assert json.loads((tmp_path / "mta-sts" / "dst.test.json").read_text())["max_age"] == 2000
    sts.stop()


# --- TLS reports -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_daily_tls_report_arrives_as_mail_at_the_rua(setup, dns, tmp_path) -> None:
    dns.load(zone("dst.test"))
    dns.load({"_smtp._tls.dst.test": {"TXT": ["v=TLSRPTv1; rua=mailto:reports@rpt.test,"
                                              "https://reports.rpt.test/v1"]},
              "rpt.test": {"MX": [(10, "mx.rpt.test")]}, "mx.rpt.test": {"A": ["127.0.0.1"]}})
    courier = await setup.start({"tls": UNTRUSTED_CERT})
    setup.policies.serve("dst.test", policy_text("testing", ["mx.dst.test"]))
    # Day 1: two deliveries under the testing policy, each a certificate failure.
    day1 = time.time() - 86400
    clock = Clock()
    clock.advance(day1)
    courier.tlsrpt.stop()
    courier.tlsrpt = courier.sts.recorder = TLSReporter(
        setup.store, courier.sts.txt_resolver, clock, tmp_path / "tlsrpt",
        ReportSettings("out.example.test", "Out Org", "postmaster@out.example.test",
                       "tlsrpt@out.example.test"))
    for _ in range(2):
        assert (await deliver(courier, tmp_path, "a@dst.test"))[0].outcome is Outcome.DELIVERED
    courier.tlsrpt.stop()  # written to disk
    assert json.loads((tmp_path / "tlsrpt" / "state.json").read_text())
    # Day 2, a new process: the reporter reads the state, sends at its timer, and the
    # queue runner delivers the report to the rua's MX (the sink: it takes any mail).
    clock.advance(86400)
    reporter = TLSReporter(setup.store, courier.sts.txt_resolver, clock, tmp_path / "tlsrpt",
                           ReportSettings("out.example.test", "Out Org",
                                          "postmaster@out.example.test",
                                          "tlsrpt@out.example.test"))
    router = Router({"remote": courier, "local": None, "pipe": None})
    runner = QueueRunner(setup.store, router, clock, setup.config.delivery, "out.example.test")
    runner.start()
    try:
        reporter.start()
        clock.advance(0)
        for _ in range(500):
            if any("reports@rpt.test" in m.recipients for m in setup.sink.messages):
                break
            clock.advance(0)
            await deferLater(reactor, 0.01, lambda: None)
    finally:
        reporter.stop()
        await runner.stop()
    [report_mail] = [m for m in setup.sink.messages if m.recipients == ["reports@rpt.test"]]
    assert report_mail.sender == "tlsrpt@out.example.test"
    msg = email.message_from_bytes(report_mail.data, policy=email_policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "dst.test"
    assert msg["TLS-Report-Submitter"] == "out.example.test"
    assert msg["Subject"].startswith("Report Domain: dst.test Submitter: out.example.test")
    [attachment] = [p for p in msg.iter_attachments()
                    if p.get_content_type() == "application/tlsrpt+gzip"]
    day = time.strftime("%Y-%m-%d", time.gmtime(day1))
    begin = int(time.mktime(time.strptime(day, "%Y-%m-%d"))) - time.timezone
    name = attachment.get_filename()
    assert name.startswith(f"out.example.test!dst.test!{begin}!{begin + 86399}!")
    assert name.endswith(".json.gz")
    report = json.loads(gzip.decompress(attachment.get_content()))
    assert report["organization-name"] == "Out Org"
    assert report["contact-info"] == "postmaster@out.example.test"
    assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z",
                                    "end-datetime": f"{day}T23:59:59Z"}
    [policy] = report["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": "dst.test",
                                "policy-string": ["version: STSv1", "mode: testing",
                                                  "mx: mx.dst.test", "max_age: 86400"],
                                "mx-host": ["mx.dst.test"]}
    assert policy["summary"] == {"total-successful-session-count": 0,
                                 "total-failure-session-count": 2}
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "certificate-not-trusted"
    assert detail["receiving-mx-hostname"] == "mx.dst.test"
    assert detail["receiving-ip"] == "127.0.0.1"
    assert detail["sending-mta-ip"] == "127.0.0.1"
    assert detail["failed-session-count"] == 2
    # Sent once: the day's counts are gone from the state.
    assert json.loads((tmp_path / "tlsrpt" / "state.json").read_text()) == {}


def test_report_json_shape_for_a_dane_caller(tmp_path: Path) -> None:
    """The interface the DANE courier counts through: record() with policy type tlsa."""
    clock = Clock()
    clock.advance(1_700_000_000)
    reporter = TLSReporter(None, None, clock, tmp_path, ReportSettings("me.test", "Me", "c@me.test",
                                                                       "r@me.test"))
    reporter.record("dane.test", "tlsa", "success", "mx.dane.test",
                    policy_string=["3 1 1 abcd"], mx_patterns=["mx.dane.test"])
    reporter.record("dane.test", "tlsa", "tlsa-invalid", "mx.dane.test",
                    {"receiving-ip": "192.0.2.1", "failure-reason-code": "no match"})
    with pytest.raises(ValueError):
        reporter.record("dane.test", "tlsa", "not-a-result", "mx.dane.test")
    reporter.stop()
    day = "2023-11-14"
    report = build_report(day, "dane.test", json.loads((tmp_path / "state.json").read_text())[day],
                          reporter.settings)
    [p] = report["policies"]
    assert p["policy"]["policy-type"] == "tlsa" and p["policy"]["policy-string"] == ["3 1 1 abcd"]
    assert p["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert p["failure-details"] == [{"result-type": "tlsa-invalid", "failed-session-count": 1,
                                     "receiving-mx-hostname": "mx.dane.test",
                                     "receiving-ip": "192.0.2.1",
                                     "failure-reason-code": "no match"}]


# --- the daemon ------------------------------------------------------------------------


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_daemon_relays_under_the_policy_from_its_configuration(tmp_path, dns) -> None:
    """The running MTA, configured from mta.toml's [delivery.mta_sts] and [tls_reports]: a
    relayed message to an enforce domain waits in the queue (4.7.x) while the MX
    has the wrong certificate, and goes out over TLS once it has the right one."""
    from tests.harness import RawClient, in_thread, start_mta

    dns.load(zone("dst.test"))
    policies = await start_policy_server(POLICY_CERT)
    policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    wrong = await start_sink(tls=WRONG_NAME_CERT, interface="127.0.0.1")
    right = await start_sink(tls=MX_CERT, interface="127.0.0.2", port=wrong.port)
    CA.cert_pem.write_to_path(str(tmp_path / "sts-ca.pem"))
    host, port = dns.address
    mta = None
    try:
        mta = await start_mta(tmp_path, runner=None, extra={
            "relay_networks": ["127.0.0.0/8"],
            "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0},
            "delivery": {"mx_port": wrong.port, "retry_schedule": [1],
                         "mta_sts": {"enabled": True, "https_port": policies.port,
                                     "ca_file": "sts-ca.pem"}},
            "tls_reports": {"enabled": True},
        })

        def send() -> int:
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<sender@example.test>")
            assert c.cmd("RCPT TO:<bob@dst.test>")[0] == 250
            c.cmd("DATA")
            c.send(b"Subject: under sts\r\n\r\nhello\r\n.\r\n")
            code = c.read_reply()[0]
            c.close()
            return code

        assert await in_thread(send) == 250
        [queue_id] = mta.store.ids()

        def deferred() -> bool:
            env = mta.store.load(queue_id)
            return env.recipients[0].attempts >= 1

        await wait_for(deferred)
        r = mta.store.load(queue_id).recipients[0]
        assert r.state.value == "deferred" and "TLS handshake failed" in r.last_reply
        assert wrong.messages == [] and not sent_mail(wrong)
        assert (tmp_path / "var" / "mta-sts" / "dst.test.json").exists()
        dns.set("mx.dst.test", "A", ["127.0.0.2"])  # the MX now has its own certificate
        mta.service.runner.flush(queue_id)
        await wait_for(lambda: bool(right.messages))
        assert right.messages[0].tls and right.messages[0].recipients == ["bob@dst.test"]
        await wait_for(lambda: not mta.store.ids())
    finally:
        if mta is not None:
            await mta.stop()
        await wrong.stop()
        await right.stop()
        await policies.stop()
    # Stopped: the day's counts are on disk for the report (one failure, one success).
    state = json.loads((tmp_path / "var" / "tlsrpt" / "state.json").read_text())
    [entry] = [day["dst.test sts"] for day in state.values()]
    assert entry["success"] == 1
    assert [k.split("|")[0] for k in entry["failures"]] == ["certificate-host-mismatch"]


# --- DANE goes first (RFC 8461 §2) -------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_dane_host_is_left_to_dane_when_the_domain_also_has_mta_sts(tmp_path,
                                                                        dane_world) -> None:
    """pass.dane.test has DANE (a matching TLSA record, signed zone, validating
    resolver) and an MTA-STS enforce policy naming no MX host of it: the policy is
    fetched, but the DANE host is used as DANE says, and the mail goes out.
    none.dane.test has no TLSA records and a testing policy: MTA-STS applies (the
    certificate is not from the CA it trusts: counted), then opportunistic TLS."""
    from tests.harness import in_thread, start_mta
    from tests.test_dane import send
    from tests.test_dane import wait_for as dane_wait

    sts_cert = CA.issue_cert("mta-sts.pass.dane.test", "mta-sts.none.dane.test")
    policies = await start_policy_server(sts_cert)
    policies.serve("pass.dane.test", policy_text("enforce", ["mx.elsewhere.test"]))
    policies.serve("none.dane.test", policy_text("testing", ["mx-none.dane.test"]))
    sink = await start_sink(tls=dane_world.cert)
    CA.cert_pem.write_to_path(str(tmp_path / "sts-ca.pem"))
    running = None
    try:
        running = await start_mta(tmp_path, runner=None, extra={
            "relay_networks": ["127.0.0.0/8"],
            "dns": {"servers": [dane_world.resolver], "timeout": 2.0, "cache_max_ttl": 0},
            "dane": {"enabled": True, "check_name": "dane.test", "check_bogus": "bogus.test"},
            "delivery": {"tls_policy": "dane", "mx_port": sink.port, "retry_schedule": [600],
                         "retry_jitter": 0,
                         "mta_sts": {"enabled": True, "https_port": policies.port,
                                     "ca_file": "sts-ca.pem"}},
            "tls_reports": {"enabled": True}})
        courier = running.service.runner.router.couriers["remote"]
        await dane_wait(lambda: courier.dane.available is not None, what="the DNSSEC check")
        await in_thread(send, running.port(), "bob@pass.dane.test")
        await dane_wait(lambda: sink.messages, what="the message at the sink")
        assert sink.messages[0].tls and sink.messages[0].recipients == ["bob@pass.dane.test"]
        assert policies.hits == {"pass.dane.test": 1}
        assert courier.sts.cached("pass.dane.test").mode == "enforce"
        day = next(iter(courier.tlsrpt.days.values()))
        assert day["pass.dane.test tlsa"]["success"] == 1  # counted as DANE, not as STS
        assert "pass.dane.test sts" not in day
        await in_thread(send, running.port(), "carol@none.dane.test")
        await dane_wait(lambda: len(sink.messages) == 2, what="the second message")
        assert sink.messages[1].tls and sink.messages[1].recipients == ["carol@none.dane.test"]
        day = next(iter(courier.tlsrpt.days.values()))
        failures = day["none.dane.test sts"]["failures"]
        assert [k.split("|")[0] for k in failures] == ["certificate-not-trusted"]
    finally:
        if running is not None:
            await running.stop()
        await sink.stop()
        await policies.stop()
