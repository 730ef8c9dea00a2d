"""MX resolution (RFC 5321 §5.1, RFC 7505) against the loopback DNS server."""

from __future__ import annotations

import random
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from mta.config import DNSConfig
from mta.delivery.mx import (
    DNSError,
    MXHost,
    MXResolver,
    PermanentDNSError,
    TemporaryDNSError,
    order_by_preference,
)
from mta.system.dns import (
    CachingResolver,
    attempt_timeouts,
    make_resolver,
    nameservers,
    read_resolv_conf,
)
from tests.dnsserver import LoopbackDNS

ZONE = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test"),
                            (30, "mx3.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.2"]},
    "mx3.example.test": {"AAAA": ["2001:db8::3"]},
}


def resolver_for(server, timeout: float = 1.0, seed: int = 0, **kwargs) -> MXResolver:
    return MXResolver(make_resolver(server.dns_config(timeout)), random.Random(seed), **kwargs)


@pytest_twisted.ensureDeferred
async def test_mx_hosts_in_preference_order_with_their_addresses(dns_server):
    dns_server.load(ZONE)
    hosts = await resolver_for(dns_server).resolve("example.test")
    assert hosts == [
        MXHost("mx1.example.test", 10, ("::1", "127.0.0.1")),
        MXHost("mx2.example.test", 20, ("127.0.0.2",)),
        MXHost("mx3.example.test", 30, ("2001:db8::3",)),
    ]


@pytest_twisted.ensureDeferred
async def test_both_aaaa_and_a_are_asked_for_each_host(dns_server):
    dns_server.load(ZONE)
    await resolver_for(dns_server).resolve("Example.TEST.")
    for host in ("mx1.example.test", "mx2.example.test", "mx3.example.test"):
        assert dns_server.asked(host, "A") == 1
        assert dns_server.asked(host, "AAAA") == 1


@pytest_twisted.ensureDeferred
async def test_prefer_ipv4_lists_ipv4_first(dns_server):
    dns_server.load(ZONE)
    hosts = await resolver_for(dns_server, prefer_ipv4=True).resolve("example.test")
    assert hosts[0].addresses == ("127.0.0.1", "::1")


@pytest_twisted.ensureDeferred
async def test_equal_preferences_are_shuffled_by_the_rng(dns_server):
    names = [f"mx{i}.shuffle.test" for i in range(4)]
    dns_server.load({"shuffle.test": {"MX": [(5, "first.shuffle.test")]
                                      + [(10, name) for name in names]},
                     "first.shuffle.test": {"A": "127.0.0.9"},
                     **{name: {"A": f"127.0.1.{i}"} for i, name in enumerate(names)}})
    orders = []
    for seed in range(6):
        hosts = await resolver_for(dns_server, seed=seed).resolve("shuffle.test")
        assert hosts[0].name == "first.shuffle.test"  # lower preference always first
        assert sorted(h.name for h in hosts[1:]) == names
        orders.append(tuple(h.name for h in hosts))
    again = await resolver_for(dns_server, seed=3).resolve("shuffle.test")
    assert tuple(h.name for h in again) == orders[3]  # same seed, same order
    assert len(set(orders)) > 1  # and the order of equals does vary


def test_order_by_preference_keeps_lowest_preference_of_a_repeated_host():
    ordered = order_by_preference([(20, "a"), (10, "b"), (5, "a")], random.Random(1))
    assert ordered == [(5, "a"), (10, "b")]


@pytest_twisted.ensureDeferred
async def test_no_mx_record_means_the_domain_itself_is_the_mx(dns_server):
    dns_server.load({"implicit.test": {"A": ["127.0.0.5"], "AAAA": ["::1"],
                                       "TXT": ["not an mx"]}})
    hosts = await resolver_for(dns_server).resolve("implicit.test")
    assert hosts == [MXHost("implicit.test", 0, ("::1", "127.0.0.5"))]


@pytest_twisted.ensureDeferred
async def test_no_mx_and_no_address_is_a_temporary_error_that_says_so(dns_server):
    dns_server.load({"empty.test": {"TXT": ["v=spf1 -all"]}})
    with pytest.raises(TemporaryDNSError) as info:
        await resolver_for(dns_server).resolve("empty.test")
    assert "empty.test has no MX record and no address" in info.value.text
    assert info.value.status.startswith("4.")


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_permanently_with_556_5_1_10(dns_server):
    dns_server.load({"nomail.test": {"MX": [(0, ".")], "A": ["127.0.0.1"]}})
    with pytest.raises(PermanentDNSError) as info:
        await resolver_for(dns_server).resolve("nomail.test")
    error = info.value
    assert error.permanent is True
    assert (error.code, error.status) == (556, "5.1.10")
    assert error.reply == "556 5.1.10 domain nomail.test does not accept mail (null MX)"
    # RFC 7505: no fallback to the domain's A record.
    assert dns_server.asked("nomail.test", "A") == 0


