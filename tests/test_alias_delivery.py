"""Alias fan-out delivered for real: local Maildirs, a remote MX (via loopback DNS) and a pipe.

The MTA runs in-process with its real queue runner and couriers.
"""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.harness import RawClient, in_thread, start_mta
from tests.sink import start_sink


async def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_alias_fan_out_to_maildir_remote_and_pipe(tmp_path, dns_server):
    dns_server.load({"remote.test": {"MX": [(10, "mx.remote.test")]},
                     "mx.remote.test": {"A": ["127.0.0.1"]}})
    sink = await start_sink()
    piped = tmp_path / "piped.txt"
    aliases = (f"everyone: alice, bob, friend@remote.test, archive\n"
               f"archive: | cat > {piped}\n")
    host, port = dns_server.address
    mta = None
    try:
        # runner=None: the service builds its real runner and couriers from the config.
        mta = await start_mta(tmp_path, runner=None, aliases=aliases, extra={
            "dns": {"servers": [f"{host}:{port}"], "timeout": 1.0},
            "delivery": {"mx_port": sink.port},
        })

        def send():
            c = RawClient(mta.port())
            c.read_reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<sender@elsewhere.test>")
            assert c.cmd("RCPT TO:<everyone@example.test>")[0] == 250
            c.cmd("DATA")
            c.send(b"Subject: fan out\r\n\r\nto all of you\r\n.\r\n")
            reply = c.read_reply()
            c.close()
            return reply

        assert (await in_thread(send))[0] == 250
        mail = tmp_path / "var" / "mail" / "example.test"

        def delivered() -> bool:
            return (piped.exists() and bool(sink.messages)
                    and all(list((mail / u / "new").glob("*")) for u in ("alice", "bob")
                            if (mail / u / "new").exists())
                    and (mail / "alice" / "new").exists() and (mail / "bob" / "new").exists())

        await wait_for(delivered)
        for user in ("alice", "bob"):
            (f,) = (mail / user / "new").iterdir()
            assert f.read_bytes().endswith(b"\n\nto all of you\n")
            assert f"Delivered-To: {user}@example.test".encode() in f.read_bytes()
        (remote,) = sink.messages
        assert remote.recipients == ["friend@remote.test"]
        assert remote.sender.startswith("SRS0=") and remote.sender.endswith("@example.test")
        assert piped.read_bytes().endswith(b"\n\nto all of you\n")
        await wait_for(lambda: not mta.store.ids())
    finally:
        if mta is not None:
            await mta.stop()
        await sink.stop()
