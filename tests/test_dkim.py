"""DKIM signing, verification and key generation (mta.policy.dkim).

Keys are generated into tmp_path; the public keys are served by the loopback
DNS server and fetched with the same dnspython lookup the MTA uses, so every
round trip goes through real DNS over UDP/TCP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import subprocess
from pathlib import Path

import dkim as dkimpy
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import Deferred

from mta.policy.dkim import (
    DKIMKeyError,
    DKIMResult,
    DKIMSigner,
    DKIMSignError,
    DNSTempError,
    dns_record_name,
    generate_key,
    load_signing_key,
    make_dns_txt,
    verify,
)

DOMAIN = "example.test"

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Cc: carol@remote.test\r\n"
    b"Subject: DKIM round trip\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Id: <team.example.test>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"this  line has  double spaces and trailing space \r\n"
    b"-- \r\n"
    b"Alice\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One RSA-2048 and one Ed25519 key, generated once: {selector: (path, TXT value)}."""
    d = tmp_path_factory.mktemp("keys")
    return {
        "rsa1": (d / "rsa1.pem", generate_key("rsa", d / "rsa1.pem")),
        "ed1": (d / "ed1.pem", generate_key("ed25519", d / "ed1.pem")),
    }


@pytest.fixture
def signer(keys) -> DKIMSigner:
    return DKIMSigner({DOMAIN: [(sel, path) for sel, (path, _) in keys.items()]})


@pytest.fixture
def dns(dns_server, keys):
    """The loopback DNS server publishing both keys, and a TXT lookup pointed at it."""
    for selector, (_path, record) in keys.items():
        dns_server.set(dns_record_name(selector, DOMAIN), "TXT", record)
    return dns_server, make_dns_txt(dns_server.dns_config(timeout=1.0))


def check(message: bytes, dns_txt) -> Deferred[list[DKIMResult]]:
    return Deferred.fromCoroutine(verify(message, dns_txt))


def signed(signer: DKIMSigner, message: bytes = MESSAGE) -> bytes:
    return b"".join(h + b"\r\n" for h in signer.sign(message, DOMAIN)) + message


def tags(header: bytes) -> dict[str, str]:
    value = header.split(b":", 1)[1].decode()
    value = re.sub(r"\s+", "", value)
    return dict(part.split("=", 1) for part in value.split(";") if part)


# --- signing ------------------------------------------------------------------------


def test_one_signature_per_key_with_the_chosen_fields(signer):
    headers = signer.sign(MESSAGE, DOMAIN)
    assert len(headers) == 2
    by_selector = {tags(h)["s"]: tags(h) for h in headers}
    assert by_selector["rsa1"]["a"] == "rsa-sha256"
    assert by_selector["ed1"]["a"] == "ed25519-sha256"
    for t in by_selector.values():
        assert t["d"] == DOMAIN
        assert t["c"] == "relaxed/relaxed"
        assert t["h"].split(":") == [
            "from", "to", "cc", "subject", "date", "message-id", "mime-version",
            "content-type", "list-id", "from",  # From oversigned; X-Mailer not signed
        ]
    for h in headers:
        assert h.startswith(b"DKIM-Signature: ")
        assert not h.endswith(b"\r\n")
        assert all(len(line) <= 78 for line in h.split(b"\r\n"))
        assert all(line[:1] == b" " for line in h.split(b"\r\n")[1:])


def test_unknown_domain_gives_no_signature(signer):
    assert signer.sign(MESSAGE, "other.test") == []


def test_message_without_from_cannot_be_signed(signer):
    with pytest.raises(DKIMSignError, match="From"):
        signer.sign(b"To: bob@remote.test\r\nSubject: x\r\n\r\nbody\r\n", DOMAIN)


def test_signing_domain_is_the_from_domain_or_a_parent(signer):
    assert signer.signing_domain("example.test") == DOMAIN
    assert signer.signing_domain("Mail.Example.TEST") == DOMAIN
    assert signer.signing_domain("example.org") is None
    assert signer.signing_domain("test") is None


# --- round trips through the loopback DNS ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rsa_and_ed25519_signatures_verify(signer, dns):
    server, dns_txt = dns
    message = signed(signer)
    results = await check(message, dns_txt)
    assert [(r.result, r.selector, r.domain, r.algorithm) for r in results] == [
        ("pass", "rsa1", DOMAIN, "rsa-sha256"),
        ("pass", "ed1", DOMAIN, "ed25519-sha256"),
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9+/=]{8}", r.header_b) for r in results)
    assert server.asked("rsa1._domainkey.example.test", "TXT") == 1
    assert server.asked("ed1._domainkey.example.test", "TXT") == 1