@pytest_twisted.ensureDeferred
async def test_null_mx_mixed_with_real_mx_is_ignored(dns_server):
    dns_server.load({"mixed.test": {"MX": [(0, "."), (10, "mx.mixed.test")]},
                     "mx.mixed.test": {"A": ["127.0.0.7"]}})
    hosts = await resolver_for(dns_server).resolve("mixed.test")
    assert hosts == [MXHost("mx.mixed.test", 10, ("127.0.0.7",))]


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_permanent(dns_server):
    with pytest.raises(PermanentDNSError) as info:
        await resolver_for(dns_server).resolve("nowhere.test")
    assert info.value.status == "5.1.2"
    assert "does not exist" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_servfail_on_mx_is_temporary(dns_server):
    dns_server.load({"broken.test": "SERVFAIL"})
    with pytest.raises(TemporaryDNSError) as info:
        await resolver_for(dns_server).resolve("broken.test")
    assert info.value.permanent is False
    assert "SERVFAIL" in info.value.text
    assert info.value.reply.startswith("451 4.4.3 ")


@pytest_twisted.ensureDeferred
async def test_timeout_on_mx_is_temporary_and_bounded(dns_server):
    dns_server.load({"slow.test": {"MX": "TIMEOUT"}})
    started = time.monotonic()
    with pytest.raises(TemporaryDNSError) as info:
        await resolver_for(dns_server, timeout=0.3).resolve("slow.test")
    assert "timeout" in info.value.text
    assert time.monotonic() - started < 2.0
    assert dns_server.asked("slow.test", "MX") == 2  # one retry within the budget


@pytest_twisted.ensureDeferred
async def test_host_with_failing_aaaa_still_uses_its_a_record(dns_server):
    dns_server.load({"half.test": {"MX": [(10, "mx.half.test")]},
                     "mx.half.test": {"A": ["127.0.0.8"], "AAAA": "SERVFAIL"}})
    hosts = await resolver_for(dns_server).resolve("half.test")
    assert hosts == [MXHost("mx.half.test", 10, ("127.0.0.8",))]


@pytest_twisted.ensureDeferred
async def test_unresolvable_hosts_are_skipped(dns_server):
    dns_server.load({"skip.test": {"MX": [(10, "gone.skip.test"), (20, "noaddr.skip.test"),
                                          (30, "mx.skip.test")]},
                     "noaddr.skip.test": {"TXT": ["no address here"]},
                     "mx.skip.test": {"AAAA": ["::1"]}})
    hosts = await resolver_for(dns_server).resolve("skip.test")
    assert hosts == [MXHost("mx.skip.test", 30, ("::1",))]


@pytest_twisted.ensureDeferred
async def test_all_hosts_failing_temporarily_is_temporary(dns_server):
    dns_server.load({"down.test": {"MX": [(10, "mx1.down.test"), (20, "mx2.down.test")]},
                     "mx1.down.test": "SERVFAIL",
                     "mx2.down.test": {"A": "TIMEOUT", "AAAA": "SERVFAIL"}})
    with pytest.raises(TemporaryDNSError) as info:
        await resolver_for(dns_server, timeout=0.3).resolve("down.test")
    text = info.value.text
    assert "mx1.down.test: AAAA DNS server failure (SERVFAIL)" in text
    assert "mx2.down.test" in text and "DNS timeout" in text


@pytest_twisted.ensureDeferred
async def test_mx_hosts_without_any_address_is_temporary(dns_server):
    dns_server.load({"noaddr.test": {"MX": [(10, "mx.noaddr.test")]},
                     "mx.noaddr.test": {"TXT": ["nothing"]}})
    with pytest.raises(DNSError) as info:
        await resolver_for(dns_server).resolve("noaddr.test")
    assert info.value.permanent is False
    assert "mx.noaddr.test: no address record" in info.value.text


@pytest_twisted.ensureDeferred
async def test_mx_host_behind_a_cname_is_followed(dns_server):
    dns_server.load({"alias.test": {"MX": [(10, "mail.alias.test")]},
                     "mail.alias.test": {"CNAME": "real.alias.test"},
                     "real.alias.test": {"A": ["127.0.0.4"], "AAAA": ["::1"]}})
    hosts = await resolver_for(dns_server).resolve("alias.test")
    assert hosts == [MXHost("mail.alias.test", 10, ("::1", "127.0.0.4"))]


