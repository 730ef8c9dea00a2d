"""Session policy: sender binding, abuse limits, early talkers, reload, graceful shutdown, PROXY."""

from __future__ import annotations

import base64
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from mta.policy.auth import add_user
from tests.harness import PASSWORD, RawClient, in_thread, start_mta


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def login(port: int, user: str = "alice@example.test", password: str = PASSWORD,
          source: str | None = None) -> tuple[RawClient, int]:
    c = RawClient(port, source=source)
    c.read_reply()
    c.cmd("EHLO client.test")
    c.cmd("STARTTLS")
    c.starttls()
    c.cmd("EHLO client.test")
    code, _ = c.cmd("AUTH PLAIN " + plain(user, password))
    return c, code


@pytest.fixture
def mta(tmp_path):
    (tmp_path / "domains" / "example.test").mkdir(parents=True)
    (tmp_path / "domains" / "example.test" / "identities").write_text(
        "# who may send as whom\nalice: sales@example.test, @alias.test\nbob: *\n")
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


@pytest.mark.parametrize("user,sender,code", [
    ("alice@example.test", "alice@example.test", 250),
    ("alice@example.test", "Alice+tag@Example.Test", 250),
    ("alice@example.test", "sales@example.test", 250),
    ("alice@example.test", "anyone@alias.test", 250),
    ("alice@example.test", "bob@example.test", 553),
    ("alice@example.test", "", 553),
    ("bob@example.test", "whoever@elsewhere.test", 250),
    ("bob@example.test", "", 250),
])
@pytest_twisted.ensureDeferred
async def test_sender_binding(mta, user, sender, code):
    def run():
        c, auth = login(mta.port("submission"), user)
        assert auth == 235
        reply = c.cmd(f"MAIL FROM:<{sender}>")
        c.close()
        return reply

    got, text = await in_thread(run)
    assert got == code, text
    if code == 553:
        assert "5.7.1" in text


@pytest_twisted.ensureDeferred
async def test_auth_lockout_per_ip_across_sessions(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {
        "auth_block_failures": 2, "auth_failure_delay": 0.01, "max_auth_failures": 5}})
    try:
        def run():
            c, first = login(mta.port("submission"), password="wrong")
            second = c.cmd("AUTH PLAIN " + plain("alice@example.test", "wrong2"))[0]
            third = c.cmd("AUTH PLAIN " + plain("bob@example.test", "wrong3"))[0]
            c.close()
            # A new session from the same address, even with the right password:
            d, blocked = login(mta.port("submission"))
            d.close()
            return first, second, third, blocked

        first, second, third, blocked = await in_thread(run)
        assert (first, second) == (535, 535)
        assert third == 454  # blocked from now on
        assert blocked == 454
    finally:
        await mta.stop()


def auth_once(port: int, source: str, password: str, user: str = "alice@example.test") -> tuple[int, str]:
    """One session from ``source``: AUTH PLAIN once; the (code, text) of its reply."""
    c = RawClient(port, source=source)
    c.read_reply()
    c.cmd("EHLO client.test")
    c.cmd("STARTTLS")
    c.starttls()
    c.cmd("EHLO client.test")
    reply = c.cmd("AUTH PLAIN " + plain(user, password))
    c.close()
    return reply