@pytest_twisted.ensureDeferred
async def test_signatures_fit_998_octet_lines_with_an_overlong_list_field(signer, dns):
    """A List-* field name too long for h= is not signed (h= cannot be cut), so every
    line of the signature stays within RFC 5322's limit, and it still verifies."""
    _server, dns_txt = dns
    name = b"List-" + b"x" * 990
    message = MESSAGE.replace(b"X-Mailer: test\r\n", b"X-Mailer: test\r\n" + name + b": v\r\n")
    headers = signer.sign(message, DOMAIN)
    assert headers and all(len(line) <= 78 for h in headers for line in h.split(b"\r\n"))
    assert all(name.lower() not in h.lower() for h in headers)
    assert all(b"list-id" in h.lower() for h in headers)
    results = await check(b"".join(h + b"\r\n" for h in headers) + message, dns_txt)
    assert [r.result for r in results] == ["pass", "pass"]


@pytest_twisted.ensureDeferred
async def test_header_b_is_the_start_of_each_signature(signer, dns):
    _server, dns_txt = dns
    sig_headers = signer.sign(MESSAGE, DOMAIN)
    message = b"".join(h + b"\r\n" for h in sig_headers) + MESSAGE
    results = await check(message, dns_txt)
    assert [r.header_b for r in results] == [tags(h)["b"][:8] for h in sig_headers]


@pytest_twisted.ensureDeferred
async def test_our_trace_fields_on_top_do_not_matter(signer, dns):
    _server, dns_txt = dns
    message = (b"Received: from client (client [127.0.0.1])\r\n\tby mx.example.test; now\r\n"
               b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=a@example.test\r\n"
               + signed(signer))
    assert {r.result for r in await check(message, dns_txt)} == {"pass"}


@pytest_twisted.ensureDeferred
async def test_modified_body_fails(signer, dns):
    _server, dns_txt = dns
    message = signed(signer).replace(b"Hello Bob", b"Hello Eve")
    results = await check(message, dns_txt)
    assert [r.result for r in results] == ["fail", "fail"]
    assert all("body hash" in r.reason for r in results)


@pytest_twisted.ensureDeferred
async def test_relaxed_canonicalisation_tolerates_whitespace_changes(signer, dns):
    _server, dns_txt = dns
    message = signed(signer).replace(b"double spaces", b"double \t spaces")
    message = message.replace(b"Subject: DKIM", b"Subject:   DKIM")
    assert [r.result for r in await check(message, dns_txt)] == ["pass", "pass"]


@pytest_twisted.ensureDeferred
async def test_modified_signed_header_fails(signer, dns):
    _server, dns_txt = dns
    message = signed(signer).replace(b"Subject: DKIM round trip", b"Subject: Pay now")
    results = await check(message, dns_txt)
    assert [r.result for r in results] == ["fail", "fail"]
    assert all(r.reason == "signature did not verify" for r in results)


@pytest_twisted.ensureDeferred
async def test_added_from_field_breaks_the_oversigned_signature(signer, dns):
    _server, dns_txt = dns
    message = signed(signer).replace(b"To: bob", b"From: Mallory <m@evil.test>\r\nTo: bob", 1)
    assert [r.result for r in await check(message, dns_txt)] == ["fail", "fail"]


@pytest_twisted.ensureDeferred
async def test_unsigned_message_is_none(dns):
    server, dns_txt = dns
    assert await check(MESSAGE, dns_txt) == [DKIMResult("none", reason="message not signed")]
    assert server.queries == []


@pytest_twisted.ensureDeferred
async def test_missing_key_is_permerror(signer, dns):
    server, dns_txt = dns
    server.remove("ed1._domainkey.example.test")
    results = await check(signed(signer), dns_txt)
    assert [r.result for r in results] == ["pass", "permerror"]
    assert "no key" in results[1].reason


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_temperror(signer, dns):
    server, dns_txt = dns
    server.servfail("rsa1._domainkey.example.test")
    results = await check(signed(signer), dns_txt)
    assert [r.result for r in results] == ["temperror", "pass"]


@pytest_twisted.ensureDeferred
async def test_revoked_or_garbled_key_is_permerror(signer, dns):
    server, dns_txt = dns
    server.set("rsa1._domainkey.example.test", "TXT", "v=DKIM1; k=rsa; p=")  # revoked
    server.set("ed1._domainkey.example.test", "TXT", "v=DKIM1; k=ed25519; p=!!notbase64")
    results = await check(signed(signer), dns_txt)
    assert [r.result for r in results] == ["permerror", "permerror"]
    assert all("bad key record" in r.reason for r in results)


@pytest_twisted.ensureDeferred
async def test_key_of_the_wrong_domain_fails(signer, dns, keys):
    server, dns_txt = dns
    # The Ed25519 selector publishes the RSA key: the signature cannot verify.
    server.set("ed1._domainkey.example.test", "TXT", keys["rsa1"][1])
    results = await check(signed(signer), dns_txt)
    assert [r.result for r in results] == ["pass", "fail"]


