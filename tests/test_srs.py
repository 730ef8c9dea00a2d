"""SRS for forwarded mail: rewriting at queue time, sending with it, routing bounces back."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from mta.delivery.mx import MXHost
from mta.delivery.remote import RemoteCourier
from mta.policy.srs import SRSError, SRSRewriter, load_or_create_secret
from mta.queue.courier import Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from tests.harness import RawClient, in_thread, start_mta
from tests.sink import start_sink
from tests.test_remote import FakeResolver, make_config


def test_forward_and_reverse_round_trip(tmp_path):
    secret = load_or_create_secret(tmp_path / "srs-secret")
    assert load_or_create_secret(tmp_path / "srs-secret") == secret  # stable across restarts
    assert oct((tmp_path / "srs-secret").stat().st_mode & 0o777) == "0o600"
    srs = SRSRewriter(secret)
    rewritten = srs.forward("alice@sender.test", "example.test")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("@example.test")
    assert srs.reverse(rewritten) == "alice@sender.test"
    with pytest.raises(SRSError):
        srs.reverse("SRS0=abcd=AB=sender.test=alice@example.test")
    with pytest.raises(SRSError):
        SRSRewriter("other secret").reverse(rewritten)


@pytest.fixture
def mta(tmp_path):
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


def send(port: int, sender: str, rcpts: list[str]) -> list[tuple[int, str]]:
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    replies = [c.cmd(f"MAIL FROM:<{sender}>")]
    replies += [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
    if any(code == 250 for code, _ in replies[1:]):
        c.cmd("DATA")
        c.send(b"Subject: fwd\r\n\r\nx\r\n.\r\n")
        replies.append(c.read_reply())
    c.close()
    return replies


@pytest_twisted.ensureDeferred
async def test_forwarded_recipient_gets_srs_sender(mta):
    replies = await in_thread(send, mta.port(), "bob@sender.test", ["outside@example.test", "alice@example.test"])
    assert [code for code, _ in replies] == [250, 250, 250, 250]
    (env,) = mta.queued()
    srs_sender = env.extra["srs_sender"]
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("@example.test")
    assert env.extra["srs_recipients"] == ["friend@remote.test"]
    assert mta.context.srs.reverse(srs_sender) == "bob@sender.test"


@pytest_twisted.ensureDeferred
async def test_bounce_to_srs_address_routed_to_original_sender(mta):
    good = mta.context.srs.forward("bob@sender.test", "example.test")
    replies = await in_thread(send, mta.port(), "", [good])
    assert replies[1][0] == 250 and replies[-1][0] == 250
    (env,) = mta.queued()
    assert [(r.address, str(r.kind)) for r in env.recipients] == [("bob@sender.test", "remote")]


@pytest_twisted.ensureDeferred
async def test_forged_srs_address_is_no_relay(mta):
    replies = await in_thread(send, mta.port(), "", ["SRS0=abcd=AB=victim.test=x@example.test"])
    assert replies[1][0] == 550
    assert mta.queued() == []


@pytest_twisted.ensureDeferred
async def test_remote_courier_sends_srs_sender_only_for_forwarded(tmp_path):
    sink = await start_sink(interface="127.0.0.1")
    try:
        config = make_config(tmp_path, mx_port=sink.port)
        resolver = FakeResolver({"remote.test": [MXHost("mx.remote.test", 10, ("127.0.0.1",))]})
        courier = RemoteCourier(config, resolver, reactor)
        path = tmp_path / "m.msg"
        path.write_bytes(b"Subject: x\r\n\r\ny\r\n")
        rcpts = [Recipient("fwd@remote.test", RecipientKind.REMOTE, "alias@example.test"),
                 Recipient("direct@remote.test", RecipientKind.REMOTE, "direct@remote.test")]
        env = Envelope("q1", "bob@sender.test", rcpts, 0.0, size=path.stat().st_size,
                       extra={"srs_sender": "SRS0=x=y=sender.test=bob@example.test",
                              "srs_recipients": ["fwd@remote.test"]})
        results = await courier.deliver(env, rcpts, path)
        assert all(r.outcome is Outcome.DELIVERED for r in results)
        by_sender = {m.sender: m.recipients for m in sink.messages}
        assert by_sender == {"SRS0=x=y=sender.test=bob@example.test": ["fwd@remote.test"],
                             "bob@sender.test": ["direct@remote.test"]}
    finally:
        await sink.stop()


def test_stage_timeouts_from_configuration(tmp_path):
    from mta.config import ConfigError, config_from_dict

    base = {"hostname": "h.test", "local_domains": [], "delivery": {"timeouts": {"greeting": 30, "data_end": 60}}}
    config = config_from_dict(base, tmp_path)
    courier = RemoteCourier(config, FakeResolver({}), reactor)
    assert courier.timeouts.greeting == 30.0 and courier.timeouts.data_end == 60.0
    assert courier.timeouts.rcpt == 300.0  # RFC 5321 §4.5.3.2.3 default kept
    with pytest.raises(ConfigError, match="delivery.timeouts.gretting"):
        config_from_dict({**base, "delivery": {"timeouts": {"gretting": 3}}}, tmp_path)
