"""Greylisting (issue 17): the triplet rules on a fake clock with the real SQLite file,
then the check over real SMTP (451 4.7.1 at RCPT; relay_networks and authenticated
clients never greylisted; a broken database gets the configured on_error)."""

from __future__ import annotations

import smtplib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from mta.config import CHECKS, ConfigError, GreylistConfig
from mta.mail.checks import Stage
from mta.policy.greylist import PURGE_INTERVAL, Decision, Greylist, client_network, normalize_sender
from tests.harness import PASSWORD, RawClient, client_tls_context, in_thread, make_config, start_mta
from tests.test_pipeline import capture, stop_capture

pytestmark = pytest.mark.timeout(60)


def greylist(tmp_path: Path, clock: Clock, **settings: Any) -> Greylist:
    return Greylist(GreylistConfig(db=tmp_path / "grey" / "greylist.sqlite", **settings), clock)


def rows(path: Path, table: str = "triplets") -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()


def test_first_sight_waits_a_retry_in_the_window_passes_and_then_the_triplet_passes(tmp_path):
    clock = Clock()
    g = greylist(tmp_path, clock, delay=300, window=3600)
    first = g.check("192.0.2.10", "alice@remote.test", "Bob@example.test")
    clock.advance(100)
    early = g.check("192.0.2.10", "alice@remote.test", "bob@example.test")
    clock.advance(201)
    retried = g.check("192.0.2.77", "alice@remote.test", "bob@example.test")  # same /24
    clock.advance(86400)
    known = g.check("192.0.2.10", "alice@remote.test", "bob@example.test")
    assert [first, early, retried, known] == [
        Decision(False, 300, "new"), Decision(False, 200, "early"), Decision(True, 0, "retried"),
        Decision(True, 0, "known")]
    assert rows(g.config.db) == [("192.0.2.0/24", "alice@remote.test", "bob@example.test",
                                  0.0, 86701.0, 1)]
    assert rows(g.config.db, "clients") == [("192.0.2.0/24", 1, 301.0)]
    g.close()


def test_a_retry_after_the_window_starts_over(tmp_path):
    clock = Clock()
    g = greylist(tmp_path, clock, delay=300, window=600)
    g.check("192.0.2.10", "a@remote.test", "bob@example.test")
    clock.advance(700)  # (before the purge, which would have forgotten it: "new")
    assert g.check("192.0.2.10", "a@remote.test", "bob@example.test") == Decision(False, 300, "late")
    clock.advance(300)
    assert g.check("192.0.2.10", "a@remote.test", "bob@example.test").passed
    g.close()


def test_a_client_network_that_retried_enough_is_allowed_at_once(tmp_path):
    clock = Clock()
    g = greylist(tmp_path, clock, delay=60, window=3600, auto_allow=2)
    for sender in ("a@remote.test", "b@remote.test"):
        g.check("2001:db8:1:2::5", sender, "bob@example.test")
        clock.advance(61)
        assert g.check("2001:db8:1:2::5", sender, "bob@example.test").why == "retried"
    # A new triplet from another address of the same /64 passes at once.
    assert g.check("2001:db8:1:2::99", "new@else.test", "carol@example.test") == Decision(True, 0, "client")
    assert g.check("2001:db8:1:3::1", "new@else.test", "carol@example.test").why == "new"
    g.close()


def test_senders_are_keyed_as_postgrey_does():
    assert normalize_sender("") == "<>"
    assert normalize_sender("List+bounce-123@Lists.test") == "list@lists.test"
    assert normalize_sender("prvs=1234abcdef=alice@remote.test") == "alice@remote.test"
    assert normalize_sender("bounce-4711-99@remote.test") == "bounce-#-#@remote.test"
    assert client_network("192.0.2.200", 24, 64) == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.200", 24, 64) == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:5:6", 24, 64) == "2001:db8:1:2::/64"


