"""DMARC (mta.policy.dmarc): the author domain, policy records, alignment, lookups.

The pure parts are tested with values; the lookups go through the loopback
DNS server with the MTA's own TXT lookup.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mta.policy.dkim import DKIMResult, DNSTempError, make_dns_txt
from mta.policy.dmarc import (
    DMARCPolicy,
    DMARCRecordError,
    DMARCResult,
    aligned,
    approximate_organizational_domain,
    author_domain,
    check,
    evaluate,
    header_from_domain,
    lookup,
    organizational_domain,
    parse_record,
)

# --- organizational domains and alignment --------------------------------------------


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("mail.example.com", "example.com"),
    ("a.b.c.example.com.", "example.com"),
    ("MAIL.Example.COM", "example.com"),
    ("news.bbc.co.uk", "bbc.co.uk"),
    ("bbc.co.uk", "bbc.co.uk"),
    ("mx.example.test", "example.test"),
    ("com", "com"),
])
def test_organizational_domain(domain, org):
    assert organizational_domain(domain) == org
    assert approximate_organizational_domain(domain) == org


def test_public_suffix_list_knows_more_than_the_approximation():
    # A private-section suffix: each project is its own organization.
    assert organizational_domain("alice.github.io") == "alice.github.io"
    assert approximate_organizational_domain("alice.github.io") == "github.io"
    assert organizational_domain("a.b.example.kawasaki.jp") == "b.example.kawasaki.jp"


def test_alignment_modes():
    assert aligned("bounce.example.com", "example.com", "r")
    assert aligned("example.com", "news.example.com", "r")
    assert not aligned("bounce.example.com", "example.com", "s")
    assert aligned("Example.com.", "example.COM", "s")
    assert not aligned("example.net", "example.com", "r")
    assert not aligned("other.co.uk", "example.co.uk", "r")  # co.uk is no organization
    assert not aligned("", "example.com", "r")


# --- the record -----------------------------------------------------------------------


def test_parse_full_record():
    p = parse_record(b"v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=s; pct=25; "
                     b"rua=mailto:d@example.com", "example.com")
    assert p == DMARCPolicy("reject", "quarantine", "s", "s", 25, "example.com")


def test_parse_defaults_and_case():
    assert parse_record("v=DMARC1;p=Quarantine") == DMARCPolicy("quarantine", "quarantine")
    assert parse_record("v=DMARC1 ; p = none ; ") == DMARCPolicy("none", "none")


def test_parse_bad_optional_values_fall_back_to_defaults():
    p = parse_record("v=DMARC1; p=reject; sp=bogus; adkim=x; aspf=; pct=500; fo=9")
    assert p == DMARCPolicy("reject", "reject", "r", "r", 100)
    assert parse_record("v=DMARC1; p=reject; pct=-1").pct == 100
    assert parse_record("v=DMARC1; p=reject; pct=0").pct == 0


@pytest.mark.parametrize("text", [
    "p=reject; v=DMARC1",  # v must be first (RFC 7489 §6.4)
    "v=DMARC2; p=reject",
    "v=spf1 -all",
    "",
    "v=DMARC1; p=blackhole",
    "v=DMARC1",
    "v=DMARC1; p=reject; garbage",
])
def test_unusable_records(text):
    with pytest.raises(DMARCRecordError):
        parse_record(text)


def test_missing_p_with_rua_means_none():
    # RFC 7489 §6.6.3: act as if p=none was published.
    assert parse_record("v=DMARC1; rua=mailto:r@example.com").p == "none"


# --- the author domain -------------------------------------------------------------------


@pytest.mark.parametrize("lines, domain", [
    ([b"From: alice@Example.COM"], "example.com"),
    ([b"From: Alice <alice@example.com>"], "example.com"),
    ([b"from:   \"Smith, Alice (HR)\" <alice@example.com>"], "example.com"),
    ([b'From: "alice@evil.test" <alice@example.com>'], "example.com"),
    ([b"From: (comment, with <brackets>) alice@example.com (another @ one)"], "example.com"),
    ([b"From: Alice", b" <alice@", b"\texample.com>"], "example.com"),
    ([b"From: =?utf-8?q?J=C3=B6rg?= <j@b\xc3\xbccher.example>"], "xn--bcher-kva.example"),
    ([b'From: "quoted \\" <x@evil.test>" <real@example.com>'], "example.com"),
    ([b"Subject: x", b"From: a@example.com", b"To: b@example.org"], "example.com"),
])
def test_header_from_domain(lines, domain):
    assert header_from_domain(lines) == domain


@pytest.mark.parametrize("lines, problem", [
    ([b"To: a@example.com"], "no From field"),
    ([b"From: a@example.com", b"FROM: b@example.org"], "several From fields"),
    ([b"From: a@example.com, b@example.org"], "several addresses"),
    ([b"From: Alice <a@example.com>, Bob <b@example.org>"], "several addresses"),
    ([b"From: friends: a@example.com, b@example.org;"], "group"),
    ([b"From: undisclosed-recipients:;"], "group"),
    ([b"From: alice"], "no domain"),
    ([b"From: <>"], "no domain"),
    ([b"From: a@[192.0.2.1]"], "not a domain name"),
    ([b"From: a@exa mple.com"], "malformed"),
    ([b"From: a@-bad-.com"], "bad From domain"),
    ([b"From:"], "empty"),
    ([b"From: Alice <a@example.com"], "unclosed"),
])
def test_no_author_domain(lines, problem):
    result = author_domain(lines)
    assert result.domain is None
    assert problem in result.problem


# --- evaluation ---------------------------------------------------------------------------

REJECT = DMARCPolicy("reject", "reject", domain="example.com")


def dkim_pass(domain: str) -> DKIMResult:
    return DKIMResult("pass", domain, "sel", "abcdefgh")


def test_aligned_spf_passes():
    r = evaluate("example.com", "pass", "bounces.example.com", [], REJECT)
    assert r == DMARCResult("pass", "reject", "none", "example.com", r.reason)
    assert "SPF" in r.reason


def test_aligned_dkim_passes_even_when_spf_fails():
    r = evaluate("example.com", "fail", "example.com", [dkim_pass("mail.example.com")], REJECT)
    assert (r.result, r.disposition) == ("pass", "none")


def test_unaligned_passes_fail_and_reject():
    r = evaluate("example.com", "pass", "mailer.test",
                 [dkim_pass("mailer.test"), DKIMResult("fail", "example.com")], REJECT)
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")


def test_strict_alignment():
    strict = DMARCPolicy("reject", "reject", adkim="s", aspf="s", domain="example.com")
    assert evaluate("example.com", "pass", "bounce.example.com",
                    [dkim_pass("mail.example.com")], strict).result == "fail"
    assert evaluate("example.com", "pass", "example.com", [], strict).result == "pass"
    assert evaluate("example.com", "none", "", [dkim_pass("example.com")], strict).result == "pass"


def test_spf_softfail_or_neutral_does_not_count():
    for spf in ("softfail", "neutral", "none", "temperror"):
        assert evaluate("example.com", spf, "example.com", [], REJECT).result == "fail"


def test_quarantine_and_none_policies():
    q = DMARCPolicy("quarantine", "quarantine", domain="example.com")
    assert evaluate("example.com", "fail", "example.com", [], q).disposition == "quarantine"
    n = DMARCPolicy("none", "none", domain="example.com")
    r = evaluate("example.com", "fail", "example.com", [], n)
    assert (r.result, r.disposition) == ("fail", "none")


def test_subdomain_policy_applies_to_subdomains_only():
    p = DMARCPolicy("reject", "quarantine", domain="example.com")
    assert evaluate("news.example.com", "fail", "x.test", [], p).disposition == "quarantine"
    assert evaluate("example.com", "fail", "x.test", [], p).disposition == "reject"


def test_pct_sampling_downgrades():
    half = DMARCPolicy("reject", "reject", pct=50, domain="example.com")
    assert evaluate("example.com", "fail", "x.test", [], half, sample=0.2).disposition == "reject"
    assert evaluate("example.com", "fail", "x.test", [], half,
                    sample=0.7).disposition == "quarantine"
    zero = DMARCPolicy("quarantine", "quarantine", pct=0, domain="example.com")
    assert evaluate("example.com", "fail", "x.test", [], zero).disposition == "none"


def test_no_policy_and_no_author():
    assert evaluate("example.com", "pass", "example.com", [], None).result == "none"
    r = evaluate(None, "pass", "example.com", [], REJECT, problem="several From fields")
    assert (r.result, r.disposition, r.reason) == ("permerror", "none", "several From fields")


# --- lookups through the loopback DNS --------------------------------------------------


@pytest.fixture
def dns(dns_server):
    dns_server.load({
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; aspf=s"]},
        "_dmarc.own.example.test": {"TXT": ["v=DMARC1; p=none"]},
        "_dmarc.two.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
        "_dmarc.mixed.test": {"TXT": ["google-site-verification=abc", "v=DMARC1; p=quarantine"]},
        "_dmarc.broken.test": "SERVFAIL",
    })
    return dns_server, make_dns_txt(dns_server.dns_config(timeout=1.0))


def find(domain: str, dns_txt) -> Deferred[DMARCPolicy | None]:
    return Deferred.fromCoroutine(lookup(domain, dns_txt))


@pytest_twisted.ensureDeferred
async def test_lookup_at_the_author_domain(dns):
    server, dns_txt = dns
    p = await find("Example.Test", dns_txt)
    assert p == DMARCPolicy("reject", "quarantine", "r", "s", 100, "example.test")
    assert server.queries == [("_dmarc.example.test", "TXT")]


@pytest_twisted.ensureDeferred
async def test_lookup_falls_back_to_the_organizational_domain(dns):
    server, dns_txt = dns
    p = await find("a.b.example.test", dns_txt)
    assert p is not None and p.domain == "example.test"
    assert server.queries == [("_dmarc.a.b.example.test", "TXT"), ("_dmarc.example.test", "TXT")]
    own = await find("own.example.test", dns_txt)
    assert own is not None and (own.p, own.domain) == ("none", "own.example.test")


@pytest_twisted.ensureDeferred
async def test_lookup_without_policy(dns):
    server, dns_txt = dns
    assert await find("nowhere.test", dns_txt) is None
    assert await find("two.test", dns_txt) is None  # two records: no policy (§6.6.3)
    p = await find("mixed.test", dns_txt)
    assert p is not None and p.p == "quarantine"


@pytest_twisted.ensureDeferred
async def test_lookup_dns_failure_raises(dns):
    _server, dns_txt = dns
    with pytest.raises(DNSTempError):
        await find("broken.test", dns_txt)


@pytest_twisted.ensureDeferred
async def test_check_end_to_end(dns):
    _server, dns_txt = dns
    headers = [b"From: Alice <alice@news.example.test>", b"To: bob@remote.test"]

    async def run(*args, **kwargs) -> DMARCResult:
        return await Deferred.fromCoroutine(check(*args, **kwargs))

    r = await run(headers, "pass", "other.test", [], dns_txt)
    assert (r.result, r.policy, r.disposition, r.from_domain) == (
        "fail", "quarantine", "quarantine", "news.example.test")
    r = await run(headers, "none", "", [dkim_pass("example.test")], dns_txt)
    assert (r.result, r.disposition) == ("pass", "none")
    r = await run([b"From: a@broken.test"], "pass", "broken.test", [], dns_txt)
    assert r.result == "temperror"
    r = await run([b"From: a@x.test", b"From: b@example.test"], "pass", "x.test", [], dns_txt)
    assert r.result == "permerror"
    r = await run([b"From: a@nowhere.test"], "pass", "nowhere.test", [], dns_txt)
    assert r.result == "none"
