"""More of the server as a user meets it: swaks, queue write failure, logs, SNI, lifetimes."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from tests.harness import PASSWORD, RawClient, in_thread, message_files, shared_ca, start_mta


@pytest.fixture
def mta(tmp_path):
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


@pytest_twisted.ensureDeferred
async def test_swaks_delivers_to_mx_port(mta):
    result = await in_thread(subprocess.run, [
        "swaks", "--server", f"127.0.0.1:{mta.port()}", "--helo", "client.test",
        "--from", "someone@remote.test", "--to", "alice@example.test",
        "--header", "Subject: from swaks", "--body", "hello from swaks",
    ], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    (env,) = mta.queued()
    assert b"hello from swaks" in mta.message_bytes(env.id)


@pytest_twisted.ensureDeferred
async def test_swaks_submission_with_starttls_and_auth(mta, tmp_path):
    ca_file = tmp_path / "ca.pem"
    shared_ca().cert_pem.write_to_path(str(ca_file))
    result = await in_thread(subprocess.run, [
        "swaks", "--server", f"127.0.0.1:{mta.port('submission')}", "--helo", "client.test",
        "--tls", "--tls-ca-path", str(ca_file), "--auth", "LOGIN",
        "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
        "--from", "alice@example.test", "--to", "friend@remote.test",
    ], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    (env,) = mta.queued()
    assert env.auth_user == "alice@example.test"
    assert [r.address for r in env.recipients] == ["friend@remote.test"]


@pytest_twisted.ensureDeferred
async def test_swaks_auth_refused_in_clear(mta):
    result = await in_thread(subprocess.run, [
        "swaks", "--server", f"127.0.0.1:{mta.port('submission')}", "--auth", "PLAIN",
        "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
        "--from", "alice@example.test", "--to", "friend@remote.test",
    ], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "did not advertise authentication" in result.stderr
    assert " -> AUTH" not in result.stdout  # the password never went out in clear


def send_small_message(port: int) -> RawClient:
    """A client that has sent a whole small message (its reply not read yet)."""
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd("RCPT TO:<alice@example.test>")
    c.cmd("DATA")
    c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
    return c


@pytest_twisted.ensureDeferred
async def test_queue_write_failure_gives_451_and_leaves_nothing(mta, monkeypatch):
    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)

    def run():
        c = send_small_message(mta.port())
        reply = c.read_reply()
        after = c.cmd("NOOP")
        c.close()
        return reply, after

    reply, after = await in_thread(run)
    monkeypatch.undo()
    assert reply[0] == 451 and "4.3.0" in reply[1]
    assert after[0] == 250
    assert message_files(mta.store.msg_dir) == []
    assert list(mta.store.tmp_dir.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_the_runner_is_told_of_a_message_after_its_250_is_sent(mta, monkeypatch):
    from mta.smtp import framing as server_module

    events: list[str] = []
    real_send_now = server_module.send_now

    def recording_send_now(transport, data):
        events.extend(line.decode() for line in data.splitlines())
        real_send_now(transport, data)

    monkeypatch.setattr(server_module, "send_now", recording_send_now)
    mta.store.subscribe(lambda env: events.append(f"told {env.id}"))

    def run(wait_for_reply: bool) -> None:
        c = send_small_message(mta.port())
        if wait_for_reply:
            assert c.read_reply()[0] == 250
        c.close()

    await in_thread(run, True)
    (env,) = mta.queued()
    assert events.index(f"250 2.0.0 Ok: queued as {env.id}") < events.index(f"told {env.id}")
    # A client gone before its 250: the message was accepted all the same, and
    # the runner is told (else it would wait in the queue until the next start).
    await in_thread(run, False)
    deadline = reactor.seconds() + 5
    while len([e for e in events if e.startswith("told ")]) < 2 and reactor.seconds() < deadline:
        await deferLater(reactor, 0.01, lambda: None)
    told = [e.split()[1] for e in events if e.startswith("told ")]
    assert sorted(told) == sorted(e.id for e in mta.queued())


@pytest_twisted.ensureDeferred
async def test_password_never_logged(mta):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        def run():
            c = RawClient(mta.port("submission"))
            c.read_reply()
            c.cmd("EHLO client.test")
            c.cmd("STARTTLS")
            c.starttls()
            c.cmd("EHLO client.test")
            for password in (PASSWORD, "hunter2-wrong"):
                token = base64.b64encode(f"\0alice@example.test\0{password}".encode()).decode()
                c.cmd("AUTH PLAIN " + token)
            c.close()

        await in_thread(run)
        await mta.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = repr(events)
    assert "auth" in text
    assert PASSWORD not in text and "hunter2-wrong" not in text


@pytest_twisted.ensureDeferred
async def test_session_lifetime(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"session_timeout": 0.5, "command_timeout": 5.0}})
    try:
        def run():
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            import time

            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                code, text = c.cmd("NOOP")
                if code != 250:
                    return code, text
                time.sleep(0.1)
            return None

        code, text = await in_thread(run)
        assert code == 421 and "4.4.2" in text
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_total_connection_limit(tmp_path):
    mta = await start_mta(tmp_path, extra={"limits": {"max_connections": 1}})
    try:
        def run():
            a = RawClient(mta.port())
            a.read_reply()
            b = RawClient(mta.port())
            reply = b.read_reply()
            a.close()
            b.close()
            return reply

        code, text = await in_thread(run)
        assert code == 421 and "Too many connections" in text
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_certificate_chosen_by_sni(tmp_path):
    other = shared_ca().issue_cert("mail.other.test")
    d = tmp_path / "certs" / "mail.other.test"
    d.mkdir(parents=True)
    other.cert_chain_pems[0].write_to_path(str(d / "fullchain.pem"))
    other.private_key_pem.write_to_path(str(d / "privkey.pem"))
    mta = await start_mta(tmp_path, extra={"tls": {"cert_dir": str(tmp_path / "certs")}})
    try:
        def subject_for(name):
            ctx = ssl.create_default_context()
            shared_ca().configure_trust(ctx)
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            c.cmd("STARTTLS")
            c.sock = ctx.wrap_socket(c.sock, server_hostname=name)
            cert = c.sock.getpeercert()
            version = c.sock.version()
            c.close()
            return cert["subjectAltName"], version

        other_san, version = await in_thread(subject_for, "mail.other.test")
        default_san, _ = await in_thread(subject_for, "mx.example.test")
        assert ("DNS", "mail.other.test") in other_san
        assert ("DNS", "mx.example.test") in default_san
        assert version in ("TLSv1.2", "TLSv1.3")
    finally:
        await mta.stop()


def test_tls_below_1_2_refused(tmp_path):
    """The server context refuses TLS 1.1 (a client limited to it cannot connect)."""
    from mta.config import TLSConfig
    from mta.system.tls import server_tls

    cert = shared_ca().issue_cert("mx.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    factory = server_tls(TLSConfig(tmp_path / "c.pem", tmp_path / "k.pem"))
    from OpenSSL import SSL

    ctx = factory.getContext()
    # OP_NO_TLSv1 and OP_NO_TLSv1_1 are set, or the minimum version is raised.
    options = ctx.set_options(0)
    assert options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1


def test_plugin_import_does_not_import_reactor():
    code = ("import sys; import twisted.plugins.mta_plugin as p; "
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'; "
            "print(p.serviceMaker.tapname)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mta"


def test_socket_helper_is_loopback_only():
    # Every test server binds 127.0.0.1; guard against a harness change binding elsewhere.
    from tests.harness import make_config

    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"
    assert make_config is not None


@pytest_twisted.ensureDeferred
async def test_a_closed_session_is_freed_without_the_cyclic_collector(mta):
    """Nothing of a session refers back to it (the checks' view holds it weakly):
    once its connection has closed it is freed at once, with all it held, not
    left for a garbage collection (which would cost every message some work)."""
    import gc
    import weakref

    def dialog(c: RawClient) -> list[int]:
        codes = [c.read_reply()[0], c.cmd("EHLO client.test")[0], c.cmd("MAIL FROM:<f@remote.test>")[0],
                 c.cmd("RCPT TO:<alice@example.test>")[0], c.cmd("DATA")[0],
                 c.cmd(b"Subject: hi\r\n\r\nhello\r\n.")[0], c.cmd("QUIT")[0]]
        c.close()
        return codes

    gc.collect()
    gc.disable()
    try:
        c = await in_thread(RawClient, mta.port())
        for _ in range(100):  # bounded: the session is there within a second
            if mta.context.sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        (session,) = mta.context.sessions
        ref = weakref.ref(session)
        del session
        codes = await in_thread(dialog, c)
        for _ in range(200):  # bounded: the connection is closed within two seconds
            if ref() is None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        alive = ref() is not None
    finally:
        gc.enable()
    assert codes == [220, 250, 250, 250, 354, 250, 221]
    assert len(mta.queued()) == 1
    assert not alive