def test_the_null_sender_is_greylisted_like_any_other(tmp_path):
    clock = Clock()
    g = greylist(tmp_path, clock, delay=60)
    assert g.check("192.0.2.1", "", "bob@example.test").why == "new"
    clock.advance(61)
    assert g.check("192.0.2.1", "", "bob@example.test").why == "retried"
    assert rows(g.config.db)[0][:3] == ("192.0.2.0/24", "<>", "bob@example.test")
    g.close()


def test_old_triplets_and_clients_expire(tmp_path):
    clock = Clock()
    g = greylist(tmp_path, clock, delay=60, window=600, max_age=7200)
    g.check("192.0.2.1", "a@remote.test", "bob@example.test")
    clock.advance(61)
    g.check("192.0.2.1", "a@remote.test", "bob@example.test")  # passed
    g.check("198.51.100.1", "spam@remote.test", "bob@example.test")  # never retried
    clock.advance(PURGE_INTERVAL)  # the unretried one is past its window
    g.check("203.0.113.1", "c@remote.test", "bob@example.test")
    assert [r[0] for r in rows(g.config.db)] == ["192.0.2.0/24", "203.0.113.0/24"]
    clock.advance(7200)  # the passed one has not been seen for max_age
    g.check("203.0.113.1", "c@remote.test", "bob@example.test")
    assert [r[0] for r in rows(g.config.db)] == ["203.0.113.0/24"]
    assert rows(g.config.db, "clients") == []
    g.close()


@pytest.mark.parametrize("section,message", [
    ({"delay": -1}, "greylist.delay: must be 0 or more seconds"),
    ({"delay": 600, "window": 300}, "greylist.window: must be longer than greylist.delay"),
    ({"max_age": 60}, "greylist.max_age: must be at least greylist.window"),
    ({"ipv4_prefix": 33}, "greylist.ipv4_prefix: must be from 8 to 32"),
    ({"auto_allow": -1}, "greylist.auto_allow: must be from 0 (off) to 1000"),
    ({"dealy": 1}, "greylist.dealy: unknown key"),
])
def test_bad_greylist_settings_stop_start_up_with_their_key(tmp_path, section, message):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"greylist": section, "checks": {"order": [*CHECKS, "greylist"]}})
    assert str(e.value) == message


def test_greylist_settings_without_the_check_are_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"greylist": {"delay": 60}})
    assert str(e.value) == "greylist: is configured, but checks.order does not name greylist"


# --- over real SMTP ------------------------------------------------------------------


def greylisting(tmp_path: Path, on_error: str = "tempfail") -> dict[str, Any]:
    i = CHECKS.index("recipient") + 1
    return {"greylist": {"delay": 60, "window": 3600},
            "checks": {"order": [*CHECKS[:i], "greylist", *CHECKS[i:]],
                       "greylist": {"on_error": on_error}},
            "relay_networks": ["127.0.0.5/32"]}


def the_check(mta: Any) -> Any:
    (check,) = [c for c in mta.context.pipeline.names(Stage.RCPT) if c == "greylist"]
    return next(c for c in mta.context.pipeline._stages[Stage.RCPT] if c.name == check)


def attempt(port: int, source: str, rcpt: str = "alice@example.test") -> tuple[int, str]:
    c = RawClient(port, source=source)
    try:
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<friend@remote.test>")
        reply = c.cmd(f"RCPT TO:<{rcpt}>")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


def submit(port: int) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=client_tls_context())
        s.login("alice@example.test", PASSWORD)
        return s.sendmail("alice@example.test", ["friend@remote.test"], b"Subject: x\r\n\r\nhi\r\n")


