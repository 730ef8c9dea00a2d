"""DKIM (RFC 6376): signing outgoing mail, verifying incoming mail, making keys.

dkimpy (module ``dkim``) parses the message and the tag lists and does the
canonicalisation and hashing (RFC 6376 §3.4, §3.7); the signatures themselves
(RSASSA-PKCS1-v1_5 with SHA-256, RFC 8017 §8.2; Ed25519, RFC 8463 §3) are made
and checked by OpenSSL through ``cryptography`` (see :func:`_sign_one` and
:func:`_verify_one`: dkimpy's own RSA is pure Python, about ten times slower).
This module chooses what to sign, where keys come from and how results are named.

Signing (:class:`DKIMSigner`)
    A per-domain key table ``{domain: [(selector, key_path), ...]}``.  Every
    key of the domain signs once, so a domain with one RSA and one Ed25519 key
    gets two DKIM-Signature fields (RFC 8463 §5 recommends this while
    verifiers learn Ed25519).  Canonicalisation is relaxed/relaxed; the signed
    fields are the ones in :data:`SIGNED_FIELDS` (and every ``List-*``) that
    the message has, each instance once, plus From once more ("oversigning",
    RFC 6376 §8.15: a From added later breaks the signature).

    Keys are PEM files: RSA (PKCS#1 or PKCS#8, at least 1024 bits, RFC 8301
    §3.2) or Ed25519 (PKCS#8, as ``openssl genpkey -algorithm ed25519``
    writes); the base64 seed that dkimpy's ``dknewkey`` writes is accepted
    too.  They are read once, when the signer is built.

    Signing is CPU work in the calling thread (about a millisecond for an
    RSA-2048 signature through OpenSSL; bench/dkim_micro.py measures it): run it with ``deferToThread``.

Verification (:func:`verify`)
    Every DKIM-Signature field is evaluated (up to ``max_signatures``).  The
    key records are fetched first, concurrently, with the asynchronous
    ``dns_txt`` function (see :func:`make_dns_txt`); then the signatures are
    checked in a worker thread (``deferToThread``, injectable) against what
    was fetched, so the thread never waits on the network and a DNS failure is
    known for what it is.  Results follow
    RFC 8601 §2.7.1: ``pass``, ``fail`` (the signature or body hash does not
    match), ``neutral`` (the signature field is malformed or unusable),
    ``temperror`` (the key could not be fetched), ``permerror`` (no key, a bad
    key record, a key too small, rsa-sha1 which RFC 8301 §3.1 forbids
    accepting) and ``none`` (the message has no signature).

Key generation (:func:`generate_key`) writes a new private key (mode 0600,
atomically, never over an existing file) and returns the TXT record value to
publish at :func:`dns_record_name`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mta.config import DNSConfig
from mta.mail.address import AddressError, normalize_domain
from mta.mail.headers import fold_header_bytes
from mta.policy.spf import make_dns_lookup
from mta.system.dns import RESOLV_CONF

log = Logger()

RESULTS = ("pass", "fail", "neutral", "temperror", "permerror", "none")
KEY_KINDS = ("rsa", "ed25519")
RSA_BITS = 2048  # RFC 8301 §3.2: signers SHOULD use at least 2048 bits
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: smaller keys MUST NOT be used or accepted
MAX_SIGNATURES = 10  # evaluated per message; more is a cheap denial of service

# The fields worth signing (RFC 6376 §5.4.1), lower case; every List-* too.
SIGNED_FIELDS = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
    b"references",
)
OVERSIGNED_FIELDS = (b"from",)

# An asynchronous TXT lookup: each record's character-strings joined; [] for
# NXDOMAIN or no TXT data; fails with DNSTempError when DNS could not answer.
TXTLookup = Callable[[str], Deferred[list[bytes]]]


class DKIMKeyError(Exception):
    """A key file is missing, unreadable or not a usable DKIM key."""


class DKIMSignError(Exception):
    """The message cannot be signed (no From field, unparsable header section)."""


class DNSTempError(Exception):
    """A DNS lookup could not be completed (timeout, SERVFAIL): try again later."""


# --- keys ------------------------------------------------------------------------


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    """One loaded key, as OpenSSL (``cryptography``) signs with it."""

    domain: str  # d=, A-labels
    selector: str  # s=
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: PrivateKey = field(repr=False)


def _parse_key(data: bytes, path: Path) -> tuple[bytes, PrivateKey]:
    """(algorithm, private key) from a key file's contents."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise DKIMKeyError(f"{path}: not a readable PEM private key: {e}") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise DKIMKeyError(f"{path}: RSA key of {key.key_size} bits; at least "
                                   f"{MIN_RSA_BITS} are needed (RFC 8301 §3.2)")
            return b"rsa-sha256", key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return b"ed25519-sha256", key
        raise DKIMKeyError(f"{path}: only RSA and Ed25519 keys can sign DKIM")
    # dkimpy's dknewkey writes an Ed25519 key as the base64 of its 32-byte seed.
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise DKIMKeyError(f"{path}: neither a PEM private key nor a base64 Ed25519 seed")
    return b"ed25519-sha256", ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def load_signing_key(domain: str, selector: str, path: Path | str | bytes) -> SigningKey:
    """Read one key file (or, given bytes, the PEM itself: an SQL directory's
    ``dkim_keys.private_key``). Raises :class:`DKIMKeyError`."""
    pem = path if isinstance(path, bytes) else None
    path = Path(f"<dkim_keys {selector}._domainkey.{domain}>" if pem is not None else path)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*", selector):
        raise DKIMKeyError(f"{path}: selector {selector!r} is not a DNS label sequence")
    try:
        d = normalize_domain(domain)
    except AddressError as e:
        raise DKIMKeyError(f"{path}: bad signing domain {domain!r}: {e}") from None
    try:
        data = pem if pem is not None else path.read_bytes()
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror or e}") from None
    algorithm, private = _parse_key(data, path)
    return SigningKey(d, selector, algorithm, private)


