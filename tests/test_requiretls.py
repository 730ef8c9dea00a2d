"""REQUIRETLS (RFC 8689): offered and recorded inbound, enforced outbound, and the
``TLS-Required: No`` header.

Inbound: a real MTA on loopback and a raw client.  Outbound: the remote courier
against scripted sinks on loopback, as in test_remote.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.ssl import Certificate

from mta.delivery.mx import MXHost
from mta.delivery.remote import RemoteCourier, tls_required_no
from mta.queue.courier import Outcome
from mta.queue.layout import read_embedded_envelope
from tests.harness import RawClient, in_thread, message_files, start_mta
from tests.stsserver import policy_text
from tests.test_mtasts_delivery import MX_CERT as STS_MX_CERT
from tests.test_mtasts_delivery import dns, setup  # noqa: F401 (fixtures)
from tests.test_mtasts_delivery import zone as sts_zone
from tests.test_remote import CA, CERTS, MX1, FakeResolver, envelope, make_config, run, sinks

SMARTHOST_CERT = CA.issue_cert("127.0.0.1")


def dialog(port: int) -> dict[str, object]:
    c = RawClient(port)
    seen: dict[str, object] = {}
    try:
        c.read_reply()
        seen["ehlo_plain"] = c.cmd("EHLO client.test")[1]
        seen["mail_plain"] = c.cmd("MAIL FROM:<alice@example.test> REQUIRETLS")
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls()
        seen["ehlo_tls"] = c.cmd("EHLO client.test")[1]
        seen["mail_value"] = c.cmd("MAIL FROM:<alice@example.test> REQUIRETLS=YES")
        seen["mail"] = c.cmd("MAIL FROM:<alice@example.test> REQUIRETLS")
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        seen["data"] = c.cmd("Subject: secret\r\n\r\nbody\r\n.")
        c.cmd("QUIT")
    finally:
        c.close()
    return seen


@pytest_twisted.ensureDeferred
async def test_inbound_offered_only_under_tls_and_recorded(tmp_path):
    running = await start_mta(tmp_path)
    try:
        seen = await in_thread(dialog, running.port())
    finally:
        await running.stop()
    assert "REQUIRETLS" not in seen["ehlo_plain"]
    assert "250-REQUIRETLS" in seen["ehlo_tls"]
    assert seen["mail_plain"][0] == 530 and "5.7.10" in seen["mail_plain"][1]
    assert seen["mail_value"][0] == 501 and "REQUIRETLS takes no value" in seen["mail_value"][1]
    assert seen["mail"][0] == 250 and seen["data"][0] == 250
    # The envelope on disk says so, readably.
    (name,) = message_files(tmp_path / "var" / "queue" / "msg")
    text = read_embedded_envelope(tmp_path / "var" / "queue" / "msg" / name)
    assert b'\n "requiretls": true,\n' in text
    assert json.loads(text)["requiretls"] is True


def courier(tmp_path: Path, port: int, policy: str) -> RemoteCourier:
    resolver = FakeResolver({"dst.test": [MXHost(MX1, 10, ("127.0.0.1",))]})
    return RemoteCourier(make_config(tmp_path, mx_port=port, tls_policy=policy), resolver, reactor,
                         trust_root=Certificate.loadPEM(CA.cert_pem.bytes()))


def smarthost(tmp_path: Path, port: int) -> RemoteCourier:
    """A configured smarthost, its certificate verified: no MX to authenticate (§4.2.1)."""
    config = make_config(tmp_path, smarthosts=(f"127.0.0.1:{port}",), smarthost_tls="verify")
    return RemoteCourier(config, FakeResolver({}), reactor,
                         trust_root=Certificate.loadPEM(CA.cert_pem.bytes()))


@pytest_twisted.ensureDeferred
async def test_relayed_over_verified_tls_with_the_parameter(tmp_path):
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    async with sinks({"tls": SMARTHOST_CERT, "requiretls": True}) as (sink,):
        [result] = await run(smarthost(tmp_path, sink.port), env, path)
    assert result.outcome is Outcome.DELIVERED
    (msg,) = sink.messages
    assert msg.tls and "REQUIRETLS" in msg.mail_params


@pytest_twisted.ensureDeferred
async def test_verify_policy_to_an_mx_not_authenticated_bounces_with_5_7_10(tmp_path):
    """RFC 8689 §4.2.1: the MX must be authenticated (DNSSEC, or an MTA-STS
    policy): a certificate verified for a name an insecure MX answer gave is not
    enough.  Nothing is sent to that host (not even a connection)."""
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    async with sinks({"tls": CERTS[MX1], "requiretls": True}) as (sink,):
        [result] = await run(courier(tmp_path, sink.port, "verify"), env, path)
    assert result.outcome is Outcome.FAILED and result.status == "5.7.10"
    assert result.reply.startswith("550 5.7.10 ")
    assert "not authenticated by DNSSEC or an MTA-STS policy" in result.reply
    assert sink.messages == [] and sink.sessions == []


@pytest_twisted.ensureDeferred
async def test_next_hop_without_requiretls_bounces_with_5_7_30(tmp_path):
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    async with sinks({"tls": SMARTHOST_CERT}) as (sink,):
        [result] = await run(smarthost(tmp_path, sink.port), env, path)
    assert result.outcome is Outcome.FAILED and result.status == "5.7.30"
    assert result.reply.startswith("550 5.7.30 ") and "REQUIRETLS support required" in result.reply
    assert sink.messages == [] and "MAIL" not in " ".join(sink.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_unverified_hop_bounces_with_5_7_10(tmp_path):
    # Opportunistic TLS (certificate not checked) is not enough; nor is plaintext.
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    async with sinks({"tls": CERTS[MX1], "requiretls": True}) as (sink,):
        [result] = await run(courier(tmp_path, sink.port, "opportunistic"), env, path)
    assert result.outcome is Outcome.FAILED and result.status == "5.7.10"
    assert sink.messages == []
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    async with sinks({"requiretls": True}) as (sink,):
        [result] = await run(courier(tmp_path, sink.port, "opportunistic"), env, path)
    assert result.outcome is Outcome.FAILED and result.status == "5.7.10"
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_plain_message_unchanged(tmp_path):
    env, path = envelope(tmp_path, ["a@dst.test"])
    async with sinks({"requiretls": True}) as (sink,):
        [result] = await run(courier(tmp_path, sink.port, "opportunistic"), env, path)
    assert result.outcome is Outcome.DELIVERED
    assert "REQUIRETLS" not in sink.messages[0].mail_params


def test_tls_required_header(tmp_path):
    p = tmp_path / "m"
    p.write_bytes(b"Subject: x\r\nTLS-Required:\r\n  No\r\n\r\nTLS-Required: yes\r\n")
    assert tls_required_no(p)
    p.write_bytes(b"Subject: x\r\n\r\nTLS-Required: No\r\n")
    assert not tls_required_no(p)


@pytest_twisted.ensureDeferred
async def test_an_mx_authenticated_by_mta_sts_takes_a_requiretls_message(setup, dns, tmp_path):  # noqa: F811
    """§4.2.1: an MX host the domain's MTA-STS policy names is authenticated; one
    it does not name (a testing policy lets the courier try it) is not: 5.7.10."""
    dns.load(sts_zone("dst.test"))
    courier = await setup.start(sink_options={"tls": STS_MX_CERT, "requiretls": True})
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    env, path = envelope(tmp_path, ["a@dst.test"], requiretls=True)
    [result] = await courier.deliver(env, env.recipients, path)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert "REQUIRETLS" in setup.sink.messages[0].mail_params and setup.sink.messages[0].tls
    dns.load(sts_zone("rpt.test"))
    setup.policies.serve("rpt.test", policy_text("testing", ["mx.elsewhere.test"]))
    env, path = envelope(tmp_path, ["b@rpt.test"], requiretls=True)
    [result] = await courier.deliver(env, env.recipients, path)
    assert result.outcome is Outcome.FAILED and result.status == "5.7.10", result.reply
    assert len(setup.sink.messages) == 1
