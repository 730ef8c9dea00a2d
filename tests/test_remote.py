"""The remote courier: MX and smarthost routing, falling over to the next server, outcomes.

MX hosts are 127.x loopback addresses sharing one port (``delivery.mx_port``),
each with its own scripted sink; the resolver is a tiny fake returning
:class:`mta.delivery.mx.MXHost` lists (DNS itself is tested in test_dns_mx.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.ssl import Certificate

from mta.config import Config, DeliveryConfig
from mta.delivery.client import Timeouts
from mta.delivery.mx import MXHost, PermanentDNSError, TemporaryDNSError
from mta.delivery.remote import RemoteCourier
from mta.delivery.routes import parse_smarthost
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from tests.sink import Sink, start_sink

CA = trustme.CA()
OTHER_CA = trustme.CA()
MX1, MX2 = "mx1.dst.test", "mx2.dst.test"
CERTS = {MX1: CA.issue_cert(MX1), MX2: CA.issue_cert(MX2)}
BODY = b"Subject: hello\r\n\r\nbody\r\n.dot\r\n"


class FakeResolver:
    """``resolve(domain)`` → a Deferred-free list (or raises), recording the calls."""

    def __init__(self, answers: dict[str, list[MXHost] | Exception]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def resolve(self, domain: str) -> list[MXHost]:
        self.calls.append(domain)
        answer = self.answers[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_config(tmp_path: Path, **delivery: Any) -> Config:
    # One connection per delivery here; the connection cache has test_connection_cache.py.
    delivery.setdefault("connection_cache_time", 0)
    return Config(
        hostname="out.example.test", listeners=(), local_domains=(), data_dir=tmp_path,
        queue_dir=tmp_path / "queue", mail_dir=tmp_path / "mail", domains_dir=tmp_path / "domains",
        control_socket=tmp_path / "control.sock", delivery=DeliveryConfig(**delivery),
    )


def envelope(tmp_path: Path, recipients: list[str], data: bytes = BODY, **kw: Any) -> tuple[Envelope, Path]:
    path = tmp_path / "m.msg"
    path.write_bytes(data)
    rcpts = [Recipient(a, RecipientKind.REMOTE, a) for a in recipients]
    return Envelope("q1", "sender@src.test", rcpts, 0.0, size=len(data), **kw), path


@asynccontextmanager
async def sinks(*per_address: dict[str, Any]) -> AsyncIterator[list[Sink]]:
    """One sink per entry, on 127.0.0.1, 127.0.0.2, ... all on the same port."""
    async with AsyncExitStack() as stack:
        started: list[Sink] = []
        for i, options in enumerate(per_address):
            port = started[0].port if started else 0
            sink = await start_sink(interface=f"127.0.0.{i + 1}", port=port, **options)
            stack.push_async_callback(sink.stop)
            started.append(sink)
        yield started


async def run(courier: RemoteCourier, env: Envelope, path: Path) -> list[DeliveryResult]:
    return await courier.deliver(env, env.recipients, path)


def summary(results: list[DeliveryResult]) -> list[tuple[str, Outcome, str]]:
    return [(r.recipient.address, r.outcome, r.reply[:3]) for r in results]


# --- MX delivery --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delivers_to_the_mx(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test", "b@dst.test"])
    async with sinks({}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor)
        results = await run(courier, env, path)
    assert summary(results) == [("a@dst.test", Outcome.DELIVERED, "250"),
                                ("b@dst.test", Outcome.DELIVERED, "250")]
    assert results[0].remote_mta == MX1 and results[0].status == "2.0.0"
    assert results[0].recipient is env.recipients[0]
    [msg] = sink.messages
    assert (msg.sender, msg.recipients, msg.data) == ("sender@src.test", ["a@dst.test", "b@dst.test"], BODY)
    assert sink.sessions[0].helo == "out.example.test"
    assert resolver.calls == ["dst.test"]


@pytest_twisted.ensureDeferred
async def test_first_server_refuses_connections_second_delivers(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({}, {}) as (_, second):
        # 127.0.0.3 listens nowhere: connection refused.
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.3",)),
                                              MXHost(MX2, 20, ("127.0.0.2",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=second.port), resolver, reactor)
        results = await run(courier, env, path)
    assert summary(results) == [("a@dst.test", Outcome.DELIVERED, "250")]
    assert results[0].remote_mta == MX2 and len(second.messages) == 1


@pytest_twisted.ensureDeferred
async def test_421_greeting_goes_to_the_next_address(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"replies": {"greeting": "421 4.3.2 busy"}}, {}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1", "127.0.0.2"))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        results = await run(courier, env, path)
    assert summary(results) == [("a@dst.test", Outcome.DELIVERED, "250")]
    assert first.messages == [] and len(second.messages) == 1


@pytest_twisted.ensureDeferred
async def test_all_servers_down_defers_with_the_last_error(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test", "b@dst.test"])
    async with sinks({"replies": {"greeting": "421 4.3.2 busy"}}) as (first,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",)),
                                              MXHost(MX2, 20, ("127.0.0.3",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        results = await run(courier, env, path)
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert results[0].reply.startswith(f"{MX2}[127.0.0.3]: connect to") and "refused" in results[0].reply
    assert results[0].status == "4.4.1" and results[0].remote_mta == MX2


@pytest_twisted.ensureDeferred
async def test_per_recipient_outcomes_and_no_retry_elsewhere(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["ok@dst.test", "soft@dst.test", "bad@dst.test"])
    replies = {"RCPT:soft@dst.test": "450 4.2.1 busy", "RCPT:bad@dst.test": "550 5.1.1 unknown user"}
    async with sinks({"replies": replies}, {}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",)),
                                              MXHost(MX2, 20, ("127.0.0.2",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        results = await run(courier, env, path)
    assert summary(results) == [("ok@dst.test", Outcome.DELIVERED, "250"),
                                ("soft@dst.test", Outcome.DEFERRED, "450"),
                                ("bad@dst.test", Outcome.FAILED, "550")]
    assert results[2].reply == "550 5.1.1 unknown user" and results[2].status == "5.1.1"
    assert second.sessions == []  # the first server answered for everyone


@pytest_twisted.ensureDeferred
async def test_connection_lost_mid_transaction_tries_the_rest_on_the_next_server(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["bad@dst.test", "ok@dst.test"])
    first_opts = {"replies": {"RCPT:bad@dst.test": "550 5.1.1 unknown"}, "drop": {"DATA"},
                  "pipelining": False}
    async with sinks(first_opts, {}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",)),
                                              MXHost(MX2, 20, ("127.0.0.2",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        results = await run(courier, env, path)
    assert summary(results) == [("bad@dst.test", Outcome.FAILED, "550"),
                                ("ok@dst.test", Outcome.DELIVERED, "250")]
    assert [m.recipients for m in second.messages] == [["ok@dst.test"]]


@pytest.mark.parametrize(("error", "outcome", "reply"), [
    (PermanentDNSError("dst.test does not accept mail (null MX)", "5.1.10", 556), Outcome.FAILED,
     "556 5.1.10 dst.test does not accept mail (null MX)"),
    (TemporaryDNSError("SERVFAIL looking up dst.test"), Outcome.DEFERRED,
     "451 4.4.3 SERVFAIL looking up dst.test"),
])
@pytest_twisted.ensureDeferred
async def test_dns_errors(tmp_path: Path, error: Exception, outcome: Outcome, reply: str) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    courier = RemoteCourier(make_config(tmp_path), FakeResolver({"dst.test": error}), reactor)
    [result] = await run(courier, env, path)
    assert (result.outcome, result.reply) == (outcome, reply)
    assert result.status == reply.split()[1]


@pytest_twisted.ensureDeferred
async def test_several_domains_in_one_call(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@one.test", "b@two.test", "c@one.test"])
    async with sinks({}, {}) as (first, second):
        resolver = FakeResolver({"one.test": [MXHost("mx.one.test", 0, ("127.0.0.1",))],
                                 "two.test": [MXHost("mx.two.test", 0, ("127.0.0.2",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        results = await run(courier, env, path)
    assert [(r.recipient.address, r.outcome, r.remote_mta) for r in results] == [
        ("a@one.test", Outcome.DELIVERED, "mx.one.test"),
        ("b@two.test", Outcome.DELIVERED, "mx.two.test"),
        ("c@one.test", Outcome.DELIVERED, "mx.one.test")]
    assert [m.recipients for m in first.messages] == [["a@one.test", "c@one.test"]]
    assert [m.recipients for m in second.messages] == [["b@two.test"]]


@pytest_twisted.ensureDeferred
async def test_smtputf8_not_offered_fails_permanently(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["jörg@dst.test"], smtputf8=True)
    async with sinks({"smtputf8": False}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor)
        [result] = await run(courier, env, path)
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.6.7")
    assert result.reply.startswith("553 5.6.7") and "SMTPUTF8" in result.reply


@pytest_twisted.ensureDeferred
async def test_stall_at_data_end_defers(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"stall": {"DATA_END"}}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor,
                                timeouts=Timeouts(data_end=0.3))
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DEFERRED
    assert "timeout after 0.3s waiting for the reply to end of data" in result.reply
    assert sink.sessions[0].stalled_at == "DATA_END"


@pytest_twisted.ensureDeferred
async def test_never_errbacks(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    courier = RemoteCourier(make_config(tmp_path), FakeResolver({"dst.test": RuntimeError("boom")}),
                            reactor)
    [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DEFERRED and "internal error" in result.reply and "boom" in result.reply


@pytest_twisted.ensureDeferred
async def test_duplicate_recipients_get_one_rcpt_and_a_result_each(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test", "a@dst.test"])
    async with sinks({}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor)
        results = await run(courier, env, path)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [r.recipient for r in results] == env.recipients
    assert sink.messages[0].recipients == ["a@dst.test"]


# --- TLS ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_with_untrusted_certificate(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"tls": CERTS[MX1]}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor,
                                trust_root=Certificate.loadPEM(OTHER_CA.cert_pem.bytes()))
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DELIVERED
    assert sink.messages[0].tls and sink.sessions[0].tls_version.startswith("TLSv1.")


@pytest_twisted.ensureDeferred
async def test_verify_policy_with_untrusted_certificate_defers(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"tls": CERTS[MX1]}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port, tls_policy="verify"),
                                resolver, reactor,
                                trust_root=Certificate.loadPEM(OTHER_CA.cert_pem.bytes()))
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DEFERRED and "TLS handshake failed" in result.reply
    assert result.status == "4.7.5"
    assert len(sink.sessions) == 1 and sink.messages == []  # no plaintext retry under verify


@pytest_twisted.ensureDeferred
async def test_verify_policy_checks_the_mx_name(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    # The first address presents mx1's certificate under the name mx2: refused.
    async with sinks({"tls": CERTS[MX1]}, {"tls": CERTS[MX2]}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost(MX2, 10, ("127.0.0.1", "127.0.0.2"))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port, tls_policy="verify"),
                                resolver, reactor, trust_root=Certificate.loadPEM(CA.cert_pem.bytes()))
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DELIVERED and result.remote_mta == MX2
    assert first.messages == [] and second.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_opportunistic_retries_in_plaintext_when_the_handshake_fails(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"tls": CERTS[MX1], "tls_broken": True}) as (sink,):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port), resolver, reactor)
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DELIVERED
    assert len(sink.sessions) == 2 and "STARTTLS" not in sink.sessions[1].commands
    assert not sink.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_injection_after_starttls_fails_that_server(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@dst.test"])
    inject = b"250-evil\r\n250 PIPELINING\r\n"
    async with sinks({"tls": CERTS[MX1], "starttls_inject": inject}, {}) as (first, second):
        resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",)),
                                              MXHost(MX2, 20, ("127.0.0.2",))]})
        courier = RemoteCourier(make_config(tmp_path, mx_port=first.port), resolver, reactor)
        [result] = await run(courier, env, path)
    assert result.outcome is Outcome.DELIVERED and result.remote_mta == MX2
    assert first.sessions[0].commands == ["EHLO out.example.test", "STARTTLS"]
    assert len(first.sessions) == 1 and first.messages == []


# --- smarthost ----------------------------------------------------------------------------


def test_parse_smarthost() -> None:
    assert parse_smarthost("relay.example:587") == ("relay.example", 587)
    assert parse_smarthost("relay.example") == ("relay.example", 25)
    assert parse_smarthost("[::1]:2525") == ("::1", 2525)


@pytest_twisted.ensureDeferred
async def test_smarthost_with_auth_plain_over_tls(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@one.test", "b@two.test"])
    options = {"tls": CERTS[MX1], "auth": {"relayuser": "relay pass"}, "auth_required": True}
    async with sinks(options) as (sink,):
        resolver = FakeResolver({})
        config = make_config(tmp_path, smarthosts=(f"127.0.0.1:{sink.port}",), smarthost_tls="require",
                             smarthost_username="relayuser", smarthost_password="relay pass")
        results = await run(RemoteCourier(config, resolver, reactor), env, path)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert results[0].remote_mta == "127.0.0.1"
    assert resolver.calls == []  # no MX lookup with a smarthost
    [msg] = sink.messages
    assert msg.recipients == ["a@one.test", "b@two.test"] and msg.tls and msg.auth_user == "relayuser"
    assert any(c.startswith("AUTH PLAIN ") for c in sink.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_smarthost_auth_is_never_sent_without_tls(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@one.test"])
    options = {"auth": {"relayuser": "relay pass"}, "auth_requires_tls": False}
    async with sinks(options, options) as (first, second):
        config = make_config(tmp_path, smarthosts=(f"127.0.0.1:{first.port}", f"127.0.0.2:{first.port}"),
                             smarthost_username="relayuser", smarthost_password="relay pass")
        [result] = await run(RemoteCourier(config, FakeResolver({}), reactor), env, path)
    assert result.outcome is Outcome.DEFERRED and "not encrypted" in result.reply
    for sink in (first, second):  # both smarthosts tried, in order; neither saw AUTH
        assert [c.split()[0] for c in sink.sessions[0].commands] == ["EHLO", "QUIT"]


@pytest_twisted.ensureDeferred
async def test_smarthost_require_tls_with_broken_tls_defers(tmp_path: Path) -> None:
    env, path = envelope(tmp_path, ["a@one.test"])
    async with sinks({"tls": CERTS[MX1], "tls_broken": True}) as (sink,):
        config = make_config(tmp_path, smarthosts=(f"127.0.0.1:{sink.port}",), smarthost_tls="require")
        [result] = await run(RemoteCourier(config, FakeResolver({}), reactor), env, path)
    assert result.outcome is Outcome.DEFERRED and "TLS handshake failed" in result.reply
    assert len(sink.sessions) == 1  # never in plaintext under "require"


@pytest_twisted.ensureDeferred
async def test_connect_timeout_comes_from_the_config(tmp_path: Path) -> None:
    config = make_config(tmp_path, connect_timeout=7.0)
    courier = RemoteCourier(config, FakeResolver({}), reactor)
    assert courier.timeouts == replace(Timeouts(), connect=7.0)


@pytest_twisted.ensureDeferred
async def test_ipv6_mx_address(tmp_path: Path) -> None:
    """An MX host with only an AAAA address (::1) is reached over IPv6."""
    sink = await start_sink(interface="::1")
    try:
        courier = RemoteCourier(make_config(tmp_path, mx_port=sink.port),
                                FakeResolver({"dst.test": [MXHost(MX1, 10, ("::1",))]}), reactor)
        env, path = envelope(tmp_path, ["a@dst.test"])
        (result,) = await run(courier, env, path)
        assert result.outcome is Outcome.DELIVERED
        assert sink.messages[0].recipients == ["a@dst.test"]
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_per_relay_tls_policy_and_credentials(tmp_path: Path) -> None:
    """Two relays: the first needs a verified certificate it cannot show (skipped),
    the second has its own credentials and gets the mail over TLS with AUTH."""
    from mta.config import config_from_dict

    env, path = envelope(tmp_path, ["a@one.test"])
    options = {"tls": CERTS[MX1], "auth": {"second": "pw2"}, "auth_required": True}
    async with sinks(options, options) as (first, second):
        relay1, relay2 = f"127.0.0.1:{first.port}", f"127.0.0.2:{second.port}"
        config = config_from_dict({"hostname": "out.example.test", "delivery": {
            "smarthosts": [relay1, relay2],
            "relay": {relay1: {"tls": "verify"},
                      relay2: {"tls": "require", "username": "second", "password": "pw2"}},
        }}, tmp_path)
        # No trust root for our test CA: "verify" fails on the first relay.
        results = await run(RemoteCourier(config, FakeResolver({}), reactor), env, path)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert first.messages == []
    [msg] = second.messages
    assert msg.tls and msg.auth_user == "second"


def test_relay_settings_keep_the_servers_tls_settings(tmp_path: Path) -> None:
    """A [delivery.relay."host:port"] table once overwrote Config.tls with its
    policy string (a loop variable shadowed the [tls] settings)."""
    from mta.config import TLSConfig, config_from_dict

    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    config = config_from_dict({
        "hostname": "h.test", "tls": {"cert_file": "cert.pem", "key_file": "key.pem"},
        "delivery": {"smarthosts": ["relay:25"], "relay": {"relay:25": {"tls": "require"}}},
    }, tmp_path)
    assert isinstance(config.tls, TLSConfig)
    assert config.tls.cert_file == tmp_path / "cert.pem"
    assert config.delivery.relays[0][:2] == ("relay:25", "require")


def test_relay_settings_must_name_a_smarthost(tmp_path: Path) -> None:
    from mta.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match='delivery.relay."other:25"'):
        config_from_dict({"hostname": "h.test", "delivery": {
            "smarthosts": ["relay:25"], "relay": {"other:25": {"tls": "verify"}}}}, tmp_path)
