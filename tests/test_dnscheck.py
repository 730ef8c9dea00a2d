"""``mta dns-check`` against the loopback DNS server (tests/dnsserver.py) serving
right and wrong records: each PASS and FAIL in the text output and in --json."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mta.admin.cli import cmd_dns_check
from mta.policy.dkim import generate_key
from mta.policy.mtasts import policy_id, policy_text
from tests.daemon import free_port
from tests.harness import in_thread, make_config, shared_ca, start_mta

HOST = "mx.example.test"


def tlsa_data(cert_file) -> str:
    """3 1 1 data worked out here (not with the code under test): SHA-256 of the SPKI."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()
PTR = "1.0.0.127.in-addr.arpa"


def settings(tmp_path, dns_server):
    keys = tmp_path / "keys"
    keys.mkdir()
    rsa = generate_key("rsa", keys / "rsa.pem")
    ed = generate_key("ed25519", keys / "ed.pem")
    host, port = dns_server.address
    return {
        "dns": {"servers": [f"{host}:{port}"], "timeout": 2.0},
        "dkim": {"keys": [
            {"domain": "example.test", "selector": "r1", "key_file": str(keys / "rsa.pem")},
            {"domain": "example.test", "selector": "e1", "key_file": str(keys / "ed.pem")}]},
        "mta_sts": {"mode": "enforce"},
    }, rsa, ed


def configure(tmp_path, dns_server):
    extra, rsa, ed = settings(tmp_path, dns_server)
    return make_config(tmp_path, extra=extra), rsa, ed


def args(https_port: int, domain: str | None = None, json: bool = False) -> argparse.Namespace:
    return argparse.Namespace(domain=domain, json=json, https_port=https_port)


async def run(config, capsys, https_port: int = 0) -> tuple[int, str, dict]:
    https_port = https_port or free_port()  # nothing listens: the policy cannot be fetched
    code = await in_thread(cmd_dns_check, config, args(https_port))
    text = capsys.readouterr().out
    json_code = await in_thread(cmd_dns_check, config, args(https_port, json=True))
    data = json.loads(capsys.readouterr().out)
    assert json_code == code
    return code, text, data


def by_record(data: dict) -> dict[tuple[str, str], dict]:
    checks = [c for d in data["domains"] for c in d["checks"]] + data["host"]
    return {(c["record"], c["name"]): c for c in checks}


