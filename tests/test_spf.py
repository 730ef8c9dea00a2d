"""SPF checks (RFC 7208) through pyspf, with DNS served by the loopback DNS server."""

from __future__ import annotations

import authres
import pytest
import pytest_twisted
import spf
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mta.config import SPFConfig
from mta.policy.spf import (
    SPFChecker,
    SPFResult,
    authentication_results_spf,
    install_pyspf_dns_hook,
    received_spf_header,
    trace_headers,
)

ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 ip6:::1 -all"]},
    "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all exp=why.fail.test"]},
    "why.fail.test": {"TXT": ["%{i} is not a mail server of %{d}"]},
    "soft.test": {"TXT": ["v=spf1 ip4:192.0.2.1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "none.test": {"A": ["127.0.0.1"], "TXT": ["google-site-verification=abc"]},
    "broken.test": {"TXT": "SERVFAIL"},
    "bad.test": {"TXT": ["v=spf1 ip4:127.0.0.1 frobnicate:x -all"]},
    "slow.test": {"TXT": "TIMEOUT"},
    "mx.test": {"TXT": ["v=spf1 mx -all"], "MX": [(10, "mail.mx.test")]},
    "mail.mx.test": {"A": ["127.0.0.1"]},
    "include.test": {"TXT": ["v=spf1 include:pass.test -all"]},
    "mail.helo.test": {"TXT": ["v=spf1 a -all"], "A": ["127.0.0.1"]},
}


def checker_for(server, timeout: float = 2.0, **kwargs) -> SPFChecker:
    return SPFChecker(SPFConfig(timeout=timeout), server.dns_config(timeout=1.0), "mx.local.test",
                      **kwargs)


@pytest.mark.parametrize(
    ("sender", "client_ip", "expected"),
    [
        ("user@pass.test", "127.0.0.1", "pass"),
        ("user@pass.test", "::1", "pass"),
        ("user@fail.test", "127.0.0.1", "fail"),
        ("user@soft.test", "127.0.0.1", "softfail"),
        ("user@neutral.test", "127.0.0.1", "neutral"),
        ("user@none.test", "127.0.0.1", "none"),
        ("user@nxdomain.test", "127.0.0.1", "none"),
        ("user@broken.test", "127.0.0.1", "temperror"),
        ("user@bad.test", "127.0.0.1", "permerror"),
        ("user@mx.test", "127.0.0.1", "pass"),
        ("user@mx.test", "127.0.0.2", "fail"),
        ("user@include.test", "127.0.0.1", "pass"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_spf_results(dns_server, sender, client_ip, expected):
    dns_server.load(ZONE)
    result = await checker_for(dns_server).check(client_ip, sender, "client.example")
    assert result.result == expected
    assert result.identity == "mailfrom"
    assert result.domain == sender.partition("@")[2]
    # The lookups went to our loopback server, not the system resolver.
    assert dns_server.asked(result.domain, "TXT") >= 1


@pytest_twisted.ensureDeferred
async def test_fail_carries_the_domain_explanation(dns_server):
    dns_server.load(ZONE)
    result = await checker_for(dns_server).check("127.0.0.1", "a@fail.test", "client.example")
    assert result == SPFResult("fail", "127.0.0.1 is not a mail server of fail.test",
                               "fail.test", "mailfrom")


@pytest_twisted.ensureDeferred
async def test_permerror_explains_the_problem(dns_server):
    dns_server.load(ZONE)
    result = await checker_for(dns_server).check("127.0.0.1", "a@bad.test", "client.example")
    assert "frobnicate" in result.explanation


@pytest_twisted.ensureDeferred
async def test_null_sender_checks_postmaster_at_helo(dns_server):
    dns_server.load(ZONE)
    checker = checker_for(dns_server)
    result = await checker.check("127.0.0.1", "", "mail.helo.test")
    assert result == SPFResult("pass", result.explanation, "mail.helo.test", "helo")
    result = await checker.check("127.0.0.2", "", "mail.helo.test")
    assert (result.result, result.identity) == ("fail", "helo")


@pytest_twisted.ensureDeferred
async def test_helo_that_is_no_domain_gives_none_without_dns(dns_server):
    result = await checker_for(dns_server).check("127.0.0.1", "", "[127.0.0.1]")
    assert (result.result, result.identity) == ("none", "helo")
    assert dns_server.queries == []


@pytest_twisted.ensureDeferred
async def test_dns_timeout_is_temperror_within_the_spf_timeout(dns_server):
    dns_server.load(ZONE)
    result = await checker_for(dns_server, timeout=0.5).check("127.0.0.1", "a@slow.test", "h.test")
    assert result.result == "temperror"
    assert result.domain == "slow.test"
    assert result.explanation == "SPF Temporary Error: DNS timeout looking up slow.test TXT"


@pytest_twisted.ensureDeferred
async def test_servfail_explanation_does_not_reveal_the_dns_server(dns_server):
    dns_server.load(ZONE)
    result = await checker_for(dns_server).check("127.0.0.1", "a@broken.test", "h.test")
    assert result.explanation == "SPF Temporary Error: DNS server failure looking up broken.test TXT"


@pytest_twisted.ensureDeferred
async def test_reactor_side_guard_answers_temperror_when_the_thread_hangs(dns_server):
    clock = Clock()
    hung: list[Deferred] = []

    def never(*args, **kwargs):
        hung.append(Deferred())
        return hung[-1]

    checker = checker_for(dns_server, timeout=3.0, defer_to_thread=never, clock=clock)
    d = checker.check("127.0.0.1", "a@pass.test", "h.test")
    clock.advance(3.5)
    assert not d.called
    clock.advance(1.0)
    result = await d
    assert result == SPFResult("temperror", "SPF check timed out", "pass.test", "mailfrom")
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_disabled_spf_asks_nothing(dns_server):
    checker = SPFChecker(SPFConfig(enabled=False), dns_server.dns_config(), "mx.local.test")
    result = await checker.check("127.0.0.1", "a@pass.test", "h.test")
    assert result.result == "none"
    assert dns_server.queries == []


def test_pyspf_called_directly_keeps_its_own_lookup():
    install_pyspf_dns_hook()
    install_pyspf_dns_hook()  # idempotent
    # Outside a checker's thread the dispatcher falls back to pyspf's own lookup;
    # a record given explicitly needs no DNS at all.
    q = spf.query(i="192.0.2.1", s="a@example.com", h="h.example")
    assert q.check(spf="v=spf1 ip4:192.0.2.0/24 -all")[0] == "pass"


# --- headers -------------------------------------------------------------------------


def test_received_spf_header_for_pass():
    result = SPFResult("pass", "sender SPF authorized", "example.com", "mailfrom")
    header = received_spf_header(result, "192.0.2.1", "user@example.com", "mail.example.com",
                                 "mx.example.org")
    assert header == (
        "Received-SPF: pass (mx.example.org: domain of user@example.com designates 192.0.2.1"
        " as permitted sender) client-ip=192.0.2.1; envelope-from=\"user@example.com\";"
        " helo=mail.example.com; receiver=mx.example.org; identity=mailfrom"
    )


def test_received_spf_header_for_null_sender_ipv6_and_errors():
    result = SPFResult("temperror", "SPF Temporary Error: DNS (timeout)", "h.example", "helo")
    header = received_spf_header(result, "2001:db8::1", "", "h.example", "mx.example.org")
    assert header == (
        "Received-SPF: temperror (mx.example.org: error in processing during lookup of"
        " postmaster@h.example: SPF Temporary Error: DNS timeout)"
        " client-ip=\"2001:db8::1\"; helo=h.example; receiver=mx.example.org; identity=helo"
    )
    assert "\r" not in header and "\n" not in header


def test_authentication_results_header_with_authres():
    result = SPFResult("pass", "sender SPF authorized", "domain", "mailfrom")
    clause = authentication_results_spf(result, "user@domain", "client.example")
    header = authres.AuthenticationResultsHeader(authserv_id="host.example", results=[clause])
    assert str(header) == "Authentication-Results: host.example; spf=pass smtp.mailfrom=user@domain"


def test_authentication_results_for_null_sender_names_the_helo():
    result = SPFResult("fail", "", "h.example", "helo")
    clause = authentication_results_spf(result, "", "h.example")
    assert str(clause) == "spf=fail smtp.helo=h.example"


def test_trace_headers_are_folded_and_unfold_to_the_single_lines():
    result = SPFResult("pass", "sender SPF authorized", "example.com", "mailfrom")
    received, auth = trace_headers(result, "192.0.2.1", "user@example.com", "mail.example.com",
                                   "mx.example.org")
    assert all(len(line) <= 78 for line in received.split(b"\r\n"))
    assert received.replace(b"\r\n", b"").decode() == received_spf_header(
        result, "192.0.2.1", "user@example.com", "mail.example.com", "mx.example.org")
    assert received.split(b"\r\n")[1].startswith(b" ")
    assert auth.replace(b"\r\n", b"") == (
        b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=user@example.com")
    assert not received.endswith(b"\r\n")