@pytest_twisted.ensureDeferred
async def test_malformed_signature_is_neutral_without_dns(dns):
    server, dns_txt = dns
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa1; h=from\r\n" + MESSAGE
    results = await check(message, dns_txt)
    assert [r.result for r in results] == ["neutral"]
    assert "missing" in results[0].reason
    assert server.queries == []


@pytest_twisted.ensureDeferred
async def test_rsa_sha1_is_not_accepted(keys, dns):
    server, dns_txt = dns
    private = keys["rsa1"][0].read_bytes()  # PKCS#8 PEM, which dkimpy reads too
    header = dkimpy.sign(MESSAGE, b"rsa1", DOMAIN.encode(), private,
                         signature_algorithm=b"rsa-sha1")
    results = await check(header + MESSAGE, dns_txt)
    assert [r.result for r in results] == ["permerror"]
    assert "RFC 8301" in results[0].reason
    assert server.queries == []


@pytest_twisted.ensureDeferred
async def test_bad_selector_is_not_looked_up(dns):
    server, dns_txt = dns
    message = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=a b; h=from; bh=AAAA;"
               b" b=AAAA\r\n" + MESSAGE)
    results = await check(message, dns_txt)
    assert [r.result for r in results] == ["permerror"]
    assert server.queries == []


@pytest_twisted.ensureDeferred
async def test_number_of_signatures_evaluated_is_bounded(signer, dns):
    server, dns_txt = dns
    one = signer.sign(MESSAGE, DOMAIN)[1]
    message = (one + b"\r\n") * 25 + MESSAGE
    results = await Deferred.fromCoroutine(verify(message, dns_txt, max_signatures=10))
    assert [r.result for r in results] == ["pass"] * 10
    assert server.asked("ed1._domainkey.example.test", "TXT") == 1


@pytest_twisted.ensureDeferred
async def test_make_dns_txt_answers(dns_server):
    dns_server.load({
        "two.example.test": {"TXT": [("part one ", "part two"), "other"]},
        "broken.example.test": "SERVFAIL",
    })
    dns_txt = make_dns_txt(dns_server.dns_config(timeout=1.0))
    assert sorted(await dns_txt("two.example.test")) == [b"other", b"part one part two"]
    assert await dns_txt("missing.example.test") == []
    with pytest.raises(DNSTempError):
        await dns_txt("broken.example.test")


# --- keys ---------------------------------------------------------------------------


