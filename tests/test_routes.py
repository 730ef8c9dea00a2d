"""The per-destination route table, outbound source addresses and the TLS outcome event.

End to end on loopback: a real DNS server (tests/dnsserver.py) answers the MX
lookups of the real :class:`mta.delivery.mx.MXResolver`; the receiving servers
are scripted sinks (tests/sink.py) with and without STARTTLS and trustme
certificates; what is asserted is what the sink received (or did not), the
delivery results, the ``tls_outcome`` log events and the metric they feed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.logger import globalLogPublisher

from mta.config import ConfigError, RouteEntry, config_from_dict
from mta.daemon.metrics import Metrics
from mta.delivery.mx import MXResolver
from mta.delivery.remote import RemoteCourier
from mta.delivery.routes import Policy, RouteTable
from mta.queue.courier import Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.system.dns import make_resolver
from tests.sink import start_sink

CA = trustme.CA()
MX = "mx.dst.test"
CERT = CA.issue_cert(MX)
WRONG_CERT = CA.issue_cert("other.test")
BODY = b"Subject: route\r\n\r\nbody\r\n"


def config(tmp_path: Path, delivery: dict[str, Any], dns: Any = None) -> Any:
    raw: dict[str, Any] = {"hostname": "out.example.test",
                           "delivery": {"connection_cache_time": 0, **delivery}}
    if dns is not None:
        raw["dns"] = {"servers": [f"{dns.address[0]}:{dns.address[1]}"], "timeout": 1}
    return config_from_dict(raw, tmp_path)


def envelope(tmp_path: Path, *recipients: str) -> tuple[Envelope, Path]:
    path = tmp_path / "m.msg"
    path.write_bytes(BODY)
    rcpts = [Recipient(a, RecipientKind.REMOTE, a) for a in recipients]
    return Envelope("q1", "sender@src.test", rcpts, 0.0, size=len(BODY)), path


def courier(cfg: Any, dns: Any, **kw: Any) -> RemoteCourier:
    resolver = MXResolver(make_resolver(cfg.dns, reactor))
    return RemoteCourier(cfg, resolver, reactor, **kw)


@contextmanager
def tls_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: Any) -> None:
        if event.get("event") == "tls_outcome":
            events.append(dict(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def outcome(event: dict[str, Any]) -> tuple[str, str, str, str]:
    return event["policy"], event["source"], event["origin"], event["result"]


@pytest.fixture
def dst_dns(dns_server: Any) -> Any:
    dns_server.load({"dst.test": {"MX": [(10, MX)]}, MX: {"A": ["127.0.0.1"]}})
    return dns_server


# --- configuration ------------------------------------------------------------------------


def test_entries_are_normalized_and_kept_in_order(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"route": {
        "Dst.Test": {"tls": "verify", "port": 2525},
        ".Sub.Test": {"smarthost": "[relay.sub.test]:587", "tls": "encrypt", "username": "u",
                      "password": "pw"},
        "[relay.sub.test]:587": {"bind_address": "127.0.0.3"},
    }, "bind_address": "127.0.0.2", "bind_address6": "::1", "helo_name": "out.example.net"})
    d = cfg.delivery
    assert [e.key for e in d.routes] == ["dst.test", ".sub.test", "[relay.sub.test]:587"]
    assert d.routes[0] == RouteEntry("dst.test", tls="verify", port=2525)
    assert (d.bind_address, d.bind_address6, d.helo_name) == ("127.0.0.2", "::1", "out.example.net")
    assert "pw" not in repr(d.routes[1])  # a password is never printed


@pytest.mark.parametrize(("entry", "key", "problem"), [
    ({"tls": "secure"}, '"dst.test".tls', "must be one of none, may, encrypt, verify, dane, mta-sts"),
    ({"port": 0}, '"dst.test".port', "port number"),
    ({"colour": "red"}, '"dst.test".colour', "unknown key"),
    ({"smarthost": "relay.test:99999"}, '"dst.test".smarthost', "port must be a number"),
    ({"smarthost": "127.0.0.1:25"}, '"dst.test".smarthost', "an IP address goes in brackets"),
    ({"smarthost": "[relay.test"}, '"dst.test".smarthost', "expected [host] or [host]:port"),
    ({"username": "u"}, '"dst.test".password', "username and password go together"),
    ({"username": "u", "password": "p", "tls": "encrypt"}, '"dst.test".username',
     "never sent to MX hosts"),
    ({"smarthost": "[r.test]", "username": "u", "password": "p", "tls": "may"},
     '"dst.test".tls', "AUTH is never sent in clear"),
    ({"smarthost": "[r.test]", "tls": "dane"}, '"dst.test".tls', "applies to MX delivery"),
    ({"bind_address": "::1"}, '"dst.test".bind_address', "not an IPv4 address"),
    ({"bind_address6": "127.0.0.1"}, '"dst.test".bind_address6', "not an IPv6 address"),
    ({"helo_name": "bad name"}, '"dst.test".helo_name', "invalid domain"),
])
def test_bad_entries_are_refused_at_load(tmp_path: Path, entry: dict[str, Any], key: str,
                                         problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, {"route": {"dst.test": entry}})
    assert e.value.key == f"delivery.route.{key}"
    assert problem in e.value.problem


def test_bad_keys_and_global_addresses_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'delivery.route."bad key": not a domain'):
        config(tmp_path, {"route": {"bad key": {"tls": "may"}}})
    with pytest.raises(ConfigError, match=r'delivery.route."\[r.test\]:25".port: a next-hop'):
        config(tmp_path, {"route": {"[r.test]:25": {"port": 26}}})
    with pytest.raises(ConfigError, match=r"delivery.bind_address: 'nowhere' is not an IPv4"):
        config(tmp_path, {"bind_address": "nowhere"})
    with pytest.raises(ConfigError, match=r'"dst.test".tls: dane applies to MX delivery'):
        config(tmp_path, {"smarthosts": ["127.0.0.1:25"], "route": {"dst.test": {"tls": "dane"}}})


# --- resolution ---------------------------------------------------------------------------


def test_lookup_exact_then_closest_parent(tmp_path: Path) -> None:
    table = RouteTable(config(tmp_path, {"route": {
        "example.com": {"tls": "verify"}, ".example.com": {"tls": "encrypt"},
        ".b.example.com": {"tls": "none"}}}).delivery)
    assert table.route("example.com").targets[0].policy == Policy(
        "verify", "table", 'delivery.route."example.com".tls')
    assert table.route("a.example.com").targets[0].policy.level == "encrypt"
    assert table.route("x.a.b.example.com").targets[0].policy.level == "none"
    other = table.route("example.org")
    assert other.entry is None and other.consult_mechanisms
    assert other.targets[0].policy == Policy("may", "default", "delivery.tls_policy")
    assert not table.route("example.com").consult_mechanisms  # the entry overrides DANE/MTA-STS


def test_smarthost_values_come_entry_first_then_next_hop_then_relay(tmp_path: Path) -> None:
    d = config(tmp_path, {
        "smarthosts": ["relay.test:587"], "smarthost_username": "global", "smarthost_password": "g",
        "relay": {"relay.test:587": {"tls": "require"}},
        "route": {"[relay.test]:587": {"bind_address": "127.0.0.9", "helo_name": "hop.test"},
                  "own.test": {"smarthost": "[own-relay.test]:2525", "tls": "verify",
                               "username": "own", "password": "o"},
                  "policy.test": {"tls": "verify"}},
    }).delivery
    table = RouteTable(d)
    [plain] = table.route("").targets
    assert (plain.host, plain.port, plain.policy.source, plain.policy.level) == (
        "relay.test", 587, "relay", "encrypt")
    assert (plain.username, plain.bind_address, plain.helo_name) == ("global", "127.0.0.9", "hop.test")
    [own] = table.route("own.test").targets
    assert (own.host, own.port, own.mx_lookup, own.via, own.username) == (
        "own-relay.test", 2525, False, "table", "own")
    [policy] = table.route("policy.test").targets  # through the global smarthost, own TLS level
    assert (policy.host, policy.policy.origin) == ("relay.test", 'delivery.route."policy.test".tls')
    assert table.group("plain.test") == "" and table.group("policy.test") == "policy.test"


# --- deliveries under each table policy ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_encrypt_to_a_server_without_starttls_defers(tmp_path: Path, dst_dns: Any) -> None:
    sink = await start_sink()
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "encrypt"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        with tls_events() as events:
            [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DEFERRED and result.status == "4.7.10"
    assert "TLS is required (policy require) but the server does not offer STARTTLS" in result.reply
    assert sink.messages == [] and "MAIL" not in " ".join(sink.sessions[0].commands)
    assert [outcome(e) for e in events] == [
        ("encrypt", "table", 'delivery.route."dst.test".tls', "starttls-not-supported")]
    assert events[0]["server"] == f"{MX}[127.0.0.1]" and events[0]["domain"] == "dst.test"


@pytest_twisted.ensureDeferred
async def test_verify_with_a_mismatching_certificate_defers(tmp_path: Path, dst_dns: Any) -> None:
    sink = await start_sink(tls=WRONG_CERT)
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "verify"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        with tls_events() as events:
            [result] = await courier(cfg, dst_dns, trust_root=Certificate.loadPEM(
                CA.cert_pem.bytes())).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DEFERRED and result.status == "4.7.5"
    assert "TLS handshake failed" in result.reply
    assert len(sink.sessions) == 1 and sink.messages == []  # never retried in clear text
    assert [outcome(e) for e in events] == [
        ("verify", "table", 'delivery.route."dst.test".tls', "certificate-host-mismatch")]


@pytest_twisted.ensureDeferred
async def test_verify_with_an_untrusted_certificate_is_not_trusted(tmp_path: Path,
                                                                  dst_dns: Any) -> None:
    sink = await start_sink(tls=CERT)
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "verify"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        other = trustme.CA()
        with tls_events() as events:
            [result] = await courier(cfg, dst_dns, trust_root=Certificate.loadPEM(
                other.cert_pem.bytes())).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DEFERRED and sink.messages == []
    assert [e["result"] for e in events] == ["certificate-not-trusted"]


@pytest_twisted.ensureDeferred
async def test_verify_with_the_right_certificate_delivers_verified(tmp_path: Path,
                                                                  dst_dns: Any) -> None:
    sink = await start_sink(tls=CERT)
    metrics = Metrics()
    metrics.install()
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "verify"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        with tls_events() as events:
            [result] = await courier(cfg, dst_dns, trust_root=Certificate.loadPEM(
                CA.cert_pem.bytes())).deliver(env, env.recipients, path)
    finally:
        metrics.uninstall()
        await sink.stop()
    assert result.outcome is Outcome.DELIVERED and result.tls.startswith("TLSv1.")
    assert sink.messages[0].tls and sink.messages[0].data == BODY
    assert [outcome(e) for e in events] == [
        ("verify", "table", 'delivery.route."dst.test".tls', "verified")]
    assert metrics.registry.get_sample_value("mta_outbound_tls_policy_total", {
        "policy": "verify", "source": "table", "result": "verified"}) == 1.0


@pytest_twisted.ensureDeferred
async def test_may_falls_back_to_clear_text_and_overrides_a_verify_default(
        tmp_path: Path, dst_dns: Any) -> None:
    sink = await start_sink()  # no STARTTLS
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "tls_policy": "verify",
                                "route": {"dst.test": {"tls": "may"}}}, dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        with tls_events() as events:
            [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DELIVERED and result.tls == ""
    assert not sink.messages[0].tls
    assert [outcome(e) for e in events] == [
        ("may", "table", 'delivery.route."dst.test".tls', "cleartext")]


@pytest_twisted.ensureDeferred
async def test_none_never_starts_tls_and_the_default_is_reported_as_default(
        tmp_path: Path, dst_dns: Any) -> None:
    dst_dns.load({"other.test": {"MX": [(5, MX)]}})
    sink = await start_sink(tls=CERT)
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "none"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test", "b@other.test")
        with tls_events() as events:
            results = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    by_domain = {e["domain"]: outcome(e) for e in events}
    assert by_domain == {"dst.test": ("none", "table", 'delivery.route."dst.test".tls', "cleartext"),
                         "other.test": ("may", "default", "delivery.tls_policy", "encrypted")}
    tls_by_rcpt = {m.recipients[0]: m.tls for m in sink.messages}
    assert tls_by_rcpt == {"a@dst.test": False, "b@other.test": True}
    plain = next(s for s in sink.sessions if s.messages and s.messages[0].recipients == ["a@dst.test"])
    assert "STARTTLS" not in plain.commands


@pytest_twisted.ensureDeferred
async def test_entry_port_and_bracketed_smarthost(tmp_path: Path, dst_dns: Any) -> None:
    first, second = await start_sink(), await start_sink()
    try:
        cfg = config(tmp_path, {"mx_port": 9, "route": {
            "dst.test": {"port": first.port},
            ".sub.test": {"smarthost": f"[127.0.0.1]:{second.port}"}}}, dst_dns)
        env, path = envelope(tmp_path, "a@dst.test", "b@x.sub.test")
        results = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await first.stop()
        await second.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [m.recipients for m in first.messages] == [["a@dst.test"]]
    assert [m.recipients for m in second.messages] == [["b@x.sub.test"]]
    assert not dst_dns.asked("x.sub.test", "MX")  # [host]: no MX lookup


@pytest_twisted.ensureDeferred
async def test_smarthost_without_brackets_goes_through_its_mx_records(tmp_path: Path,
                                                                     dst_dns: Any) -> None:
    dst_dns.load({"relay.test": {"MX": [(10, "in.relay.test")]}, "in.relay.test": {"A": ["127.0.0.2"]}})
    sink = await start_sink(interface="127.0.0.2")
    try:
        cfg = config(tmp_path, {"route": {"far.test": {"smarthost": f"relay.test:{sink.port}"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@far.test")
        [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DELIVERED and result.remote_mta == "in.relay.test"
    assert dst_dns.asked("relay.test", "MX") == 1 and not dst_dns.asked("far.test", "MX")


@pytest_twisted.ensureDeferred
async def test_dane_required_without_dane_defers_without_connecting(tmp_path: Path,
                                                                   dst_dns: Any) -> None:
    sink = await start_sink(tls=CERT)
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "dane"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DEFERRED
    assert result.reply == ('451 4.7.5 TLS policy dane for dst.test (delivery.route."dst.test".tls) '
                            "needs DANE, which is not available here ([dane] is not enabled)")
    assert sink.sessions == []


@pytest_twisted.ensureDeferred
async def test_mta_sts_required_without_mta_sts_defers_without_connecting(tmp_path: Path,
                                                                         dst_dns: Any) -> None:
    sink = await start_sink(tls=CERT)
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "route": {"dst.test": {"tls": "mta-sts"}}},
                     dst_dns)
        env, path = envelope(tmp_path, "a@dst.test")
        [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DEFERRED and result.status == "4.7.5"
    assert result.reply == ('451 4.7.5 TLS policy mta-sts for dst.test (delivery.route."dst.test"'
                            '.tls) needs MTA-STS, which is not available here ([delivery.mta_sts] '
                            "is not enabled)")
    assert sink.sessions == []


# --- source address and HELO name ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_outbound_connection_comes_from_the_bind_address(tmp_path: Path,
                                                               dst_dns: Any) -> None:
    dst_dns.load({"own.test": {"MX": [(10, MX)]}})
    sink = await start_sink()
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "bind_address": "127.0.0.2",
                                "helo_name": "helo.example.test",
                                "route": {"own.test": {"bind_address": "127.0.0.3"}}}, dst_dns)
        env, path = envelope(tmp_path, "a@dst.test", "b@own.test")
        results = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    peers = {s.messages[0].recipients[0]: (s.peer, s.helo) for s in sink.sessions}
    assert peers == {"a@dst.test": ("127.0.0.2", "helo.example.test"),
                     "b@own.test": ("127.0.0.3", "helo.example.test")}


@pytest_twisted.ensureDeferred
async def test_ipv6_connection_comes_from_bind_address6(tmp_path: Path, dst_dns: Any) -> None:
    dst_dns.load({"six.test": {"MX": [(10, "mx6.six.test")]}, "mx6.six.test": {"AAAA": ["::1"]}})
    sink = await start_sink(interface="::1")
    try:
        cfg = config(tmp_path, {"mx_port": sink.port, "bind_address": "127.0.0.2",
                                "bind_address6": "::1"}, dst_dns)
        env, path = envelope(tmp_path, "a@six.test")
        [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    finally:
        await sink.stop()
    assert result.outcome is Outcome.DELIVERED
    assert sink.sessions[0].peer == "::1"


@pytest_twisted.ensureDeferred
async def test_a_bind_address_not_on_this_host_defers_with_the_reason(tmp_path: Path,
                                                                      dst_dns: Any) -> None:
    cfg = config(tmp_path, {"mx_port": 9, "bind_address": "192.0.2.1"}, dst_dns)
    env, path = envelope(tmp_path, "a@dst.test")
    [result] = await courier(cfg, dst_dns).deliver(env, env.recipients, path)
    assert result.outcome is Outcome.DEFERRED and result.status == "4.4.1"
    assert "connect to" in result.reply and "192.0.2.1" in result.reply


# --- the real daemon: a table smarthost with credentials ----------------------------------

DAEMON_CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
log_json = "var/log.json"

[listeners.submission]
endpoint = "tcp:{submission_port}:interface=127.0.0.1"
kind = "submission"

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[spf]
enabled = false

[dkim]
verify = false

[dmarc]
enabled = false

[dns]
servers = ["127.0.0.1:9"]
timeout = 1

[delivery]
retry_schedule = [1]
retry_jitter = 0

[delivery.route.".remote.test"]
smarthost = "[127.0.0.2]:{sink_port}"
tls = "encrypt"
username = "relayuser"
password = "{relay_password}"
"""
RELAY_PASSWORD = "Pa55-never-in-the-logs"