@pytest_twisted.ensureDeferred
async def test_mx_naming_an_ip_address_is_skipped(dns_server):
    dns_server.load({"ipmx.test": {"MX": [(10, "127.0.0.1"), (20, "mx.ipmx.test")]},
                     "mx.ipmx.test": {"A": ["127.0.0.3"]},
                     "onlyip.test": {"MX": [(10, "127.0.0.1")]}})
    hosts = await resolver_for(dns_server).resolve("ipmx.test")
    assert [h.name for h in hosts] == ["mx.ipmx.test"]
    with pytest.raises(PermanentDNSError) as info:
        await resolver_for(dns_server).resolve("onlyip.test")
    assert "no usable MX" in info.value.text


@pytest_twisted.ensureDeferred
async def test_address_literal_needs_no_dns(dns_server):
    resolver = resolver_for(dns_server)
    assert await resolver.resolve("[127.0.0.1]") == [MXHost("127.0.0.1", 0, ("127.0.0.1",))]
    assert await resolver.resolve("[IPv6:::1]") == [MXHost("::1", 0, ("::1",))]
    assert dns_server.queries == []


@pytest_twisted.ensureDeferred
async def test_own_name_cuts_the_list_rfc5321_5_1(dns_server):
    dns_server.load(ZONE)
    hosts = await resolver_for(dns_server, own_names=["MX2.example.test"]).resolve("example.test")
    assert [h.name for h in hosts] == ["mx1.example.test"]
    with pytest.raises(PermanentDNSError) as info:
        await resolver_for(dns_server, own_names=["mx1.example.test"]).resolve("example.test")
    assert "loops back to myself" in info.value.text


@pytest_twisted.ensureDeferred
async def test_records_changed_while_running_are_seen(dns_server):
    dns_server.load({"change.test": {"MX": [(10, "mx.elsewhere.test")]},
                     "mx.elsewhere.test": {"A": ["127.0.0.1"]}})
    resolver = resolver_for(dns_server)
    assert (await resolver.resolve("change.test"))[0].addresses == ("127.0.0.1",)
    dns_server.add("mx.elsewhere.test", "A", "127.0.0.2")
    assert (await resolver.resolve("change.test"))[0].addresses == ("127.0.0.1", "127.0.0.2")
    dns_server.remove("change.test")
    with pytest.raises(PermanentDNSError):
        await resolver.resolve("change.test")


@pytest_twisted.ensureDeferred
async def test_dns_server_answers_over_tcp_on_the_same_port(dns_server):
    from twisted.names import dns

    dns_server.load({"tcp.test": {"TXT": ["over tcp"]}})
    resolver = make_resolver(dns_server.dns_config())
    message = await resolver.queryTCP([dns.Query("tcp.test", dns.TXT)])
    assert [rr.payload.data for rr in message.answers] == [[b"over tcp"]]