def test_generated_keys_are_private_pkcs8_and_match_their_records(tmp_path):
    for kind, cls in (("rsa", rsa.RSAPrivateKey), ("ed25519", ed25519.Ed25519PrivateKey)):
        path = tmp_path / f"{kind}.pem"
        record = generate_key(kind, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(data, password=None)
        assert isinstance(key, cls)
        assert record.startswith(f"v=DKIM1; k={kind}; p=")
        public = base64.b64decode(record.split("p=", 1)[1])
        if kind == "rsa":
            assert key.key_size == 2048
            assert public == key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        else:
            assert len(public) == 32
    assert sorted(os.listdir(tmp_path)) == ["ed25519.pem", "rsa.pem"]  # no temporary left


def test_generate_key_never_replaces_a_key(tmp_path):
    path = tmp_path / "k.pem"
    generate_key("ed25519", path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key("ed25519", path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["k.pem"]
    with pytest.raises(ValueError, match="rsa, ed25519"):
        generate_key("dsa", tmp_path / "other.pem")


def test_dns_record_name():
    assert dns_record_name("sel2026", "Example.TEST.") == "sel2026._domainkey.example.test"
    assert dns_record_name("s", "bücher.test") == "s._domainkey.xn--bcher-kva.test"


def _probable_prime(bits: int) -> int:
    """A random prime (Miller-Rabin, 32 rounds): cryptography refuses to make small keys."""
    while True:
        n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(32):
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break
        else:
            return n


def small_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    e = 65537
    while True:
        p, q = _probable_prime(bits // 2), _probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q))
    return numbers.private_key()


def test_key_formats(tmp_path):
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    assert load_signing_key(DOMAIN, "a", pkcs1).algorithm == b"rsa-sha256"
    seed = tmp_path / "seed.key"  # what dkimpy's dknewkey writes for Ed25519
    seed.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    assert load_signing_key(DOMAIN, "b", seed).algorithm == b"ed25519-sha256"
    small = tmp_path / "small.pem"
    small.write_bytes(small_rsa_key(512).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(DKIMKeyError, match="RFC 8301"):
        load_signing_key(DOMAIN, "c", small)
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key")
    with pytest.raises(DKIMKeyError, match="garbage"):
        DKIMSigner({DOMAIN: [("d", garbage)]})
    with pytest.raises(DKIMKeyError, match="cannot read"):
        load_signing_key(DOMAIN, "e", tmp_path / "missing.pem")
    with pytest.raises(DKIMKeyError, match="selector"):
        load_signing_key(DOMAIN, "bad selector", pkcs1)
    assert "PRIVATE" not in repr(load_signing_key(DOMAIN, "a", pkcs1))


# --- interoperability: dkimpy's pure-Python code and OpenDKIM ------------------------


def _dkimpy_dnsfunc(keys):
    records = {dns_record_name(sel, DOMAIN): record.encode() for sel, (_p, record) in keys.items()}

    def dnsfunc(name, timeout=5):
        return records.get((name.decode() if isinstance(name, bytes) else name).rstrip("."))
    return dnsfunc


def test_our_signatures_verify_with_dkimpy_itself(signer, keys):
    """dkimpy's own verifier (its pure-Python RSA, PyNaCl for Ed25519) accepts
    both signatures made through OpenSSL, and refuses them on a changed body."""
    message = signed(signer)
    dnsfunc = _dkimpy_dnsfunc(keys)
    verifier = dkimpy.DKIM(message)
    assert [verifier.verify(idx=i, dnsfunc=dnsfunc) for i in (0, 1)] == [True, True]
    tampered = dkimpy.DKIM(message.replace(b"Hello Bob", b"Hello Eve"))
    for i in (0, 1):
        with pytest.raises(dkimpy.ValidationError, match="body hash mismatch"):
            tampered.verify(idx=i, dnsfunc=dnsfunc)
    # A changed signed header field: the body hash holds, the signature does not.
    forged = dkimpy.DKIM(message.replace(b"Subject: DKIM round trip", b"Subject: forged"))
    assert [forged.verify(idx=i, dnsfunc=dnsfunc) for i in (0, 1)] == [False, False]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("selector", ["rsa1", "ed1"])
async def test_dkimpy_signatures_verify_with_ours(keys, dns, selector):
    """A signature made by dkimpy's own code (pure-Python RSA, PyNaCl Ed25519)
    passes our OpenSSL verification; the same message changed fails."""
    _server, dns_txt = dns
    path = keys[selector][0]
    if selector == "rsa1":
        private, algorithm = path.read_bytes(), b"rsa-sha256"  # PKCS#8 PEM: dkimpy reads it
    else:
        raw = serialization.load_pem_private_key(path.read_bytes(), None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        private, algorithm = base64.b64encode(raw), b"ed25519-sha256"
    header = dkimpy.sign(MESSAGE, selector.encode(), DOMAIN.encode(), private,
                         signature_algorithm=algorithm, canonicalize=(b"relaxed", b"simple"),
                         include_headers=[b"from", b"to", b"subject", b"date"])
    results = await check(header + MESSAGE, dns_txt)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", selector, algorithm.decode())]
    results = await check(header + MESSAGE.replace(b"Alice\r\n", b"Mallory\r\n"), dns_txt)
    assert [(r.result, r.reason) for r in results] == [("fail", "body hash did not verify")]
    results = await check(header + MESSAGE.replace(b"To: bob@", b"To: eve@"), dns_txt)
    assert [(r.result, r.reason) for r in results] == [("fail", "signature did not verify")]


def _opendkim(tmp_path: Path, keys, message: bytes) -> str:
    """OpenDKIM's verdict (its Authentication-Results value) on ``message``.

    ``opendkim -t`` verifies a file through libopendkim and prints the field it
    would add; the key records are the very TXT values the loopback DNS
    serves in the other tests (OpenDKIM's resolver cannot be pointed at a
    server on another port than 53, so they reach it as its TestDNSData).
    """
    data = tmp_path / "keys"
    data.write_text("".join(f"{dns_record_name(sel, DOMAIN)} {record}\n"
                            for sel, (_path, record) in keys.items()))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestDNSData file:{data}\n")
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    proc = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(path)],
                          capture_output=True, timeout=30, check=True,
                          env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"})
    found = re.search(r"hname='Authentication-Results' hvalue='([^']*)'", proc.stdout.decode())
    assert found, proc.stdout
    return " ".join(found.group(1).split())


def test_our_signatures_verify_with_opendkim(signer, keys, tmp_path):
    message = signed(signer)
    verdict = _opendkim(tmp_path, keys, message)
    assert "dkim=pass (2048-bit key) header.d=example.test header.i=@example.test " \
           "header.a=rsa-sha256 header.s=rsa1" in verdict
    assert "dkim=pass header.d=example.test header.i=@example.test " \
           "header.a=ed25519-sha256 header.s=ed1" in verdict
    verdict = _opendkim(tmp_path, keys, message.replace(b"Hello Bob", b"Hello Eve"))
    assert verdict.count('dkim=fail reason="signature verification failed"') == 2, verdict
    assert "dkim=pass" not in verdict
