"""MTA-STS policy hosting (RFC 8461 §3.3) over real HTTPS with a trustme certificate."""

from __future__ import annotations

import http.client
import socket
from dataclasses import replace

import pytest
import pytest_twisted

from mta.admin.cli import config_problems
from mta.config import ConfigError
from mta.daemon.service import MTAService, StartupError
from mta.policy.mtasts import policy_id, policy_text
from tests.harness import client_tls_context, in_thread, make_config, shared_ca, start_mta

POLICY_PATH = "/.well-known/mta-sts.txt"


def fetch(port: int, host: str, path: str = POLICY_PATH,
          sni: str | None = None) -> tuple[int, str | None, bytes]:
    """GET over TLS to 127.0.0.1:port, verifying the certificate for ``sni`` (default host)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = client_tls_context().wrap_socket(raw, server_hostname=sni or host)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def own_certificate(tmp_path, *names: str) -> dict[str, str]:
    cert = shared_ca().issue_cert(*names)
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "sts.pem"))
    return {"cert_file": str(tmp_path / "sts.pem"), "key_file": str(tmp_path / "sts.pem")}


async def start(tmp_path, sts: dict) -> tuple:
    mta = await start_mta(tmp_path, extra={
        "local_domains": ["example.test", "other.test"],
        "mta_sts": {"endpoint": "127.0.0.1:0", **sts}})
    service = mta.service.getServiceNamed("mta-sts")
    await service.listening
    return mta, service.port.getHost().port


@pytest_twisted.ensureDeferred
async def test_policy_served_for_each_domain_over_https(tmp_path) -> None:
    (tmp_path / "domains" / "other.test").mkdir(parents=True)
    sts = {"mode": "enforce", "mx": ["mx.example.test", "*.backup.example.test"], "max_age": 86400,
           **own_certificate(tmp_path, "mta-sts.example.test", "mta-sts.other.test")}
    mta, port = await start(tmp_path, sts)
    try:
        expected = (b"version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\n"
                    b"mx: *.backup.example.test\r\nmax_age: 86400\r\n")
        for host in ("mta-sts.example.test", "mta-sts.other.test"):
            status, ctype, body = await in_thread(fetch, port, host)
            assert (status, ctype, body) == (200, "text/plain", expected)
        # Another path, or a host that is not mta-sts.<one of our domains>: 404.
        status, _, body = await in_thread(fetch, port, "mta-sts.example.test", "/")
        assert (status, body) == (404, b"not found\n")
        status, _, _ = await in_thread(fetch, port, "mta-sts.example.test", "/.well-known/other")
        assert status == 404
        status, _, _ = await in_thread(fetch, port, "www.example.test", POLICY_PATH,
                                       "mta-sts.example.test")
        assert status == 404
        assert policy_id(expected.decode()) == policy_id(policy_text(mta.config.mta_sts,
                                                                     mta.config.hostname))
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_policy_uses_the_tls_certificate_and_hostname_by_default(tmp_path) -> None:
    # No certificate of its own: [tls]'s is used (it names mx.example.test only,
    # so the client checks that name); no mx patterns: the hostname.
    mta, port = await start(tmp_path, {})
    try:
        status, ctype, body = await in_thread(fetch, port, "mta-sts.example.test", POLICY_PATH,
                                              "mx.example.test")
        assert (status, ctype) == (200, "text/plain")
        assert body == (b"version: STSv1\r\nmode: testing\r\nmx: mx.example.test\r\n"
                        b"max_age: 604800\r\n")
        # A reload with another mode serves the new policy at once.
        changed = mta.config.with_overrides(mta_sts=replace(mta.config.mta_sts, mode="enforce"))
        mta.service.loader = lambda: changed
        mta.service.reload()
        _, _, body = await in_thread(fetch, port, "mta-sts.example.test", POLICY_PATH,
                                     "mx.example.test")
        assert body.startswith(b"version: STSv1\r\nmode: enforce\r\n")
    finally:
        await mta.stop()


def test_policy_id_follows_the_contents(tmp_path) -> None:
    a = make_config(tmp_path / "a", extra={"mta_sts": {"mode": "testing"}})
    b = make_config(tmp_path / "b", extra={"mta_sts": {"mode": "enforce"}})
    text_a, text_b = (policy_text(c.mta_sts, c.hostname) for c in (a, b))
    assert policy_id(text_a) != policy_id(text_b)
    assert policy_id(text_a) == policy_id(policy_text(a.mta_sts, a.hostname))
    assert policy_id(text_a).isalnum() and 1 <= len(policy_id(text_a)) <= 32  # RFC 8461 §3.1


@pytest.mark.parametrize(("sts", "key"), [
    ({"mode": "strict"}, "mta_sts.mode"),
    ({"mx": ["not a host"]}, r"mta_sts.mx\[0\]"),
    ({"max_age": 40000000}, "mta_sts.max_age"),
    ({"cert_file": "x.pem"}, "mta_sts.key_file"),
    ({"endpoint": "127.0.0.1:99999"}, "mta_sts.endpoint"),
    ({"colour": "red"}, "mta_sts.colour"),
])
def test_bad_settings_are_refused_at_load(tmp_path, sts, key) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        make_config(tmp_path, extra={"mta_sts": sts})


def test_an_endpoint_needs_a_certificate(tmp_path) -> None:
    with pytest.raises(ConfigError, match="^mta_sts.endpoint: needs a certificate"):
        make_config(tmp_path, tls=False, extra={"mta_sts": {"endpoint": "127.0.0.1:0"}})


def test_an_unreadable_certificate_stops_start_up_and_check_config_names_it(tmp_path) -> None:
    config = make_config(tmp_path, extra={"mta_sts": {
        "endpoint": "127.0.0.1:0", "cert_file": "missing.pem", "key_file": "missing.pem"}})
    with pytest.raises(StartupError, match=r"^mta_sts: .*missing\.pem: No such file"):
        MTAService(config, runner=False)
    assert [p for p in config_problems(config) if p.startswith("mta_sts:")] == [
        f"mta_sts: {tmp_path / 'missing.pem'}: No such file or directory"]
