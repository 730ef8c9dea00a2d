"""The route table over MTA-STS (RFC 8461), with the real policy machinery of
tests/test_mtasts_delivery.py: an HTTPS policy server, loopback DNS, a TLS sink.
An entry's TLS level overrides the domain's MTA-STS policy; an entry's
``mta-sts`` defers a domain without one; sessions under a policy report
``mta-sts`` as their source.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.logger import globalLogPublisher

from mta.config import RouteEntry
from mta.queue.courier import Outcome
from tests.test_mtasts_delivery import deliver, dns, policy_text, setup, zone  # noqa: F401


def with_routes(world: Any, *entries: RouteEntry) -> Any:
    world.config = replace(world.config, delivery=replace(world.config.delivery, routes=entries))
    return world.courier()


def tls_events(events: list[dict[str, Any]]) -> Any:
    def observe(event: Any) -> None:
        if event.get("event") == "tls_outcome":
            events.append(dict(event))
    return observe


@pytest_twisted.ensureDeferred
async def test_a_table_level_overrides_an_enforce_policy(setup: Any, dns: Any,  # noqa: F811
                                                         tmp_path: Path) -> None:
    """The policy names no MX host of the domain: MTA-STS alone would defer
    (test_enforce_mx_not_in_the_patterns_defers); the entry's "encrypt" decides."""
    dns.load(zone("dst.test"))
    await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mail.elsewhere.test"]))
    courier = with_routes(setup, RouteEntry("dst.test", tls="encrypt"))
    events: list[dict[str, Any]] = []
    observe = tls_events(events)
    globalLogPublisher.addObserver(observe)
    try:
        [result] = await deliver(courier, tmp_path, "a@dst.test")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert setup.sink.messages[0].tls
    assert setup.policies.hits.get("dst.test") is None  # not even fetched
    assert [(e["policy"], e["source"], e["result"]) for e in events] == [
        ("encrypt", "table", "encrypted")]


@pytest_twisted.ensureDeferred
async def test_sessions_under_a_policy_report_mta_sts(setup: Any, dns: Any,  # noqa: F811
                                                      tmp_path: Path) -> None:
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    events: list[dict[str, Any]] = []
    observe = tls_events(events)
    globalLogPublisher.addObserver(observe)
    try:
        [result] = await deliver(courier, tmp_path, "a@dst.test")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert result.outcome is Outcome.DELIVERED
    [event] = events
    assert (event["policy"], event["source"], event["result"]) == ("mta-sts", "mta-sts", "verified")
    assert event["origin"] == "MTA-STS enforce policy id 1"


@pytest_twisted.ensureDeferred
async def test_a_table_mta_sts_defers_a_domain_without_a_policy(setup: Any, dns: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    dns.load({"plain.test": {"MX": [(10, "mx.dst.test")]}, "mx.dst.test": {"A": ["127.0.0.1"]}})
    await setup.start()
    courier = with_routes(setup, RouteEntry("plain.test", tls="mta-sts"))
    [result] = await deliver(courier, tmp_path, "a@plain.test")
    assert result.outcome is Outcome.DEFERRED and result.status == "4.7.5"
    assert result.reply == ('451 4.7.5 TLS policy mta-sts for plain.test (delivery.route.'
                            '"plain.test".tls): the domain has no MTA-STS policy')
    assert setup.sink.sessions == []