def dns_record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 §3.6.2.1)."""
    return f"{selector}._domainkey.{normalize_domain(domain)}"


def _public_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        # RFC 6376 §3.6.1: p= is the base64 of the DER SubjectPublicKeyInfo.
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    # RFC 8463 §4.2: p= is the base64 of the raw 32-octet public key.
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def public_record(path: Path | str) -> str:
    """The TXT record value (``v=DKIM1; k=...; p=...``) of the key in a private key
    file (PEM RSA or Ed25519, or dkimpy's base64 Ed25519 seed). Raises DKIMKeyError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror or e}") from None
    _algorithm, private = _parse_key(data, path)
    return _public_record(private)


def generate_key(kind: str, key_path: Path) -> str:
    """Make a new key, write it to ``key_path`` and return its TXT record value.

    ``kind`` is ``"rsa"`` (2048 bits) or ``"ed25519"``.  The file is PKCS#8
    PEM, mode 0600, written in the same directory and linked into place, so it
    appears whole or not at all; an existing file is never replaced
    (``FileExistsError``).  An RSA record is longer than 255 octets: DNS
    software splits it into several character-strings of one TXT record.
    """
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"key kind must be one of {', '.join(KEY_KINDS)}, not {kind!r}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new_file(Path(key_path), pem)
    return _public_record(key)


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file, mode 0600: temporary file, fsync, link, dir fsync."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)  # fails with FileExistsError instead of replacing a key
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- signing ---------------------------------------------------------------------


MAX_LIST_NAME = 64


def _fields_to_sign(names: Iterable[bytes]) -> list[bytes]:
    """h= for a message whose header field names are ``names`` (in order)."""
    present = [n.lower() for n in names]
    # A List-* name longer than any registered one (RFC 2369, RFC 2919) is left
    # out: h= cannot be cut to fit a line (RFC 5322 §2.1.1) without breaking it.
    chosen = [n for n in present if n in SIGNED_FIELDS or (n.startswith(b"list-") and len(n) <= MAX_LIST_NAME)]
    return chosen + [n for n in OVERSIGNED_FIELDS if n in present]


class DKIMSigner:
    """Signs messages with every key configured for a domain.

    ``keys`` is ``{domain: [(selector, key_path), ...]}``; the files are read
    here (:class:`DKIMKeyError` names the one that is wrong).  ``clock``
    gives t= (RFC 6376 §3.5), in seconds since the epoch.
    """

    def __init__(self, keys: Mapping[str, Sequence[tuple[str, Path | str]]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, list[SigningKey]] = {}
        for domain, entries in keys.items():
            for selector, path in entries:
                key = load_signing_key(domain, selector, path)
                self._keys.setdefault(key.domain, []).append(key)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._keys)

    def keys(self, domain: str) -> list[SigningKey]:
        return list(self._keys.get(_lower_domain(domain), ()))

    def signing_domain(self, author_domain: str) -> str | None:
        """The domain to sign as for mail from ``author_domain`` (the From domain).

        That domain if it has keys, else its nearest parent with keys (which
        still aligns under DMARC's relaxed mode, RFC 7489 §3.1.1), else None.
        """
        labels = _lower_domain(author_domain).split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            if candidate in self._keys:
                return candidate
        return None

    def sign(self, message: bytes, domain: str) -> list[bytes]:
        """DKIM-Signature fields for ``message``, one per key of ``domain``.

        ``message`` is the header section and body as they will be delivered,
        CRLF line ends, without the SMTP terminator.  Trace fields the MTA
        prepends (Received, Received-SPF, Authentication-Results) are never
        signed, so whether they are included makes no difference; Bcc must
        already be gone.  Each returned field is folded with CRLF and has no
        final CRLF: prepend them, each followed by CRLF.  No keys for
        ``domain``: ``[]``.  Raises :class:`DKIMSignError` for a message
        without a From field or with an unparsable header section.
        """
        keys = self.keys(domain)
        if not keys:
            return []
        try:
            signer = dkim.DKIM(message, linesep=b"\r\n")
        except dkim.DKIMException as e:
            raise DKIMSignError(f"cannot parse the message: {e}") from None
        include = _fields_to_sign(name for name, _ in signer.headers)
        if b"from" not in include:
            raise DKIMSignError("the message has no From field (RFC 6376 §5.4)")
        canon = dkim.CanonicalizationPolicy.from_c_value(RELAXED)
        body_hash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
        headers = canon.canonicalize_headers(signer.headers)
        timestamp = str(int(self._clock())).encode("ascii")
        out = []
        for key in keys:
            header = _sign_one(key, headers, include, body_hash, timestamp)
            # Folding at whitespace leaves the relaxed-canonical form, so the signature, intact.
            out.append(fold_header_bytes(header))
        return out


RELAXED = b"relaxed/relaxed"


def _sign_one(key: SigningKey, headers: list[tuple[bytes, bytes]], include: list[bytes],
              body_hash: bytes, timestamp: bytes) -> bytes:
    """One DKIM-Signature field (RFC 6376 §3.5, §5), signed by OpenSSL, folded, no final CRLF.

    ``headers`` are the message's fields in relaxed canonical form and
    ``body_hash`` the base64 bh=.  The data to sign is what dkimpy's
    ``hash_headers`` feeds the hash (the signed fields, then this field with
    an empty b=, RFC 6376 §3.7); its SHA-256 digest is signed with
    RSASSA-PKCS1-v1_5 (RFC 8017 §8.2, the digest passed as prehashed) or, for
    Ed25519, the digest itself is the message PureEdDSA signs (RFC 8463 §3).
    """
    domain = key.domain.encode("ascii")
    tags = [
        (b"v", b"1"), (b"a", key.algorithm), (b"c", RELAXED), (b"d", domain),
        (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", key.selector.encode("ascii")),
        (b"t", timestamp), (b"h", b" : ".join(include)), (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    # As dkimpy's DKIM.sign does: fold with a placeholder b= that forces b= onto
    # lines of its own, hash that form with b= emptied, then fold again (the
    # same lines up to b=, which is folded inside its base64, RFC 6376 §3.5).
    name = b"DKIM-Signature"
    value = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags), namelen=len(name))
    value = dkim.RE_BTAG.sub(b"\\1", value)
    hasher = hashlib.sha256()
    canon = dkim.CanonicalizationPolicy.from_c_value(RELAXED)
    dkim.hash_headers(hasher, canon, headers, include, (name, b" " + value), dict(tags))
    digest = hasher.digest()
    if isinstance(key.private, rsa.RSAPrivateKey):
        signature = key.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        signature = key.private.sign(digest)
    tags[-1] = (b"b", base64.b64encode(signature))
    value = dkim.fold(b"; ".join(b"=".join(tag) for tag in tags) + b"\r\n", namelen=len(name))
    return name + b": " + value.rstrip(b"\r\n")


def _lower_domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError:
        return domain.lower().rstrip(".")


# --- DNS ---------------------------------------------------------------------------


def make_dns_txt(dns_config: DNSConfig, *,
                 defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread,
                 resolv_conf: Path = RESOLV_CONF) -> TXTLookup:
    """An asynchronous TXT lookup against the configured servers (for DKIM and DMARC).

    It reuses the SPF module's dnspython lookup (:func:`mta.policy.spf.make_dns_lookup`)
    in a worker thread.  Fires with each TXT record's strings joined, ``[]``
    for NXDOMAIN or no data; fails with :class:`DNSTempError` otherwise.
    """
    lookup = make_dns_lookup(dns_config, resolv_conf)

    def blocking(name: str) -> list[bytes]:
        try:
            answers = lookup(name.rstrip("."), "TXT", True, dns_config.timeout)
        except spf.TempError as e:
            raise DNSTempError(str(e)) from None
        return [b"".join(strings) for _key, strings in answers]

    def dns_txt(name: str) -> Deferred[list[bytes]]:
        return defer_to_thread(blocking, name)

    return dns_txt


# --- verification ------------------------------------------------------------------


@dataclass(frozen=True)
class DKIMResult:
    """The evaluation of one DKIM-Signature field."""

    result: str  # one of RESULTS
    domain: str = ""  # d=
    selector: str = ""  # s=
    header_b: str = ""  # the first 8 characters of b= (RFC 6008 §4)
    reason: str = ""  # why, for logs and the A-R comment (printable ASCII)
    algorithm: str = ""  # a=

    @property
    def passed(self) -> bool:
        return self.result == "pass"


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _printable(text: str, limit: int = 200) -> str:
    return " ".join(re.sub(r"[^\x20-\x7e]+", " ", text).split())[:limit]


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace")


def _key_name(selector: bytes, domain: bytes) -> str | None:
    """``selector._domainkey.domain`` if both are well-formed DNS names."""
    try:
        name = f"{selector.decode('ascii')}._domainkey.{domain.decode('ascii')}".lower()
    except UnicodeDecodeError:
        return None
    name = name.rstrip(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


@dataclass
class _Signature:
    """One DKIM-Signature field, checked as far as can be without DNS."""

    index: int
    domain: str = ""
    selector: str = ""
    header_b: str = ""
    algorithm: str = ""
    key_name: str | None = None
    early: str | None = None  # a result decided without the key
    reason: str = ""

    def result(self, result: str, reason: str) -> DKIMResult:
        return DKIMResult(result, self.domain, self.selector, self.header_b,
                          _printable(reason), self.algorithm)


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


# What dkimpy raises for malformed input besides its own exceptions (int() of
# a huge t=, an i= equal to d=, ...).
_PARSE_ERRORS = (dkim.DKIMException, ValueError, IndexError, KeyError, TypeError)


def _signatures(message: bytes, max_signatures: int) -> list[_Signature]:
    """Parse every DKIM-Signature field of the header section (no DNS, no body)."""
    header = _header_section(message)
    count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", header))
    if count == 0:
        return []
    try:
        parser = dkim.DKIM(header)
    except _PARSE_ERRORS as e:
        return [_Signature(i, early="permerror", reason=f"unparsable header section: {e}")
                for i in range(min(count, max_signatures))]
    total = sum(1 for name, _ in parser.headers if name.lower() == b"dkim-signature")
    if total > max_signatures:
        log.info("message has {n} DKIM signatures; evaluating the first {m}",
                 n=total, m=max_signatures)
    out = []
    for i in range(min(total, max_signatures)):
        sig = _Signature(i)
        try:
            tags = parser.verify_headerprep(idx=i)[0]
        except _PARSE_ERRORS as e:
            sig.early, sig.reason = "neutral", f"malformed signature: {e}"
            out.append(sig)
            continue
        sig.domain = _text(tags.get(b"d")).lower()
        sig.selector = _text(tags.get(b"s"))
        sig.header_b = re.sub(r"\s+", "", _text(tags.get(b"b")))[:8]
        sig.algorithm = _text(tags.get(b"a")).lower()
        sig.key_name = _key_name(tags[b"s"], tags[b"d"])
        if sig.key_name is None:
            sig.early, sig.reason = "permerror", "d= or s= is not a valid domain name"
        elif sig.algorithm == "rsa-sha1":
            sig.early, sig.reason = "permerror", "rsa-sha1 is not accepted (RFC 8301 §3.1)"
        out.append(sig)
    return out


@dataclass(frozen=True)
class _KeyAnswer:
    records: tuple[bytes, ...] = ()
    temporary: str = ""  # set when the lookup failed


async def _fetch_keys(names: set[str], dns_txt: TXTLookup) -> dict[str, _KeyAnswer]:
    async def one(name: str) -> tuple[str, _KeyAnswer]:
        try:
            records = await dns_txt(name)
        except DNSTempError as e:
            return name, _KeyAnswer(temporary=str(e) or "DNS failure")
        except Exception as e:  # any other failure of the lookup is temporary too
            log.failure("DKIM key lookup for {name} failed", name=name)
            return name, _KeyAnswer(temporary=type(e).__name__)
        return name, _KeyAnswer(records=tuple(records))

    pairs = await defer.gatherResults([Deferred.fromCoroutine(one(n)) for n in sorted(names)])
    return dict(pairs)


def _pick_record(records: Sequence[bytes]) -> bytes | None:
    """RFC 6376 §3.6.2.2: with several TXT records, use the first DKIM key record."""
    for record in records:
        if record.lstrip().startswith(b"v=DKIM1") or b"p=" in record:
            return record
    return None


def _check_all(message: bytes, sigs: list[_Signature], keys: dict[str, _KeyAnswer],
               minkey: int) -> list[DKIMResult]:
    """Verify the prepared signatures (runs in a worker thread)."""
    try:
        verifier = dkim.DKIM(message, minkey=minkey)
    except _PARSE_ERRORS as e:
        return [s.result("permerror", f"unparsable message: {e}") for s in sigs]
    chosen: dict[str, bytes | None] = {
        name: _pick_record(answer.records) for name, answer in keys.items()
    }

    return [_check_one(verifier, sig, keys, chosen, minkey) for sig in sigs]


@dataclass(frozen=True)
class _PublicKey:
    """A key record's key, as OpenSSL verifies with it."""

    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    bits: int  # RSA modulus size; 256 for Ed25519
    tlsrpt_only: bool  # s=tlsrpt (RFC 8460 §3): not for mail


def _public_key(evaluated: tuple[Any, int, bytes, bool]) -> _PublicKey:
    """Convert what ``dkim.evaluate_pk`` parsed (and checked: v=, k=, h=, s=, an empty p=).

    dkimpy reads an RSA p= as SubjectPublicKeyInfo or a bare RSAPublicKey
    (both are published) into a dict of integers, an Ed25519 p= into a PyNaCl
    key; both become ``cryptography`` keys.  Raises KeyFormatError.
    """
    pk, bits, ktag, tlsrpt = evaluated
    try:
        if ktag == b"rsa":
            key: Any = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(pk))
    except (ValueError, TypeError, KeyError) as e:
        raise dkim.KeyFormatError(f"unusable public key: {e}") from None
    return _PublicKey(key, bits, bool(tlsrpt))


def _verify_one(verifier: Any, idx: int, public: _PublicKey, minkey: int) -> bool:
    """Check signature ``idx`` of the message parsed into ``verifier`` (a ``dkim.DKIM``).

    The same steps as dkimpy's ``DKIM.verify`` after the key is fetched
    (RFC 6376 §6.1.3): the body hash (with l=) is compared, then the signed
    fields are hashed by dkimpy's ``hash_headers``; only the signature check
    itself goes to OpenSSL (RSASSA-PKCS1-v1_5 over the SHA-256 digest, RFC
    8017 §8.2.2; Ed25519 over the digest, RFC 8463 §3).  True if it holds,
    False if not; raises ValidationError for a body hash mismatch or a
    tlsrpt-only key, KeyFormatError for an RSA key below ``minkey`` bits
    (checked, as dkimpy does, once the signature holds) and MessageFormatError
    for a bad c=.
    """
    sig, include_headers, sigheaders = verifier.verify_headerprep(idx)
    if public.tlsrpt_only:
        raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
    try:
        canon = dkim.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except dkim.InvalidCanonicalizationPolicyError as e:
        raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
    if sig[b"a"].lower() == b"rsa-sha1":  # refused before, by _signatures; never hashed here
        raise dkim.ValidationError("rsa-sha1 is not accepted")
    body = canon.canonicalize_body(verifier.body)
    if b"l" in sig:
        body = body[: int(sig[b"l"])]
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    except ValueError as e:
        raise dkim.MessageFormatError(str(e)) from None
    if hashlib.sha256(body).digest() != expected:
        raise dkim.ValidationError("body hash mismatch")
    if b"from" in include_headers:
        include_headers.append(b"from")  # an added From field breaks it (as dkimpy does)
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, canon, canon.canonicalize_headers(verifier.headers),
                      include_headers, sigheaders[idx], sig)
    digest = hasher.digest()
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
    except ValueError as e:
        raise dkim.MessageFormatError(str(e)) from None
    try:
        if isinstance(public.key, rsa.RSAPublicKey):
            public.key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        else:
            public.key.verify(signature, digest)
    except InvalidSignature:
        return False
    if isinstance(public.key, rsa.RSAPublicKey) and public.bits < minkey:
        raise dkim.KeyFormatError(f"public key too small: {public.bits}")
    return True


def _check_one(verifier: Any, sig: _Signature, keys: dict[str, _KeyAnswer],
               chosen: dict[str, bytes | None], minkey: int) -> DKIMResult:
    if sig.early is not None:
        return sig.result(sig.early, sig.reason)
    assert sig.key_name is not None
    answer = keys.get(sig.key_name, _KeyAnswer(temporary="not looked up"))
    if answer.temporary:
        return sig.result("temperror", f"key lookup failed: {answer.temporary}")
    record = chosen.get(sig.key_name)
    if record is None:
        return sig.result("permerror", f"no key for signature at {sig.key_name}")
    try:
        public = _public_key(dkim.evaluate_pk(sig.key_name, record))
    except _PARSE_ERRORS as e:
        return sig.result("permerror", f"bad key record: {e}")
    try:
        ok = _verify_one(verifier, sig.index, public, minkey)
    except dkim.KeyFormatError as e:
        return sig.result("permerror", str(e))  # e.g. a key below minkey
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return sig.result("fail", "body hash did not verify")
        return sig.result("neutral", str(e))
    except _PARSE_ERRORS as e:
        return sig.result("neutral", str(e))
    except Exception:  # dkimpy on hostile input: log it, never fail the whole message
        log.failure("dkimpy crashed verifying a signature from {d}", d=sig.domain)
        return sig.result("neutral", "signature could not be processed")
    if ok:
        return sig.result("pass", "")
    return sig.result("fail", "signature did not verify")


async def verify(message: bytes, dns_txt: TXTLookup, *,
                 defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread,
                 max_signatures: int = MAX_SIGNATURES,
                 minkey: int = MIN_RSA_BITS) -> list[DKIMResult]:
    """Evaluate every DKIM signature of ``message`` (CRLF line ends, as stored).

    An unsigned message gives ``[DKIMResult("none")]``; otherwise one result
    per signature, in header order.  Never raises for anything in the message
    or in DNS; the result says what went wrong.  Use
    ``Deferred.fromCoroutine(verify(...))`` from Twisted code.
    """
    sigs = _signatures(message, max_signatures)
    if not sigs:
        return [DKIMResult("none", reason="message not signed")]
    names = {s.key_name for s in sigs if s.early is None and s.key_name is not None}
    keys = await _fetch_keys(names, dns_txt) if names else {}
    return await defer_to_thread(_check_all, message, sigs, keys, minkey)
