"""DNS blocklists and allowlists (issue 17): query names, Postfix's site syntax, the
screen against zones served by the loopback DNS server, and the check over real
SMTP at connect (554 greeting, then only QUIT) and at RCPT (postmaster exempt)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from mta.config import CHECKS, ConfigError, DNSBLConfig, dnsbl_site
from mta.policy.dnsbl import Score, Screen, matches, reversed_name
from mta.system.dns import make_resolver
from tests.harness import DEFAULT_ALIASES, RawClient, in_thread, make_config, start_mta
from tests.test_metrics import scrape_until, start_with_metrics, stop_with_metrics, value
from tests.test_pipeline import capture, stop_capture

pytestmark = pytest.mark.timeout(60)


# --- names and the site syntax ---------------------------------------------------------


def test_query_names_reverse_ipv4_octets_and_ipv6_nibbles():
    assert reversed_name("192.0.2.99") == "99.2.0.192"
    # RFC 5782 §2.4: 32 nibbles, least significant first.
    assert reversed_name("2001:db8::1") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2")
    assert reversed_name("::ffff:192.0.2.1") == "1.2.0.192"  # the IPv4 client it maps
    assert reversed_name("unknown") is None


@pytest.mark.parametrize("text,zone,weight,answer,listed", [
    ("zen.example", "zen.example", 1, "127.0.0.4", True),
    ("zen.example*2", "zen.example", 2, "127.0.0.4", True),
    ("zen.example=127.0.0.2", "zen.example", 1, "127.0.0.3", False),
    ("zen.example=127.0.0.[2..11]*3", "zen.example", 3, "127.0.0.11", True),
    ("zen.example=127.0.0.[2..11]*3", "zen.example", 3, "127.0.0.12", False),
    ("zen.example=127.0.0.[2;4]", "zen.example", 1, "127.0.0.4", True),
    ("zen.example=127.0.0.[2;4]", "zen.example", 1, "127.0.0.3", False),
    ("wl.example=127.0.[0..255].[1;3..5]*-2", "wl.example", -2, "127.0.9.4", True),
])
def test_sites_are_written_as_postscreen_dnsbl_sites(text, zone, weight, answer, listed):
    site = dnsbl_site(text, "dnsbl.sites[0]")
    assert (site.zone, site.weight) == (zone, weight)
    assert matches(site, answer) is listed


@pytest.mark.parametrize("section,message", [
    ({"sites": ["zen.example=127.0.0"]}, "dnsbl.sites[0]: 'zen.example=127.0.0': the filter must have four"),
    ({"sites": ["zen.example=127.0.0.[5..2]"]}, "dnsbl.sites[0]: 'zen.example=127.0.0.[5..2]': '[5..2]' is not"),
    ({"sites": ["not a zone"]}, "dnsbl.sites[0]: 'not a zone': must be zone[=filter][*weight]"),
    ({"sites": ["zen.example*0"]}, "dnsbl.sites[0]: 'zen.example*0': a weight of 0"),
    ({"sites": []}, "dnsbl.sites: is empty, but checks.order names dnsbl"),
    ({"sites": ["zen.example"], "stage": "data"}, "dnsbl.stage: must be connect or rcpt"),
    ({"sites": ["zen.example"], "threshold": 0}, "dnsbl.threshold: must be 1 or more"),
    ({"sites": ["zen.example"], "allowlist_threshold": 1}, "dnsbl.allowlist_threshold: must be 0"),
    ({"sites": ["zen.example"], "exempt": []}, "dnsbl.exempt: unknown key"),
])
def test_bad_dnsbl_settings_stop_start_up_with_their_key(tmp_path, section, message):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"dnsbl": section, "checks": {"order": ["dnsbl", *CHECKS]}})
    assert str(e.value).startswith(message)


def test_sites_without_the_check_in_the_order_are_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"dnsbl": {"sites": ["zen.example"]}})
    assert str(e.value) == ("dnsbl.sites: are set, but checks.order does not name dnsbl "
                            "(they would never be asked)")


# --- the screen against a real DNS server -----------------------------------------------


def screen_for(dns_server, clock, *sites: str, **settings: Any) -> Screen:
    config = DNSBLConfig(tuple(dnsbl_site(s, "dnsbl.sites") for s in sites), **settings)
    return Screen(config, make_resolver(dns_server.dns_config(timeout=0.6)), clock)


@pytest_twisted.ensureDeferred
async def test_weights_of_the_zones_that_list_a_client_are_summed(dns_server):
    dns_server.load({
        "2.0.0.127.zen.example": {"A": ["127.0.0.2", "127.0.0.10"]},  # one zone counts once
        "2.0.0.127.bl.example": {"A": ["127.0.0.2"]},
        "2.0.0.127.pbl.example": {"A": ["127.0.0.11"]},  # not admitted by its filter
        "2.0.0.127.wl.example": {"A": ["127.0.5.2"]},
    })
    screen = screen_for(dns_server, Clock(), "zen.example*2", "bl.example", "pbl.example=127.0.0.10",
                        "wl.example=127.0.[0..255].[1..3]*-1")
    score = await screen.score("127.0.0.2")
    assert score == Score(2, ("zen.example", "bl.example"), ("wl.example",))
    assert (await screen.score("127.0.0.3")).total == 0  # NXDOMAIN everywhere


@pytest_twisted.ensureDeferred
async def test_ipv6_clients_are_asked_in_nibble_form(dns_server):
    name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example"
    dns_server.load({name: {"A": ["127.0.0.2"]}})
    screen = screen_for(dns_server, Clock(), "zen.example")
    assert (await screen.score("2001:db8::1")).listed_by == ("zen.example",)
    assert dns_server.asked(name, "A") == 1


@pytest_twisted.ensureDeferred
async def test_answers_and_nxdomain_are_kept_for_their_ttl(dns_server):
    dns_server.load({"2.0.0.127.zen.example": {"A": ["127.0.0.2"]}})  # TTL 60, SOA minimum 60
    clock = Clock()
    screen = screen_for(dns_server, clock, "zen.example")
    assert (await screen.score("127.0.0.2")).total == 1
    assert (await screen.score("127.0.0.3")).total == 0
    # From the cache: synchronous answers, no question asked.
    assert screen.score("127.0.0.2") == Score(1, ("zen.example",), ())
    assert screen.score("127.0.0.3") == Score(0, (), ())
    assert screen.lookups == 2
    clock.advance(61)
    assert (await screen.score("127.0.0.2")).total == 1
    assert (await screen.score("127.0.0.3")).total == 0
    assert screen.lookups == 4
    assert dns_server.asked("2.0.0.127.zen.example", "A") == 2
    assert dns_server.asked("3.0.0.127.zen.example", "A") == 2


@pytest_twisted.ensureDeferred
async def test_a_failing_or_silent_list_never_blocks_and_is_logged(dns_server):
    dns_server.load({"2.0.0.127.zen.example": {"A": ["127.0.0.2"]},
                     "2.0.0.127.broken.example": "SERVFAIL",
                     "2.0.0.127.slow.example": "TIMEOUT"})
    screen = screen_for(dns_server, Clock(), "zen.example", "broken.example*5", "slow.example*5")
    events = capture()
    try:
        score = await screen.score("127.0.0.2")
    finally:
        stop_capture(events)
    assert score == Score(1, ("zen.example",), ())
    failed = sorted(e["zone"] for e in events if e.get("event") == "dnsbl")
    assert failed == ["broken.example", "slow.example"]
    assert all(e["result"] == "error" and e["ip"] == "127.0.0.2"
               for e in events if e.get("event") == "dnsbl")
    assert screen.score("127.0.0.2") is not score  # failures are not kept: asked again
    await screen.score("127.0.0.2")  # (let that second round end)


# --- over real SMTP ------------------------------------------------------------------


def dnsbl_config(dns_server, stage: str = "connect", order: list[str] | None = None,
                 **more: Any) -> dict[str, Any]:
    return {
        "dns": {"servers": [f"{dns_server.address[0]}:{dns_server.address[1]}"], "timeout": 1.0},
        "dnsbl": {"sites": ["zen.example=127.0.0.[2..11]*2", "bl.example"], "threshold": 2,
                  "stage": stage, **more},
        "checks": {"order": order or ["limits", "dnsbl", *CHECKS[1:]]},
        "relay_networks": ["127.0.0.5/32"],
    }


LISTED = {"2.0.0.127.zen.example": {"A": ["127.0.0.4"]},
          "5.0.0.127.zen.example": {"A": ["127.0.0.4"]},
          "3.0.0.127.bl.example": {"A": ["127.0.0.2"]}}  # weight 1: under the threshold


def refused_greeting(port: int, source: str) -> list[tuple[int, str]]:
    c = RawClient(port, source=source)
    try:
        replies = [c.read_reply(), c.cmd("EHLO client.test"), c.cmd("MAIL FROM:<a@remote.test>"),
                   c.cmd("QUIT")]
        assert c.is_closed()
        return replies
    finally:
        c.close()


def greeting(port: int, source: str) -> tuple[int, str]:
    c = RawClient(port, source=source)
    try:
        reply = c.read_reply()
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_a_listed_client_gets_a_554_greeting_and_then_only_quit(tmp_path, dns_server):
    dns_server.load(LISTED)
    events = capture()
    mta, metrics = await start_with_metrics(tmp_path, extra=dnsbl_config(dns_server))
    try:
        listed = await in_thread(refused_greeting, mta.port(), "127.0.0.2")
        under = await in_thread(greeting, mta.port(), "127.0.0.3")
        clean = await in_thread(greeting, mta.port(), "127.0.0.4")
        trusted = await in_thread(greeting, mta.port(), "127.0.0.5")  # relay_networks: not asked
        again = await in_thread(refused_greeting, mta.port(), "127.0.0.2")  # from the cache
        _, samples = await scrape_until(metrics.port.getHost().port, lambda s: True)
    finally:
        await stop_with_metrics(mta, metrics)
        stop_capture(events)
    blocked = "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example"
    assert listed == again == [
        (554, blocked),
        (503, "503 5.5.1 Bad sequence of commands: this connection was refused; send QUIT"),
        (503, "503 5.5.1 Bad sequence of commands: this connection was refused; send QUIT"),
        (221, "221 2.0.0 mx.example.test closing connection")]
    assert under[0] == clean[0] == trusted[0] == 220
    assert dns_server.asked("2.0.0.127.zen.example", "A") == 1  # the second time: the cache
    assert dns_server.asked("5.0.0.127.zen.example", "A") == 0
    verdicts = [e for e in events if e.get("event") == "check" and e.get("check") == "dnsbl"]
    assert [(e["stage"], e["result"], e["ip"], e["code"], e["enhanced"], e["reason"])
            for e in verdicts] == [("connect", "reject", "127.0.0.2",
                                    554, "5.7.1", "dnsbl")] * 2
    rejected = [e for e in events if e.get("event") == "rejected"]
    assert [(e["stage"], e["reply"], e["reason"]) for e in rejected] == [
        ("connect", blocked, "dnsbl")] * 2
    assert value(samples, "mta_check_verdicts_total", check="dnsbl", result="reject") == 2
    assert value(samples, "mta_check_verdicts_total", check="dnsbl", result="accept") == 2
    assert value(samples, "mta_check_verdicts_total", check="limits", result="accept") == 5


def rcpts(port: int, source: str, *recipients: str) -> list[tuple[int, str]]:
    c = RawClient(port, source=source)
    try:
        replies = [c.read_reply(), c.cmd("EHLO client.test"), c.cmd("MAIL FROM:<a@remote.test>")]
        replies += [c.cmd(f"RCPT TO:<{r}>") for r in recipients]
        c.cmd("QUIT")
        return replies
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_at_rcpt_a_listed_client_still_reaches_postmaster_and_abuse(tmp_path, dns_server):
    dns_server.load(LISTED)
    order = [*CHECKS[:CHECKS.index("recipient") + 1], "dnsbl", *CHECKS[CHECKS.index("recipient") + 1:]]
    mta = await start_mta(tmp_path, extra=dnsbl_config(dns_server, "rcpt", order,
                                                       exempt_recipients=["postmaster", "abuse",
                                                                          "info@example.test"]),
                          aliases=DEFAULT_ALIASES + "abuse: alice\n")
    try:
        listed = await in_thread(rcpts, mta.port(), "127.0.0.2", "alice@example.test",
                                 "postmaster@example.test", "abuse@example.test",
                                 "info@example.test", "nobody@example.test")
        clean = await in_thread(rcpts, mta.port(), "127.0.0.4", "alice@example.test")
    finally:
        await mta.stop()
    blocked = (554, "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example")
    assert [code for code, _ in listed[:3]] == [220, 250, 250]
    assert listed[3:] == [blocked, (250, "250 2.1.5 Recipient ok"), (250, "250 2.1.5 Recipient ok"),
                          (250, "250 2.1.5 Recipient ok"),
                          (550, "550 5.1.1 <nobody@example.test>: Recipient address rejected: "
                                "User unknown")]
    assert clean[3] == (250, "250 2.1.5 Recipient ok")