@pytest_twisted.ensureDeferred
async def test_auth_block_answers_454_is_not_extended_and_spares_the_known_address(tmp_path):
    """The AbuseLimits rule through real sessions, on a fake clock: three failures for
    alice from three addresses block the account for 900 s from the third; during the
    block the right password gets 454 4.7.0 (as a wrong one does), those attempts do not
    extend it, and the address alice last logged in from still gets in; an address
    block holds even for that address."""
    from twisted.internet.task import Clock

    from mta.policy.limits import AbuseLimits

    mta = await start_mta(tmp_path, extra={"limits": {
        "auth_block_failures": 3, "auth_block_window": 600, "auth_block_time": 900,
        "auth_failure_delay": 0.01, "max_auth_failures": 5}})
    clock = Clock()
    mta.context.abuse = AbuseLimits(mta.config.limits, clock)
    port = mta.port("submission")
    try:
        def run(source, password, user="alice@example.test"):
            return in_thread(lambda: auth_once(port, source, password, user))

        assert (await run("127.0.0.2", PASSWORD))[0] == 235  # alice's usual address
        for attacker in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
            assert (await run(attacker, "guess"))[0] == 535
        right = await run("127.0.0.6", PASSWORD)
        wrong = await run("127.0.0.6", "guess")
        assert right[0] == 454 and "454 4.7.0 " in right[1]
        assert wrong == right  # tells nothing about the password
        assert (await run("127.0.0.2", PASSWORD))[0] == 235  # the real user is not locked out
        clock.advance(800)
        for _ in range(3):  # attempts during the block: not counted, no extension
            assert (await run("127.0.0.3", "guess"))[0] == 454
        assert (await run("127.0.0.6", PASSWORD))[0] == 454
        clock.advance(101)  # 901 s after the block began
        assert (await run("127.0.0.6", PASSWORD))[0] == 235
        # An address block is not lifted by having logged in before.
        for user in ("bob@example.test", "carol@example.test", "dave@example.test"):
            assert (await run("127.0.0.2", "guess", user))[0] == 535
        assert (await run("127.0.0.2", PASSWORD))[0] == 454
        assert (await run("127.0.0.7", PASSWORD))[0] == 235  # alice herself is not blocked
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_progressive_auth_delay(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"auth_failure_delay": 0.1, "max_auth_failures": 5}})
    try:
        def run():
            c, _ = login(mta.port("submission"), password="wrong")
            t0 = time.monotonic()
            c.cmd("AUTH PLAIN " + plain("alice@example.test", "wrong"))
            second = time.monotonic() - t0
            c.close()
            return second

        second = await in_thread(run)
        assert second >= 0.2  # the second failure waits twice the base delay
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_connection_rate_per_ip(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"connection_rate_per_ip": 3}})
    try:
        def run():
            codes = []
            for _ in range(4):
                c = RawClient(mta.port())
                codes.append(c.read_reply()[0])
                c.close()
            return codes

        assert await in_thread(run) == [220, 220, 220, 421]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_user_message_rate(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"messages_per_user_per_hour": 1}})
    try:
        def run():
            c, _ = login(mta.port("submission"))
            first = c.cmd("MAIL FROM:<alice@example.test>")[0]
            c.cmd("RSET")
            second = c.cmd("MAIL FROM:<alice@example.test>")
            c.close()
            return first, second

        first, (code, text) = await in_thread(run)
        assert first == 250 and code == 450 and "4.7.1" in text
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_early_talker_refused(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"greeting_delay": 0.5}})
    try:
        def run():
            talker = RawClient(mta.port())
            talker.send(b"EHLO impatient.test\r\n")
            refused = talker.read_reply()
            talker.close()
            patient = RawClient(mta.port())
            greeting = patient.read_reply()
            patient.close()
            return refused, greeting

        refused, greeting = await in_thread(run)
        assert refused[0] == 554 and "before the greeting" in refused[1]
        assert greeting[0] == 220
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_reload_applies_new_users_and_keeps_old_on_error(mta, tmp_path):
    users = tmp_path / "domains" / "example.test" / "users"
    add_user(users, "carol", PASSWORD)

    def rcpt(address):
        c = RawClient(mta.port())
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<s@remote.test>")
        code = c.cmd(f"RCPT TO:<{address}>")[0]
        c.close()
        return code

    # A session open across the reload keeps working.
    held = RawClient(mta.port())
    await in_thread(held.read_reply)
    assert await in_thread(rcpt, "carol@example.test") == 550
    mta.service.reload()
    assert await in_thread(rcpt, "carol@example.test") == 250
    # A broken aliases file: the reload fails and the running policy stays.
    (tmp_path / "domains" / "example.test" / "aliases").write_text("broken line without colon\n")
    from mta.daemon.service import StartupError

    with pytest.raises(StartupError):
        mta.service.reload()
    assert await in_thread(rcpt, "info@example.test") == 250
    assert (await in_thread(held.cmd, "NOOP"))[0] == 250
    held.close()