@pytest_twisted.ensureDeferred
async def test_a_first_attempt_gets_451_and_a_retry_after_the_delay_passes(tmp_path):
    events = capture()
    mta = await start_mta(tmp_path, extra=greylisting(tmp_path))
    clock = Clock()
    the_check(mta).greylist.clock = clock
    try:
        first = await in_thread(attempt, mta.port(), "127.0.0.2")
        unknown = await in_thread(attempt, mta.port(), "127.0.0.2", "nobody@example.test")
        clock.advance(30)
        early = await in_thread(attempt, mta.port(), "127.0.0.2")
        clock.advance(31)
        retried = await in_thread(attempt, mta.port(), "127.0.0.2")
        trusted = await in_thread(attempt, mta.port(), "127.0.0.5")
        authenticated = await in_thread(submit, mta.port("submission"))
    finally:
        await mta.stop()
        stop_capture(events)
    assert first == (451, "451 4.7.1 Greylisted: try again in 60 seconds")
    assert unknown[0] == 550  # the recipient check comes first: no triplet for a 550
    assert early == (451, "451 4.7.1 Greylisted: try again in 30 seconds")
    assert retried == trusted == (250, "250 2.1.5 Recipient ok")
    assert authenticated == {}
    db = mta.config.greylist.db
    assert db == tmp_path / "var" / "greylist.sqlite"
    assert [r[:3] + r[5:] for r in rows(db)] == [
        ("127.0.0.0/24", "friend@remote.test", "alice@example.test", 1)]
    checks = [(e["result"], e["reason"], e["code"], e["enhanced"]) for e in events
              if e.get("event") == "check" and e.get("check") == "greylist"]
    assert checks == [("tempfail", "greylist_new", 451, "4.7.1"),
                      ("tempfail", "greylist_early", 451, "4.7.1")]
    rejected = [(e["stage"], e["code"], e.get("reason")) for e in events
                if e.get("event") == "rejected"]
    assert rejected == [("rcpt", 451, "greylist_new"), ("rcpt", 550, None),
                        ("rcpt", 451, "greylist_early")]


@pytest_twisted.ensureDeferred
async def test_a_broken_database_gets_the_configured_on_error(tmp_path):
    events = capture()
    mta = await start_mta(tmp_path, extra=greylisting(tmp_path, on_error="accept"))
    the_check(mta).greylist.db.close()  # every query now raises
    try:
        reply = await in_thread(attempt, mta.port(), "127.0.0.2")
    finally:
        await mta.stop()
        stop_capture(events)
    assert reply == (250, "250 2.1.5 Recipient ok")
    (failed,) = [e for e in events if e.get("event") == "check" and e.get("check") == "greylist"]
    assert (failed["result"], failed["on_error"], failed["stage"]) == ("error", "accept", "rcpt")
    assert mta.context.pipeline.verdict_counts()[("greylist", "error")] == 1
    assert ("greylist", "accept") not in mta.context.pipeline.verdict_counts()


def test_a_database_that_cannot_be_opened_stops_start_up_with_its_key(tmp_path):
    from twisted.internet import reactor

    from mta.daemon.service import MTAService

    (tmp_path / "afile").write_text("not a directory")
    raw = greylisting(tmp_path)
    raw["greylist"]["db"] = str(tmp_path / "afile" / "greylist.sqlite")
    with pytest.raises(ConfigError) as e:
        MTAService(make_config(tmp_path, extra=raw), reactor=reactor, runner=False)
    assert str(e.value).startswith(f"greylist.db: cannot open {tmp_path / 'afile' / 'greylist.sqlite'}: ")


@pytest_twisted.ensureDeferred
async def test_a_client_a_dns_allowlist_vouches_for_is_not_greylisted(tmp_path, dns_server):
    dns_server.load({"2.0.0.127.wl.example": {"A": ["127.0.10.2"]}})
    raw = greylisting(tmp_path)
    raw["checks"]["order"] = ["limits", "dnsbl", *raw["checks"]["order"][1:]]
    raw["dns"] = {"servers": [f"{dns_server.address[0]}:{dns_server.address[1]}"], "timeout": 1.0}
    raw["dnsbl"] = {"sites": ["bl.example", "wl.example=127.0.[0..255].[2..3]*-2"],
                    "allowlist_threshold": -1}
    mta = await start_mta(tmp_path, extra=raw)
    try:
        vouched = await in_thread(attempt, mta.port(), "127.0.0.2")
        other = await in_thread(attempt, mta.port(), "127.0.0.3")
    finally:
        await mta.stop()
    assert vouched == (250, "250 2.1.5 Recipient ok")
    assert other == (451, "451 4.7.1 Greylisted: try again in 60 seconds")
    assert len(rows(mta.config.greylist.db)) == 1  # only the other's first sight
