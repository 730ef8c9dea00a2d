"""DANE for SMTP (RFC 7672): TLSA records of MX hosts, and the certificate check they ask for.

For a destination domain whose MX hosts are looked up, :class:`DanePolicy`
decides per MX host how TLS is done:

1. The MX RRset is asked again of the *validating* resolver (a local
   resolver whose AD bit is trusted, as Postfix does: see
   :class:`mta.system.dns.ValidatingResolver`).  SERVFAIL there is a bogus
   (or unverifiable) answer: the domain is deferred (RFC 7672 §2.1.1, §2.2.1).
   An insecure MX RRset (no AD bit) means no DANE for the domain: its other
   TLS policy applies (§2.2.1).  No MX records: the domain is its own host
   (implicit MX), with the security of that NODATA answer.
2. For each host in the secure MX RRset whose address records are secure too
   (§2.2.2), the TLSA RRset at ``_25._tcp.<host>`` (§2.3) is looked up:

   * secure, with usable records (usage DANE-TA(2) or DANE-EE(3), selector 0
     or 1, matching type 0, 1 or 2: RFC 7672 §3.1, RFC 7671 §4-5): STARTTLS is
     required and the server's certificate must match (:class:`TLSAVerifier`);
   * secure, none usable: TLS is required, but not authenticated (§2.2);
   * no TLSA records (secure NODATA or NXDOMAIN), or an insecure answer: the
     host gets the domain's other policy;
   * SERVFAIL (bogus) or no answer: the host is not used (§2.2: "MUST NOT"
     deliver to it); the next MX is tried, and the message is deferred if none
     is left.

DANE goes before MTA-STS (RFC 8461 §2): a host with usable TLSA records is
checked against them only.

Outcomes are logged (``dane`` events) and counted for TLS reporting (RFC 8460
§4.3: ``tlsa-invalid``, ``dnssec-invalid``, ``dane-required``,
``starttls-not-supported``, ``certificate-host-mismatch``, and successes) through the :class:`TLSReport`
seam, which the TLS reporting code implements.

The validating resolver is checked when the policy starts (:meth:`DanePolicy.start`):
``check_name`` must be answered with the AD bit and, if given, ``check_bogus``
with SERVFAIL.  If it does not validate, DANE is refused (not used at all:
every domain gets its other policy, never a DANE decision resting on an AD bit
that means nothing) and the check is made again, at most every
``recheck_interval`` seconds, when a delivery needs it.  The MTA keeps running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import dns

from mta.delivery.mx import MXHost, TemporaryDNSError

log = Logger()

TLSA = 52  # RFC 6698 §7.1
DANE_TA, DANE_EE = 2, 3  # RFC 7218 names of usages 2 and 3
SELECTORS = (0, 1)  # full certificate, SubjectPublicKeyInfo (RFC 6698 §2.1.2)
DIGEST_SIZES = {0: None, 1: 32, 2: 64}  # exact, SHA2-256, SHA2-512 (RFC 6698 §2.1.3)
MAX_TLSA = 32  # records of one RRset looked at: a bound on the work per handshake


class TLSReport(Protocol):
    """Where policy outcomes are counted for TLS reporting (RFC 8460 §4); implemented
    by the TLS reporting code.  ``policy_type`` is ``"tlsa"`` here; ``result`` is
    ``"success"`` or an RFC 8460 §4.3 result type."""

    def record(self, domain: str, policy_type: str, result: str, mx: str, details: str) -> None: ...


# --- TLSA records ---------------------------------------------------------------------


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: bytes) -> TLSARecord | None:
        """RFC 6698 §2.1: three octets and the association data; None if shorter."""
        if len(rdata) < 4:
            return None
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1: only DANE-TA(2) and DANE-EE(3) are used for SMTP; a digest
        of the wrong length is unusable (RFC 7671 §4)."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in SELECTORS:
            return False
        if self.mtype not in DIGEST_SIZES:
            return False
        size = DIGEST_SIZES[self.mtype]
        return size is None or len(self.data) == size

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


def association(cert: crypto.X509, selector: int, mtype: int) -> bytes:
    """The certificate association data of ``cert`` for a selector and matching type."""
    if selector == 0:
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    else:
        der = cert.to_cryptography().public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        return hashlib.sha256(der).digest()
    if mtype == 2:
        return hashlib.sha512(der).digest()
    return der


def matches(cert: crypto.X509, record: TLSARecord) -> bool:
    return association(cert, record.selector, record.mtype) == record.data


class TLSAVerifier:
    """Checks a server's certificate chain against the usable TLSA records of its
    host (:class:`mta.delivery.tlspolicy.PeerVerifier`).

    * DANE-EE(3): the server's own certificate (or its public key) matches;
      names and dates are not checked (RFC 7672 §3.1.1).
    * DANE-TA(2): a certificate of the chain the server sent (or, for a full
      certificate record, ``2 0 0``, that certificate) matches and is the
      trust anchor the server's certificate is verified to (RFC 7672 §3.1.2,
      RFC 7671 §5.2.2), dates included, and the server's certificate names one
      of ``names`` (the TLSA base domain, i.e. the MX host name, and the
      destination domain: RFC 7672 §3.2.2; DNS-IDs, one wildcard label).

    :attr:`failure` keeps why the last check failed (for logs and reports).
    """

    def __init__(self, records: Sequence[TLSARecord], names: Sequence[str]) -> None:
        self.records = [r for r in records if r.usable]
        self.names = list(dict.fromkeys(n.lower().rstrip(".") for n in names if n))
        self.failure = ""

    def verify(self, chain: Sequence[crypto.X509]) -> str | None:
        """None when the chain matches; otherwise the reason."""
        self.failure = self._verify(list(chain)) or ""
        return self.failure or None

    def _verify(self, chain: list[crypto.X509]) -> str | None:
        if not chain:
            return "the server sent no certificate"
        leaf = chain[0]
        for record in self.records:
            if record.usage == DANE_EE and matches(leaf, record):
                return None
        problems = []
        for record in self.records:
            if record.usage != DANE_TA:
                continue
            anchor = next((c for c in chain if matches(c, record)), None)
            if anchor is None and record.selector == 0 and record.mtype == 0:
                try:
                    anchor = crypto.load_certificate(crypto.FILETYPE_ASN1, record.data)
                except crypto.Error:
                    anchor = None
            if anchor is None:
                continue
            problem = self._chain_to(leaf, chain[1:], anchor) or self._name_check(leaf)
            if problem is None:
                return None
            problems.append(problem)
        if problems:
            return problems[0]
        return "no TLSA record matches the server's certificate chain"

    @staticmethod
    def _chain_to(leaf: crypto.X509, intermediates: list[crypto.X509],
                  anchor: crypto.X509) -> str | None:
        store = crypto.X509Store()
        store.add_cert(anchor)
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)  # the anchor need not be a root
        try:
            crypto.X509StoreContext(store, leaf, chain=intermediates).verify_certificate()
        except crypto.X509StoreContextError as e:
            return f"the certificate does not verify to the DANE-TA trust anchor: {e}"
        return None

    def _name_check(self, leaf: crypto.X509) -> str | None:
        cert = leaf.to_cryptography()
        for name in self.names:
            try:
                verify_certificate_hostname(cert, name)
                return None
            except (VerificationError, CertificateError):
                continue
        return f"the certificate names none of {', '.join(self.names)} (RFC 7672 §3.2.2)"


# --- the policy for one destination ------------------------------------------------------


@dataclass(frozen=True)
class HostPolicy:
    """How to do TLS with one MX host.

    ``tls_policy``: ``"dane"`` (authenticated by ``verifier``), ``"require"``
    (TLSA present but none usable: encrypted, unauthenticated) or ``None``
    (no DANE for this host: the domain's other policy); ``refusal``: the host
    must not be used (bogus TLSA answer), with the reason."""

    tls_policy: str | None = None
    verifier: TLSAVerifier | None = None
    refusal: str | None = None
    # The host's name came in the DNSSEC-validated MX RRset (RFC 8689 §4.2.1:
    # a REQUIRETLS message may go to it under a "verify" policy too).
    secure_mx: bool = True


NO_DANE = HostPolicy()


class DanePolicy:
    """The DANE decisions for MX delivery, over one validating resolver.

    ``resolver``: a :class:`mta.system.dns.ValidatingResolver`; ``clock``: for
    the recheck interval; ``report``: a :class:`TLSReport` or None;
    ``required``: every host must have usable TLSA records (Postfix's
    ``dane-only``), or it is not used (``dane-required``); ``untrusted``: why
    the resolver's AD bit cannot be trusted at all (not on loopback): DANE is
    then refused for good.
    """

    def __init__(self, resolver: Any, clock: Any, *, check_name: str = ".",
                 check_bogus: str = "", recheck_interval: float = 60.0,
                 report: TLSReport | None = None, required: bool = False,
                 untrusted: str = "") -> None:
        self.resolver = resolver
        self.clock = clock
        self.check_name = check_name
        self.check_bogus = check_bogus
        self.recheck_interval = recheck_interval
        self.report = report
        self.required = required
        self.untrusted = untrusted
        self.available: bool | None = None  # None: not checked yet
        self.check_problem = ""
        self._checked_at = 0.0
        self._checking: Deferred[bool] | None = None

    # the resolver check

    def start(self) -> Deferred[bool]:
        """Check that the resolver validates (fires with the result; never fails)."""
        if self._checking is None:
            d = Deferred.fromCoroutine(self._check())
            self._checking = d

            def done(result: bool) -> bool:
                self._checking = None
                return result

            d.addBoth(done)
            return d
        waiter: Deferred[bool] = Deferred()
        self._checking.addBoth(lambda r: (waiter.callback(r), r)[1])
        return waiter

    async def _check(self) -> bool:
        problem = await self._check_problem()
        self._checked_at = self.clock.seconds()
        self.available = problem is None
        self.check_problem = problem or ""
        if problem is None:
            log.info("DNSSEC: the validating resolver validates ({name} is secure); DANE is on",
                     event="dnssec_check", result="ok", name=self.check_name)
        else:
            log.error("DNSSEC: {problem}; DANE is refused (domains get their other TLS policy) "
                      "until a later check passes", event="dnssec_check", result="failed",
                      problem=problem, name=self.check_name)
        return self.available

    async def _check_problem(self) -> str | None:
        if self.untrusted:
            return self.untrusted
        try:
            answer = await self.resolver.query(self.check_name, dns.SOA)
        except Exception as e:
            return f"the validating resolver did not answer for {self.check_name}: {e}"
        if answer.rcode != dns.OK or not answer.secure:
            return (f"the resolver does not validate: {self.check_name} SOA came back "
                    f"rcode {answer.rcode} without the AD bit")
        if self.check_bogus:
            try:
                bogus = await self.resolver.query(self.check_bogus, dns.SOA)
            except Exception as e:
                return f"the validating resolver did not answer for {self.check_bogus}: {e}"
            if bogus.rcode != dns.ESERVER:
                return (f"the resolver does not validate: the bogus name {self.check_bogus} "
                        f"was answered (rcode {bogus.rcode}) instead of SERVFAIL")
        return None

    async def _usable(self) -> bool:
        if self.available is None or (
                not self.available
                and self.clock.seconds() - self._checked_at >= self.recheck_interval):
            await self.start()
        return bool(self.available)

    # decisions

    async def plan(self, domain: str, hosts: Sequence[MXHost]) -> dict[str, HostPolicy] | None:
        """Per MX host name, its :class:`HostPolicy`; None when DANE does not apply to
        the domain (resolver refused, literal, insecure MX RRset).  Raises
        :class:`~mta.delivery.mx.TemporaryDNSError` for a bogus MX answer."""
        if not await self._usable() or domain.startswith("["):
            return None
        names = await self._secure_mx(domain)
        if names is None:
            return None
        plan: dict[str, HostPolicy] = {}
        for host in hosts:
            if host.name in plan:
                continue
            if host.name not in names:
                plan[host.name] = replace(self._none(domain, host.name,
                                                     "not in the secure MX RRset"),
                                          secure_mx=False)
                continue
            plan[host.name] = await self._host(domain, host.name)
        return plan

    async def _secure_mx(self, domain: str) -> set[str] | None:
        try:
            answer = await self.resolver.query(domain, dns.MX)
        except defer.TimeoutError:
            raise TemporaryDNSError(f"MX lookup for {domain} failed: the validating resolver "
                                    "did not answer") from None
        if answer.rcode == dns.ESERVER:
            self._count(domain, "dnssec-invalid", "", "MX lookup: SERVFAIL (bogus)")
            log.warn("DANE: the MX records of {domain} do not validate (SERVFAIL); deferred",
                     event="dane", domain=domain, mx="", result="dnssec-invalid")
            raise TemporaryDNSError(f"MX lookup for {domain} failed DNSSEC validation (SERVFAIL)",
                                    status="4.7.5")
        if answer.rcode != dns.OK or not answer.secure:
            return None  # NXDOMAIN is for the MX resolver to report; insecure: no DANE
        exchanges = {rr.name.name.decode("ascii", "replace").lower().rstrip(".")
                     for rr in answer.records(dns.MX)}
        return exchanges or {domain.lower().rstrip(".")}  # secure NODATA: implicit MX

    async def _host(self, domain: str, host: str) -> HostPolicy:
        try:
            if not await self._addresses_secure(host):
                return self._none(domain, host, "its address records are not secure")
            answer = await self.resolver.query(f"_25._tcp.{host}", TLSA)
        except defer.TimeoutError:
            return self._refuse(domain, host, "dnssec-invalid",
                                "the TLSA lookup got no answer from the validating resolver")
        if answer.rcode == dns.ESERVER:
            return self._refuse(domain, host, "dnssec-invalid",
                                "the TLSA records do not validate (SERVFAIL)")
        if answer.rcode not in (dns.OK, dns.ENAME) or not answer.secure:
            return self._none(domain, host, "its TLSA answer is not secure")
        records = [r for r in (TLSARecord.from_rdata(p.data) for p in
                               answer.records(TLSA)[:MAX_TLSA]) if r is not None]
        if not records:
            return self._none(domain, host, "it has no TLSA records")
        usable = [r for r in records if r.usable]
        if not usable:
            log.info("DANE: {mx} ({domain}) has TLSA records but none usable: TLS required, "
                     "not authenticated", event="dane", domain=domain, mx=host,
                     result="unusable")
            return HostPolicy("require")
        return HostPolicy("dane", TLSAVerifier(usable, (host, domain)))

    async def _addresses_secure(self, host: str) -> bool:
        for rtype in (dns.A, dns.AAAA):
            answer = await self.resolver.query(host, rtype)
            if answer.rcode == dns.OK and not answer.secure:
                return False
        return True

    def _none(self, domain: str, host: str, why: str) -> HostPolicy:
        if self.required:
            return self._refuse(domain, host, "dane-required", f"DANE is required but {why}")
        return NO_DANE

    def _refuse(self, domain: str, host: str, result: str, why: str) -> HostPolicy:
        self._count(domain, result, host, why)
        log.warn("DANE: not using {mx} for {domain}: {why}", event="dane", domain=domain,
                 mx=host, result=result, why=why)
        return HostPolicy(refusal=f"DANE: {why}")

    def _count(self, domain: str, result: str, mx: str, details: str) -> None:
        if self.report is not None:
            self.report.record(domain, "tlsa", result, mx, details)

    def outcome(self, domain: str, mx: str, verifier: TLSAVerifier | None, tls: bool,
                error: str | None) -> None:
        """After a connection under a ``dane`` host policy: log and count the result
        (RFC 8460 §4.3.2)."""
        if verifier is None:
            return
        if error is None or (tls and not verifier.failure):
            if tls and not verifier.failure:
                self._count(domain, "success", mx, "")
                log.info("DANE: {mx} ({domain}) authenticated by its TLSA records", event="dane",
                         domain=domain, mx=mx, result="success")
            return
        if verifier.failure:
            # RFC 8460 §4.3.1: a DANE-TA chain to a certificate for another name.
            mismatch = "(RFC 7672 §3.2.2)" in verifier.failure
            result = "certificate-host-mismatch" if mismatch else "tlsa-invalid"
            why = verifier.failure
        elif not tls:
            result, why = "starttls-not-supported", error
        else:
            return
        self._count(domain, result, mx, why)
        log.warn("DANE: {mx} ({domain}) failed: {why}; nothing was sent", event="dane",
                 domain=domain, mx=mx, result=result, why=why)