@pytest_twisted.ensureDeferred
async def test_graceful_shutdown_finishes_data_then_421(tmp_path):
    mta = await start_mta(tmp_path)
    idle = RawClient(mta.port())
    busy = RawClient(mta.port())

    def open_data():
        idle.read_reply()
        busy.read_reply()
        busy.cmd("EHLO client.test")
        busy.cmd("MAIL FROM:<s@remote.test>")
        busy.cmd("RCPT TO:<alice@example.test>")
        assert busy.cmd("DATA")[0] == 354
        busy.send(b"Subject: during shutdown\r\n\r\nfirst half\r\n")

    await in_thread(open_data)
    stopping = Deferred.fromCoroutine(mta.stop())
    await deferLater(reactor, 0.2, lambda: None)

    def finish():
        idle_reply = idle.read_reply()
        busy.send(b"second half\r\n.\r\n")
        return idle_reply, busy.read_reply(), busy.read_reply()

    idle_reply, data_reply, goodbye = await in_thread(finish)
    await stopping
    idle.close()
    busy.close()
    assert idle_reply[0] == 421 and "4.3.2" in idle_reply[1]
    assert data_reply[0] == 250
    assert goodbye[0] == 421
    (env,) = mta.queued()
    assert mta.message_bytes(env.id).endswith(b"first half\r\nsecond half\r\n")


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_v1_client_address(tmp_path):
    mta = await start_mta(tmp_path, extra={"listeners": {
        "mx": {"endpoint": "haproxy:tcp:0:interface=127.0.0.1", "kind": "mx"}}})
    try:
        def run():
            c = RawClient(mta.port())
            c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
            c.read_reply()
            ehlo = c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<s@remote.test>")
            c.cmd("RCPT TO:<alice@example.test>")
            c.cmd("DATA")
            c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
            reply = c.read_reply()
            c.close()
            return ehlo, reply

        ehlo, reply = await in_thread(run)
        assert "[192.0.2.7]" in ehlo[1]
        assert reply[0] == 250
        (env,) = mta.queued()
        assert env.client_ip == "192.0.2.7"
        assert b"from client.test ([192.0.2.7])" in mta.message_bytes(env.id)
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_v2_and_garbage_header(tmp_path):
    import socket
    import struct

    mta = await start_mta(tmp_path, extra={"listeners": {
        "mx": {"endpoint": "haproxy:tcp:0:interface=127.0.0.1", "kind": "mx"}}})
    try:
        def run():
            header = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
                      + socket.inet_aton("198.51.100.9") + socket.inet_aton("127.0.0.1")
                      + struct.pack("!HH", 40000, 25))
            c = RawClient(mta.port())
            # Sent in two pieces, the first shorter than the v2 signature.
            c.send(header[:5])
            time.sleep(0.05)
            c.send(header[5:])
            c.read_reply()
            ehlo = c.cmd("EHLO client.test")
            c.close()
            bad = RawClient(mta.port())
            bad.send(b"EHLO no-proxy-header.test\r\n")
            closed = bad.is_closed()
            bad.close()
            return ehlo, closed

        ehlo, closed = await in_thread(run)
        assert "[198.51.100.9]" in ehlo[1]
        assert closed
    finally:
        await mta.stop()


@pytest.mark.parametrize("from_header,code", [
    (b"From: Alice <alice@example.test>", 250),
    (b"From: sales@example.test", 250),
    (b"From: \"Bob\" <bob@example.test>", 553),
    (b"From: alice@example.test, bob@example.test", 553),
    (b"Subject: no from at all", 553),
])
@pytest_twisted.ensureDeferred
async def test_sender_binding_of_from_header(tmp_path, from_header, code):
    (tmp_path / "domains" / "example.test").mkdir(parents=True)
    (tmp_path / "domains" / "example.test" / "identities").write_text("alice: sales@example.test\n")
    mta = await start_mta(tmp_path, extra={"sender_binding_from": True})
    try:
        def run():
            c, _ = login(mta.port("submission"))
            c.cmd("MAIL FROM:<alice@example.test>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(from_header + b"\r\n\r\nbody\r\n.\r\n")
            reply = c.read_reply()
            c.close()
            return reply

        got, text = await in_thread(run)
        assert got == code, text
        assert len(mta.queued()) == (1 if code == 250 else 0)
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_relay_networks_exempt_from_per_address_limits(tmp_path):
    mta = await start_mta(tmp_path, extra={"relay_networks": ["127.0.0.0/8"], "limits": {
        "connection_rate_per_ip": 2, "max_connections_per_ip": 2}})
    try:
        def run():
            clients = [RawClient(mta.port()) for _ in range(5)]
            codes = [c.read_reply()[0] for c in clients]
            for c in clients:
                c.close()
            return codes

        assert await in_thread(run) == [220] * 5
    finally:
        await mta.stop()


def test_listen_backlog_default():
    from mta.system.proxy import with_backlog

    assert with_backlog("tcp:25") == "tcp:25:backlog=1024"
    assert with_backlog("tcp:25:interface=127.0.0.1:backlog=10") == "tcp:25:interface=127.0.0.1:backlog=10"
    assert with_backlog("unix:/run/x.sock") == "unix:/run/x.sock"