def test_resolv_conf_is_read_when_no_servers_are_configured(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.org\nnameserver 10.0.0.1\nnameserver ::1\n")
    assert read_resolv_conf(conf) == [("10.0.0.1", 53), ("::1", 53)]
    assert nameservers(DNSConfig(), conf) == [("10.0.0.1", 53), ("::1", 53)]
    assert nameservers(DNSConfig(), tmp_path / "missing") == [("127.0.0.1", 53)]
    assert nameservers(DNSConfig(servers=(("127.0.0.1", 5353),)), conf) == [("127.0.0.1", 5353)]
    resolver = make_resolver(DNSConfig(timeout=6.0), resolv_conf=conf)
    assert resolver.servers == [("10.0.0.1", 53), ("::1", 53)]
    assert sum(resolver.timeout) * len(resolver.servers) == pytest.approx(6.0)


def test_attempt_timeouts_spend_the_whole_budget():
    assert attempt_timeouts(3.0, 1) == pytest.approx((1.0, 2.0))
    assert sum(attempt_timeouts(5.0, 2)) * 2 == pytest.approx(5.0)


# --- the answer cache for delivery (mta.system.dns.CachingResolver) ---------------------------


def cached_resolver_for(server, clock, **kwargs) -> tuple[MXResolver, CachingResolver]:
    cache = CachingResolver(make_resolver(server.dns_config(1.0)), clock, **kwargs)
    return MXResolver(cache, random.Random(0)), cache


@pytest_twisted.ensureDeferred
async def test_cached_answers_are_used_until_their_ttl_runs_out(dns_server):
    dns_server.load(ZONE)  # records with a TTL of 60 s
    clock = Clock()
    resolver, cache = cached_resolver_for(dns_server, clock)
    first = await resolver.resolve("example.test")
    clock.advance(59)
    assert await resolver.resolve("Example.Test.") == first
    assert dns_server.asked("example.test", "MX") == 1
    assert dns_server.asked("mx1.example.test", "A") == 1
    # The domain moves to another mail host: seen once the TTL has passed.
    dns_server.set("example.test", "MX", [(10, "mx2.example.test")])
    clock.advance(2)
    assert await resolver.resolve("example.test") == [MXHost("mx2.example.test", 10, ("127.0.0.2",))]
    assert dns_server.asked("example.test", "MX") == 2
    # 1st: 7 questions (MX, A and AAAA of 3 hosts); 2nd: all 7 from the cache, the
    # 2 empty ones (mx2 has no AAAA, mx3 no A) too, for their SOA's negative TTL
    # (RFC 2308; 60 s here); 3rd: MX, A, AAAA asked again.
    assert dns_server.asked("mx2.example.test", "AAAA") == 2
    assert (cache.hits, cache.misses) == (7, 10)


@pytest_twisted.ensureDeferred
async def test_failures_and_ttl_zero_are_never_cached_and_max_ttl_caps(dns_server):
    clock = Clock()
    dns_server.load({"down.test": "SERVFAIL"})
    resolver, _ = cached_resolver_for(dns_server, clock, max_ttl=10)
    with pytest.raises(TemporaryDNSError):
        await resolver.resolve("down.test")
    dns_server.load({"down.test": {"MX": [(10, "mx2.example.test")]},
                     "mx2.example.test": {"A": ["127.0.0.2"]}})
    assert (await resolver.resolve("down.test"))[0].addresses == ("127.0.0.2",)  # asked again
    clock.advance(11)  # past max_ttl (10), well before the records' 60 s
    await resolver.resolve("down.test")
    assert dns_server.asked("down.test", "MX") == 3

    zero = LoopbackDNS(ZONE, ttl=0)
    await zero.start()
    try:
        resolver, cache = cached_resolver_for(zero, clock)
        await resolver.resolve("example.test")
        await resolver.resolve("example.test")
        assert zero.asked("example.test", "MX") == 2 and cache.hits == 0
    finally:
        await zero.stop()


def test_cache_setting_and_wiring(tmp_path):
    from mta.config import ConfigError, config_from_dict
    from mta.delivery.wiring import build_couriers

    config = config_from_dict({"hostname": "h.test", "dns": {"servers": ["127.0.0.1:9"]}}, tmp_path)
    assert config.dns.cache_max_ttl == 3600
    assert isinstance(build_couriers(config, reactor)["remote"].resolver._resolver, CachingResolver)
    off = config_from_dict({"hostname": "h.test", "dns": {"servers": ["127.0.0.1:9"],
                                                           "cache_max_ttl": 0}}, tmp_path)
    assert not isinstance(build_couriers(off, reactor)["remote"].resolver._resolver, CachingResolver)
    with pytest.raises(ConfigError, match="dns.cache_max_ttl"):
        config_from_dict({"hostname": "h.test", "dns": {"cache_max_ttl": -1}}, tmp_path)


@pytest_twisted.ensureDeferred
async def test_an_empty_answer_is_kept_only_for_its_soa_negative_ttl():
    """RFC 2308 §5: "no such record" is kept for min(SOA TTL, SOA MINIMUM); an empty
    answer without an SOA is not kept at all."""
    from twisted.internet.defer import succeed as fired
    from twisted.names import dns

    soa = dns.RRHeader(b"example.test", dns.SOA, dns.IN, 30,
                       dns.Record_SOA(mname=b"ns.example.test", rname=b"h.example.test",
                                      minimum=5, ttl=30))
    asked: list[str] = []

    class Upstream:
        def lookupIPV6Address(self, name, timeout=None):  # noqa: N802
            asked.append(name)
            return fired(([], [soa] if name.startswith("with-soa") else [], []))

    clock = Clock()
    cache = CachingResolver(Upstream(), clock)
    for _ in range(2):
        await cache.lookupIPV6Address("with-soa.example.test")
        await cache.lookupIPV6Address("no-soa.example.test")
    assert asked == ["with-soa.example.test", "no-soa.example.test", "no-soa.example.test"]
    clock.advance(5.5)  # past MINIMUM (5 s), well before the SOA's own TTL (30 s)
    await cache.lookupIPV6Address("with-soa.example.test")
    assert asked[-1] == "with-soa.example.test" and len(asked) == 4