@pytest_twisted.ensureDeferred
async def test_daemon_table_smarthost_authenticates_and_never_logs_the_password(
        tmp_path: Path) -> None:
    import smtplib

    from tests.daemon import Daemon, free_port
    from tests.harness import PASSWORD, client_tls_context, in_thread, shared_ca, write_domain
    from tests.test_e2e import wait_for

    sink = await start_sink(interface="127.0.0.2", tls=CERT, auth={"relayuser": RELAY_PASSWORD},
                            auth_required=True)
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    cert = shared_ca().issue_cert("mx.example.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port = free_port()
    path = tmp_path / "mta.toml"
    path.write_text(DAEMON_CONFIG.format(submission_port=port, sink_port=sink.port,
                                         relay_password=RELAY_PASSWORD))
    daemon = Daemon(tmp_path, path, port)
    try:
        await in_thread(daemon.start)

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.starttls(context=client_tls_context())
                s.login("alice@example.test", PASSWORD)
                s.sendmail("alice@example.test", ["friend@eu.remote.test"],
                           b"Subject: via the table\r\n\r\nhello\r\n")

        await in_thread(submit)
        await wait_for(lambda: sink.messages, what="delivery at the smarthost")
        json_log = tmp_path / "var" / "log.json"
        await wait_for(lambda: json_log.exists() and "tls_outcome" in json_log.read_text(),
                       what="the tls_outcome event")
    finally:
        await in_thread(daemon.terminate)
        await sink.stop()
    [msg] = sink.messages
    assert msg.recipients == ["friend@eu.remote.test"] and msg.tls
    assert msg.auth_user == "relayuser"
    assert any(c.startswith("AUTH PLAIN ") for c in sink.sessions[0].commands)
    text_log, records = daemon.read_log(), json_log.read_text()
    assert RELAY_PASSWORD not in text_log and RELAY_PASSWORD not in records
    [event] = [json.loads(line) for line in records.splitlines()
               if json.loads(line).get("event") == "tls_outcome"]
    assert (event["policy"], event["source"], event["result"], event["domain"]) == (
        "encrypt", "table", "encrypted", "eu.remote.test")
    assert event["origin"] == 'delivery.route.".remote.test".tls'
    assert "TLS to 127.0.0.2 for eu.remote.test: encrypted" in text_log

