import pytest_twisted
from twisted.internet import reactor

from mta.delivery.client import ClientOptions, Transaction, send
from tests.sink import start_sink


@pytest_twisted.ensureDeferred
async def test_smoke(tmp_path):
    p = tmp_path / "m"
    p.write_bytes(b"Subject: hi\r\n\r\n.dot\r\nbody\r\n")
    sink = await start_sink()
    try:
        r = await send(reactor, ("127.0.0.1", sink.port), [Transaction("a@x.test", ["b@y.test", "c@y.test"], p, 30)], ClientOptions("client.test"))
        print(r)
        print(sink.sessions)
    finally:
        await sink.stop()