@pytest_twisted.ensureDeferred
async def test_everything_published_right_passes(tmp_path, dns_server, capsys,
                                                 monkeypatch) -> None:
    # The MTA serves its MTA-STS policy; dns-check fetches it as a sender does,
    # trusting the CA that signed its certificate (as if it were a public one).
    extra, rsa, ed = settings(tmp_path, dns_server)
    cert = shared_ca().issue_cert("mta-sts.example.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "sts.pem"))
    extra["mta_sts"].update(endpoint="127.0.0.1:0", cert_file=str(tmp_path / "sts.pem"),
                            key_file=str(tmp_path / "sts.pem"))
    shared_ca().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    mta = await start_mta(tmp_path, extra=extra)
    try:
        service = mta.service.getServiceNamed("mta-sts")
        await service.listening
        await right_records_pass(mta.config, rsa, ed, dns_server, capsys, service.port.getHost().port)
    finally:
        await mta.stop()


async def right_records_pass(config, rsa, ed, dns_server, capsys, https_port) -> None:
    sts_id = policy_id(policy_text(config.mta_sts, HOST))
    dns_server.load({
        "example.test": {"MX": [(10, HOST)], "TXT": ["v=spf1 mx -all", "google-site-verification=x"]},
        "r1._domainkey.example.test": {"TXT": [rsa]},
        "e1._domainkey.example.test": {"TXT": [ed]},
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.test"]},
        "_mta-sts.example.test": {"TXT": [f"v=STSv1; id={sts_id}"]},
        "mta-sts.example.test": {"CNAME": HOST},
        "_smtp._tls.example.test": {"TXT": ["v=TLSRPTv1; rua=mailto:tls@example.test"]},
        f"_25._tcp.{HOST}": {"TLSA": [(3, 1, 1, tlsa_data(config.tls.cert_file))]},
        HOST: {"A": ["127.0.0.1"]},
        PTR: {"PTR": [HOST]},
    })
    code, text, data = await run(config, capsys, https_port)
    assert code == 0, text
    assert data["ok"] is True
    # The zone lines to paste.
    assert "example.test. 3600 IN MX 10 mx.example.test." in text
    assert 'example.test. 3600 IN TXT "v=spf1 mx -all"' in text
    assert f'_mta-sts.example.test. 3600 IN TXT "v=STSv1; id={sts_id}"' in text
    assert 'e1._domainkey.example.test. 3600 IN TXT "' + ed + '"' in text
    assert 'r1._domainkey.example.test. 3600 IN TXT ( "' in text  # long: split strings
    assert f"_25._tcp.{HOST}. 3600 IN TLSA 3 1 1 {tlsa_data(config.tls.cert_file)}" in text
    assert ";   mode: enforce" in text and ";   mx: mx.example.test" in text
    for record, name in [("MX", "example.test"), ("SPF", "example.test"),
                         ("DKIM", "r1._domainkey.example.test"),
                         ("DKIM", "e1._domainkey.example.test"),
                         ("DMARC", "_dmarc.example.test"), ("MTA-STS", "_mta-sts.example.test"),
                         ("MTA-STS host", "mta-sts.example.test"),
                         ("MTA-STS policy", "mta-sts.example.test"),
                         ("TLS-RPT", "_smtp._tls.example.test"), ("TLSA", f"_25._tcp.{HOST}"),
                         ("FCrDNS", "127.0.0.1"), ("HELO", "127.0.0.1")]:
        assert f"PASS  {record:<12}  {name}: " in text
        assert by_record(data)[(record, name)]["ok"] is True
    assert "FAIL" not in text
    assert "-- 12 passed, 0 failed" in text
    assert data["domains"][0]["mta_sts_policy"] == policy_text(config.mta_sts, HOST)


@pytest_twisted.ensureDeferred
async def test_wrong_records_fail_with_the_fix(tmp_path, dns_server, capsys) -> None:
    config, rsa, ed = configure(tmp_path, dns_server)
    other_key = generate_key("ed25519", tmp_path / "other.pem")
    dns_server.load({
        "example.test": {"MX": [(10, "mail.elsewhere.test")], "TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
        "r1._domainkey.example.test": {"TXT": [other_key]},
        # e1 is not published at all
        "_dmarc.example.test": {"TXT": ["v=DMARC1; p=none"]},
        "_mta-sts.example.test": {"TXT": ["v=STSv1; id=2024old"]},
        "_smtp._tls.example.test": "SERVFAIL",
        f"_25._tcp.{HOST}": {"TLSA": [(3, 1, 1, "00" * 32)]},
        HOST: {"A": ["127.0.0.1"]},
        PTR: {"PTR": ["host-1.isp.test"]},
        "host-1.isp.test": {"A": ["192.0.2.77"]},
    })
    code, text, data = await run(config, capsys)
    assert code == 1
    assert data["ok"] is False
    checks = by_record(data)
    expected = {
        ("MX", "example.test"): ("MX is 10 mail.elsewhere.test, not mx.example.test",
                                 "publish example.test. 3600 IN MX 10 mx.example.test."),
        ("SPF", "example.test"): ("gives fail for 127.0.0.1", "allow 127.0.0.1"),
        ("DKIM", "r1._domainkey.example.test"): ("a different public key",
                                                 "publish r1._domainkey.example.test. 3600 IN TXT"),
        ("DKIM", "e1._domainkey.example.test"): ("no such name",
                                                 'publish e1._domainkey.example.test. 3600 IN '
                                                 f'TXT "{ed}"'),
        ("DMARC", "_dmarc.example.test"): ("has no rua=mailto:",
                                           'publish _dmarc.example.test. 3600 IN TXT "v=DMARC1; '
                                           'p=none; rua=mailto:postmaster@example.test"'),
        ("MTA-STS", "_mta-sts.example.test"): ("id=2024old, but the policy's is "
                                               + policy_id(policy_text(config.mta_sts, HOST)),
                                               "publish _mta-sts.example.test. 3600 IN TXT"),
        ("MTA-STS host", "mta-sts.example.test"): ("no address",
                                                   "mta-sts.example.test. 3600 IN CNAME "
                                                   "mx.example.test."),
        ("MTA-STS policy", "mta-sts.example.test"): (
            "cannot fetch https://mta-sts.example.test/.well-known/mta-sts.txt: no address",
            "serve it: [mta_sts] endpoint"),
        ("TLS-RPT", "_smtp._tls.example.test"): ("DNS error: server failure", "could not ask DNS"),
        ("TLSA", f"_25._tcp.{HOST}"): ("other TLSA data", f"publish _25._tcp.{HOST}. 3600 IN "
                                       f"TLSA 3 1 1 {tlsa_data(config.tls.cert_file)}"),
        ("FCrDNS", "127.0.0.1"): ("PTR host-1.isp.test does not resolve back to 127.0.0.1",
                                  "point the PTR at mx.example.test"),
        ("HELO", "127.0.0.1"): ("EHLO name mx.example.test is not the confirmed PTR name",
                                "set the PTR of 127.0.0.1 to mx.example.test"),
    }
    for (record, name), (detail, fix) in expected.items():
        check = checks[(record, name)]
        assert check["ok"] is False, check
        assert detail in check["detail"], check
        assert fix in check["fix"], check
        line = f"FAIL  {record:<12}  {name}: "
        assert line in text
        after = text[text.index(line):].splitlines()
        assert detail in after[0] and after[1].startswith("      fix: ") and fix in after[1]
    assert "PASS" not in text
    assert "-- 0 passed, 12 failed" in text


@pytest_twisted.ensureDeferred
async def test_a_missing_ptr_and_one_domain_only(tmp_path, dns_server, capsys) -> None:
    config, _rsa, _ed = configure(tmp_path, dns_server)
    dns_server.load({"example.test": {"MX": [(10, HOST)]}, HOST: {"A": ["127.0.0.1"]},
                     "mta-sts.example.test": {"A": ["127.0.0.1"]}})
    # The policy host has an address, but nothing serves HTTPS there.
    code = await in_thread(cmd_dns_check, config, args(free_port(), "Example.Test", json=True))
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    checks = by_record(data)
    assert checks[("MX", "example.test")]["ok"] is True
    assert checks[("SPF", "example.test")]["detail"] == "no v=spf1 record"
    assert checks[("FCrDNS", "127.0.0.1")]["detail"] == "no PTR for 127.0.0.1"
    assert "127.0.0.1: Connection refused" in checks[("MTA-STS policy", "mta-sts.example.test")]["detail"]
    assert [d["domain"] for d in data["domains"]] == ["example.test"]


@pytest_twisted.ensureDeferred
async def test_a_policy_host_with_the_wrong_certificate_fails(tmp_path, dns_server, capsys,
                                                              monkeypatch) -> None:
    # Served with [tls]'s certificate, which names mx.example.test only.
    extra, _rsa, _ed = settings(tmp_path, dns_server)
    extra["mta_sts"]["endpoint"] = "127.0.0.1:0"
    shared_ca().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    mta = await start_mta(tmp_path, extra=extra)
    try:
        service = mta.service.getServiceNamed("mta-sts")
        await service.listening
        dns_server.load({"mta-sts.example.test": {"A": ["127.0.0.1"]}})
        code = await in_thread(cmd_dns_check, mta.config,
                               args(service.port.getHost().port, json=True))
        check = by_record(json.loads(capsys.readouterr().out))[("MTA-STS policy",
                                                                 "mta-sts.example.test")]
        assert code == 1 and check["ok"] is False
        assert check["detail"].startswith("127.0.0.1: certificate not valid for "
                                          "mta-sts.example.test: "), check["detail"]
        assert "Hostname mismatch" in check["detail"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_the_configured_source_addresses_and_helo_name(tmp_path, dns_server, capsys) -> None:
    # Mail leaves from delivery.bind_address / bind_address6 with EHLO delivery.helo_name
    # (issue 18), not from the host name's address: SPF, FCrDNS and HELO are of those.
    extra, _rsa, _ed = settings(tmp_path, dns_server)
    extra["delivery"] = {"bind_address": "127.0.0.5", "bind_address6": "::1",
                         "helo_name": "out.example.test"}
    config = make_config(tmp_path, extra=extra)
    records = {
        "example.test": {"MX": [(10, HOST)], "TXT": ["v=spf1 mx -all"]},
        HOST: {"A": ["127.0.0.1"]},  # the MX (and the SPF "mx"): not where mail leaves from
        "5.0.0.127.in-addr.arpa": {"PTR": ["out.example.test"]},
        "out.example.test": {"A": ["127.0.0.5"], "AAAA": ["::1"]},
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa":
            {"PTR": [HOST]},  # the IPv6 address's PTR names the host, which has no AAAA
    }
    dns_server.load(records)
    code, text, data = await run(config, capsys)
    checks = by_record(data)
    assert code == 1
    spf = checks[("SPF", "example.test")]
    assert spf["ok"] is False
    assert spf["detail"] == "'v=spf1 mx -all' gives fail for 127.0.0.5, fail for ::1"
    assert 'example.test. 3600 IN TXT "v=spf1 ip4:127.0.0.5 ip6:::1 mx -all"' in text
    assert checks[("FCrDNS", "127.0.0.5")]["ok"] is True
    assert checks[("HELO", "127.0.0.5")]["ok"] is True
    assert checks[("HELO", "127.0.0.5")]["detail"] == ("EHLO name out.example.test is the "
                                                       "confirmed PTR name of 127.0.0.5")
    assert checks[("FCrDNS", "::1")]["detail"] == f"PTR {HOST} does not resolve back to ::1"
    assert checks[("HELO", "::1")]["fix"] == ("set the PTR of ::1 to out.example.test (or "
                                              "delivery.helo_name to its name)")
    assert ("FCrDNS", "127.0.0.1") not in checks  # the host name's address sends nothing

    # Published as suggested: SPF passes for both source addresses.
    records["example.test"]["TXT"] = ["v=spf1 ip4:127.0.0.5 ip6:::1 mx -all"]
    records["1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"] = \
        {"PTR": ["out.example.test"]}
    dns_server.load(records)
    code, text, data = await run(config, capsys)
    checks = by_record(data)
    assert checks[("SPF", "example.test")]["ok"] is True, checks[("SPF", "example.test")]
    assert checks[("SPF", "example.test")]["detail"].endswith("pass for 127.0.0.5, ::1")
    assert all(checks[(r, ip)]["ok"] for r in ("FCrDNS", "HELO") for ip in ("127.0.0.5", "::1"))


def served_certificate(port: int, server_name: str) -> bytes:
    """The certificate (DER) the MX listener presents after STARTTLS to a client
    asking for ``server_name`` by SNI, as a DANE client does (RFC 7672 §8.1)."""
    import smtplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only looking
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s._host = server_name  # smtplib sends its connect host as the SNI name
        s.starttls(context=context)
        return s.sock.getpeercert(binary_form=True)


def spki_sha256(der: bytes) -> str:
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest_twisted.ensureDeferred
async def test_tlsa_of_the_cert_dir_certificate_served_for_the_mx_name(tmp_path, dns_server,
                                                                      capsys) -> None:
    # tls.cert_dir holds a certificate (another key) for the MX name: the listener
    # serves it to clients asking for mx.example.test, so that is the one for TLSA.
    extra, _rsa, _ed = settings(tmp_path, dns_server)
    by_name = tmp_path / "certs" / HOST.upper()  # directory names match in any case
    by_name.mkdir(parents=True)
    cert = shared_ca().issue_cert(HOST)
    cert.cert_chain_pems[0].write_to_path(str(by_name / "fullchain.pem"))
    cert.private_key_pem.write_to_path(str(by_name / "privkey.pem"))
    (tmp_path / "certs" / "other.example.test").mkdir()  # (no certificate in it)
    extra["tls"] = {"cert_dir": str(tmp_path / "certs")}
    mta = await start_mta(tmp_path, extra=extra)
    try:
        served = await in_thread(served_certificate, mta.port("mx"), HOST)
        default = await in_thread(served_certificate, mta.port("mx"), "localhost")
    finally:
        await mta.stop()
    assert spki_sha256(served) == tlsa_data(by_name / "fullchain.pem")
    assert spki_sha256(default) == tlsa_data(mta.config.tls.cert_file) != spki_sha256(served)
    name = f"_25._tcp.{HOST}"
    # Published: the default certificate's TLSA, which no DANE client is shown.
    dns_server.load({name: {"TLSA": [(3, 1, 1, spki_sha256(default))]}})
    code, text, data = await run(mta.config, capsys)
    check = by_record(data)[("TLSA", name)]
    assert check["ok"] is False
    assert check["detail"] == (f"the TLSA of tls.cert_file ({mta.config.tls.cert_file}), but a "
                               f"DANE client, which asks for {HOST} by SNI (RFC 7672 §8.1), "
                               f"is served {by_name / 'fullchain.pem'}")
    assert f"{name}. 3600 IN TLSA 3 1 1 {spki_sha256(served)}" in text
    # Published as shown: passes, naming the certificate.
    dns_server.load({name: {"TLSA": [(3, 1, 1, spki_sha256(served))]}})
    code, text, data = await run(mta.config, capsys)
    check = by_record(data)[("TLSA", name)]
    assert check["ok"] is True, check
    assert check["detail"] == (f"3 1 1 of {by_name / 'fullchain.pem'} (tls.cert_dir, served "
                               f"for {HOST} by SNI)")
