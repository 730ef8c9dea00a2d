"""The route table over DANE (RFC 7672), end to end with the session's validating
resolver (Unbound in front of signed zones, ``dane_world`` in tests/conftest.py):
an entry's TLS level overrides DANE for its domain, an entry's ``dane`` defers
when DANE cannot be used, DANE's decision is the ``tls_outcome`` event's source,
and ``mta route explain`` shows the TLSA records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.harness import in_thread, start_mta
from tests.sink import start_sink
from tests.test_dane import attempted, send, wait_for
from tests.test_route_explain import explain, rows

pytestmark = pytest.mark.slow


@pytest.fixture
def dane_sink(dane_world: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    sink = pytest_twisted.blockon(ensureDeferred(start_sink(tls=dane_world.cert)))
    yield sink
    pytest_twisted.blockon(ensureDeferred(sink.stop()))


async def start(tmp_path: Path, world: Any, sink_port: int, routes: dict[str, Any],
                policy: str = "dane", **dane: Any) -> Any:
    running = await start_mta(tmp_path, runner=None, extra={
        "relay_networks": ["127.0.0.0/8"],
        "dns": {"servers": [world.resolver], "timeout": 2.0, "cache_max_ttl": 0},
        "dane": {"enabled": True, "check_name": "dane.test", "check_bogus": "bogus.test", **dane},
        "delivery": {"tls_policy": policy, "mx_port": sink_port, "retry_schedule": [600],
                     "retry_jitter": 0, "route": routes}})
    courier = running.service.runner.router.couriers["remote"]
    await wait_for(lambda: courier.dane.available is not None, what="the DNSSEC check")
    return running


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


@pytest_twisted.ensureDeferred
async def test_dane_decides_and_is_the_source_of_the_outcome(tmp_path: Path, dane_world: Any,
                                                             dane_sink: Any) -> None:
    with tls_events() as events:
        running = await start(tmp_path, dane_world, dane_sink.port, {})
        try:
            await in_thread(send, running.port(), "bob@pass.dane.test")
            await wait_for(lambda: dane_sink.messages and events, what="the delivery")
        finally:
            await running.stop()
    assert dane_sink.messages[0].tls
    [event] = events
    assert (event["policy"], event["source"], event["origin"], event["result"]) == (
        "dane", "dane", "TLSA _25._tcp.mx-pass.dane.test", "verified")


@pytest_twisted.ensureDeferred
async def test_a_tlsa_mismatch_is_reported_as_tlsa_invalid(tmp_path: Path, dane_world: Any,
                                                           dane_sink: Any) -> None:
    with tls_events() as events:
        running = await start(tmp_path, dane_world, dane_sink.port, {})
        try:
            await in_thread(send, running.port(), "bob@bad.dane.test")
            r = await attempted(running)
        finally:
            await running.stop()
    assert r.state == "deferred" and dane_sink.messages == []
    [event] = events
    assert (event["policy"], event["source"], event["result"]) == ("dane", "dane", "tlsa-invalid")
    assert "no TLSA record matches" in event["error"]


@pytest_twisted.ensureDeferred
async def test_a_table_level_overrides_dane_for_its_domain(tmp_path: Path, dane_world: Any,
                                                           dane_sink: Any) -> None:
    """mx-bad's TLSA records do not match the sink's certificate: DANE would defer
    (tests/test_dane.py); the table's "encrypt" for the domain decides instead."""
    with tls_events() as events:
        running = await start(tmp_path, dane_world, dane_sink.port,
                              {"bad.dane.test": {"tls": "encrypt"}})
        try:
            await in_thread(send, running.port(), "bob@bad.dane.test")
            await wait_for(lambda: dane_sink.messages and events, what="the delivery")
        finally:
            await running.stop()
    (msg,) = dane_sink.messages
    assert msg.tls and msg.recipients == ["bob@bad.dane.test"]
    assert [(e["policy"], e["source"], e["result"]) for e in events] == [
        ("encrypt", "table", "encrypted")]


@pytest_twisted.ensureDeferred
async def test_a_table_dane_defers_when_the_resolver_does_not_validate(
        tmp_path: Path, dane_world: Any, dane_sink: Any) -> None:
    """With a resolver check that fails DANE is refused: the default policy
    ("opportunistic" here) would deliver (tests/test_dane.py); an entry's "dane"
    defers instead, without connecting."""
    running = await start(tmp_path, dane_world, dane_sink.port,
                          {"bad.dane.test": {"tls": "dane"}}, policy="opportunistic",
                          check_name="plain.test")
    try:
        await in_thread(send, running.port(), "bob@bad.dane.test")
        r = await attempted(running)
    finally:
        await running.stop()
    assert r.state == "deferred"
    assert r.last_reply.startswith('451 4.7.5 TLS policy dane for bad.dane.test '
                                   '(delivery.route."bad.dane.test".tls) needs DANE, which is '
                                   "not available: the resolver does not validate")
    assert dane_sink.sessions == []


@pytest_twisted.ensureDeferred
async def test_explain_shows_the_tlsa_records(tmp_path: Path, dane_world: Any) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f"""
hostname = "out.example.test"
local_domains = ["example.test"]
data_dir = "var"
[dns]
servers = ["{dane_world.resolver}"]
timeout = 2
[dane]
enabled = true
check_name = "dane.test"
[delivery]
tls_policy = "dane"
""")
    done = await in_thread(explain, config, "bob@pass.dane.test")
    assert done.returncode == 0, done.stderr
    steps = rows(done.stdout)
    assert ["mx", "dns", "preference 10: mx-pass.dane.test (127.0.0.1)"] in steps
    [dane] = [s for s in steps if s[0] == "dane"]
    assert dane[1] == "TLSA _25._tcp.mx-pass.dane.test"
    assert dane[2].startswith("mx-pass.dane.test: TLS required, the certificate must match 3 1 1 ")
    assert steps[-1][2] == ("TLS required (DANE); certificate matched against the TLSA records "
                            "of mx-pass.dane.test; port 25; from any IPv4 address / any IPv6 "
                            "address; HELO out.example.test")
    done = await in_thread(explain, config, "--json", "bob@none.dane.test")
    [delivery] = json.loads(done.stdout)["deliveries"]
    assert delivery["tls"] == {"level": "dane", "source": "default",
                               "origin": "delivery.tls_policy", "required": False,
                               "verified": False}
    assert [h.get("dane") for h in delivery["hops"]] == ["none"]
