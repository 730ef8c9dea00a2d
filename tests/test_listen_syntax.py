"""Listener addresses written ``host:port`` / ``[v6]:port`` beside Twisted endpoint strings."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from mta.config import ConfigError
from tests.harness import in_thread, make_config, start_mta


@pytest.mark.parametrize(("written", "endpoint"), [
    ("127.0.0.1:2525", "tcp:2525:interface=127.0.0.1"),
    ("*:25", "tcp:25"),
    (":25", "tcp:25"),
    ("[::1]:2587", "tcp6:2587:interface=\\:\\:1"),
    ("[2001:db8::1]:25", "tcp6:25:interface=2001\\:db8\\:\\:1"),
    ("tcp:25:interface=127.0.0.1", "tcp:25:interface=127.0.0.1"),  # Twisted's own: unchanged
    ("haproxy:tcp:2525", "haproxy:tcp:2525"),
])
def test_host_port_becomes_an_endpoint(tmp_path, written, endpoint) -> None:
    config = make_config(tmp_path, tls=False, extra={"listeners": {
        "mx": {"endpoint": written, "kind": "mx"}}})
    assert config.listeners[0].endpoint == endpoint


@pytest.mark.parametrize(("written", "problem"), [
    ("127.0.0.1:70000", "port out of range"),
    ("300.1.2.3:25", "is not an IPv4 address"),
    ("[::g]:25", "is not an IPv6 address"),
    ("nonsense:25", "bad endpoint description"),
])
def test_bad_addresses_are_refused_with_the_key(tmp_path, written, problem) -> None:
    with pytest.raises(ConfigError, match=r"^listeners\.mx\.endpoint: ") as info:
        make_config(tmp_path, tls=False, extra={"listeners": {
            "mx": {"endpoint": written, "kind": "mx"}}})
    assert problem in str(info.value)


@pytest_twisted.ensureDeferred
async def test_the_daemon_listens_on_host_port_and_v6(tmp_path) -> None:
    mta = await start_mta(tmp_path, tls=False, extra={"listeners": {
        "mx": {"endpoint": "127.0.0.1:0", "kind": "mx"},
        "submission": {"endpoint": "[::1]:0", "kind": "submission"}}})
    try:
        def greet(family: int, host: str, port: int) -> bytes:
            with socket.socket(family) as s:
                s.settimeout(5)
                s.connect((host, port))
                return s.recv(100)

        assert (await in_thread(greet, socket.AF_INET, "127.0.0.1", mta.port("mx"))).startswith(b"220")
        assert (await in_thread(greet, socket.AF_INET6, "::1", mta.port("submission"))).startswith(b"220")
    finally:
        await mta.stop()
