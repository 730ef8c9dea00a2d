"""send_now: replies go out at once, in order, batched per pipelined group."""

from __future__ import annotations

import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from mta.smtp import framing as server_module
from mta.system.netio import send_now
from tests.harness import RawClient, in_thread, start_mta


class _Hold(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self.factory.made.callback(self)


@pytest_twisted.ensureDeferred
async def test_send_now_writes_at_once_and_keeps_order_behind_queued_bytes() -> None:
    factory = Factory.forProtocol(_Hold)
    factory.made = Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        proto = await factory.made
        send_now(proto.transport, b"first\r\n")
        # Sent without a reactor turn: the peer can read it right away.
        assert client.recv(100) == b"first\r\n"
        assert not proto.transport.dataBuffer and not proto.transport._tempDataBuffer
        proto.transport.write(b"queued\r\n")  # waits for the next reactor turn...
        send_now(proto.transport, b"after\r\n")  # ...so this must wait behind it
        deadline = time.monotonic() + 5
        got = b""
        while got.count(b"\r\n") < 2 and time.monotonic() < deadline:
            got += await in_thread(client.recv, 100)
        assert got == b"queued\r\nafter\r\n"
        proto.transport.loseConnection()
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_get_their_replies_in_one_write(tmp_path, monkeypatch) -> None:
    writes: list[bytes] = []

    def recording(transport, data: bytes) -> None:
        writes.append(data)
        send_now(transport, data)

    monkeypatch.setattr(server_module, "send_now", recording)
    mta = await start_mta(tmp_path)
    try:
        def run() -> bytes:
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<nobody@example.test>\r\nDATA\r\n")
            time.sleep(0.2)  # everything the server wrote by now
            data = c.sock.recv(65536)
            c.close()
            return data

        data = await in_thread(run)
    finally:
        await mta.stop()
    lines = data.split(b"\r\n")[:-1]
    assert [line[:3] for line in lines] == [b"250", b"250", b"550", b"354"], data
    assert data in writes  # the four replies left in one write (RFC 2920 §3.2)
