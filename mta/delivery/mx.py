"""Where to deliver mail for a domain: MX lookup and address resolution.

Implements RFC 5321 §5.1 with RFC 7505 (null MX):

* MX records are ordered by preference, in random order among equal
  preferences (RFC 5321 §5.1, "randomized to spread the load").
* No MX records (NOERROR, empty answer) → the *implicit MX*: the domain itself
  with preference 0 (RFC 5321 §5.1).
* A single MX whose exchange is "." is a null MX: the domain accepts no mail,
  fail at once with 556 5.1.10 (RFC 7505 §3; 556 is RFC 7504's code).
* NXDOMAIN for the domain → permanent failure; SERVFAIL, refusal or timeout →
  temporary failure (try again later).
* Each MX host is resolved to AAAA *and* A records, both asked at once.  A
  host with no address is skipped; if no host has an address, the whole
  lookup is a temporary failure.

Addresses of each host are listed IPv6 first, then IPv4 (or the reverse with
``prefer_ipv4=True``); hosts keep the MX order.  A/AAAA answers that come
through a CNAME chain are used whatever their owner name, since the server put
them in the answer for the name we asked.

``MXResolver`` takes any ``twisted.names`` ``IResolver`` (see
:func:`mta.system.dns.make_resolver`) and a ``random.Random`` for the shuffling.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error

log = Logger()


# --- results and errors -------------------------------------------------------------


@dataclass(frozen=True)
class MXHost:
    """One host to try, with its addresses in the order to try them."""

    name: str
    preference: int
    addresses: tuple[str, ...]


class DNSError(Exception):
    """A DNS answer that stops delivery to a domain, now (temporary) or for good.

    ``text`` is a sentence for logs and DSNs; ``status`` the RFC 3463 enhanced
    status code and ``code`` the SMTP reply code a courier should report.
    """

    permanent: bool = False

    def __init__(self, text: str, status: str, code: int) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.code = code

    @property
    def reply(self) -> str:
        """``"556 5.1.10 ..."``: the text for a DeliveryResult.reply."""
        return f"{self.code} {self.status} {self.text}"

    def __str__(self) -> str:
        return self.text


class PermanentDNSError(DNSError):
    """The domain does not exist or accepts no mail: bounce."""

    permanent = True

    def __init__(self, text: str, status: str = "5.1.2", code: int = 550) -> None:
        # RFC 3463 X.1.2: bad destination system address.
        super().__init__(text, status, code)


class TemporaryDNSError(DNSError):
    """DNS could not answer now: keep the message queued and retry."""

    permanent = False

    def __init__(self, text: str, status: str = "4.4.3", code: int = 451) -> None:
        # RFC 3463 X.4.3: directory (DNS) server failure.
        super().__init__(text, status, code)


# Answers that mean "ask again later" (RFC 5321 §4.5.4.1 asks clients to retry).
_TEMPORARY = (
    dns_error.DNSServerError,
    dns_error.DNSQueryRefusedError,
    dns_error.DNSFormatError,
    dns_error.DNSNotImplementedError,
    dns_error.DNSUnknownError,
    defer.TimeoutError,
    OSError,
)


def _describe(failure: BaseException) -> str:
    if isinstance(failure, dns_error.DNSNameError):
        return "no such domain (NXDOMAIN)"
    if isinstance(failure, dns_error.DNSServerError):
        return "DNS server failure (SERVFAIL)"
    if isinstance(failure, dns_error.DNSQueryRefusedError):
        return "DNS query refused"
    if isinstance(failure, defer.TimeoutError):
        return "DNS timeout"
    return f"DNS error ({type(failure).__name__})"


# --- helpers --------------------------------------------------------------------------


def _ip_literal(domain: str) -> str | None:
    """The address inside ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner).compressed
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _addresses(answers: Sequence[dns.RRHeader], rtype: int) -> list[str]:
    """The A or AAAA addresses in an answer section, any owner (CNAME chains)."""
    found: list[str] = []
    for rr in answers:
        if rr.type != rtype:
            continue
        address = rr.payload.address
        text = ipaddress.ip_address(address).compressed
        if text not in found:
            found.append(text)
    return found


def order_by_preference(records: Iterable[tuple[int, str]],
                        rng: random.Random) -> list[tuple[int, str]]:
    """Sort (preference, host) by preference, shuffled among equals (RFC 5321 §5.1).

    A host listed twice keeps its lowest preference.
    """
    best: dict[str, int] = {}
    for preference, host in records:
        if host not in best or preference < best[host]:
            best[host] = preference
    pairs = [(preference, host) for host, preference in best.items()]
    pairs.sort()  # deterministic starting order, so a seeded rng gives one answer
    rng.shuffle(pairs)
    pairs.sort(key=lambda pair: pair[0])  # stable: equal preferences stay shuffled
    return pairs


@dataclass
class _HostLookup:
    """The outcome of resolving one MX host name."""

    name: str
    preference: int
    addresses: list[str]
    problems: list[str]  # temporary failures of AAAA/A queries

    @property
    def temporary(self) -> bool:
        return not self.addresses and bool(self.problems)


# --- the resolver ------------------------------------------------------------------------


class MXResolver:
    """Find the hosts and addresses to deliver a domain's mail to.

    ``resolver``: a twisted.names IResolver.  ``rng``: shuffles equal
    preferences (pass a seeded ``random.Random`` in tests).  ``prefer_ipv4``:
    list IPv4 addresses of a host before IPv6 ones.  ``own_names``: our own
    host names; per RFC 5321 §5.1 an MX list naming us is cut before our
    entry (so we never send to ourselves or a lower-priority backup).
    """

    def __init__(self, resolver: Any, rng: random.Random | None = None, *,
                 prefer_ipv4: bool = False, own_names: Iterable[str] = ()) -> None:
        self._resolver = resolver
        self._rng = rng if rng is not None else random.SystemRandom()
        self._prefer_ipv4 = prefer_ipv4
        self._own_names = {n.lower().rstrip(".") for n in own_names}

    def resolve(self, domain: str) -> Deferred[list[MXHost]]:
        """The hosts to try, best first; fails with a :class:`DNSError`."""
        return Deferred.fromCoroutine(self._resolve(domain))

    async def _resolve(self, domain: str) -> list[MXHost]:
        literal = _ip_literal(domain)
        if literal is not None:
            # RFC 5321 §4.1.3: an address literal names the host directly, no DNS.
            return [MXHost(literal, 0, (literal,))]
        domain = domain.lower().rstrip(".")
        exchanges = await self._mx_records(domain)
        if exchanges is None:
            # RFC 5321 §5.1: no MX records → the domain is its own (implicit) MX.
            ordered = [(0, domain)]
        else:
            ordered = self._usable(domain, exchanges)
        hosts = await self._resolve_hosts(ordered)
        usable = [MXHost(h.name, h.preference, tuple(h.addresses)) for h in hosts if h.addresses]
        if usable:
            return usable
        raise TemporaryDNSError(self._no_address_text(domain, hosts))

    async def _mx_records(self, domain: str) -> list[tuple[int, str]] | None:
        """(preference, exchange) pairs, or None when the domain has no MX records."""
        try:
            answers, _authority, _additional = await self._resolver.lookupMailExchange(domain)
        except dns_error.DNSNameError:
            raise PermanentDNSError(f"domain {domain} does not exist (NXDOMAIN)") from None
        except _TEMPORARY as e:
            raise TemporaryDNSError(f"MX lookup for {domain} failed: {_describe(e)}") from None
        records = [
            (rr.payload.preference, rr.payload.name.name.decode("ascii", "replace").lower())
            for rr in answers if rr.type == dns.MX
        ]
        return records or None

    def _usable(self, domain: str, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Apply null MX, drop unusable exchanges, order, and cut at our own name."""
        exchanges = [(pref, host.rstrip(".")) for pref, host in records]
        if len(exchanges) == 1 and exchanges[0][1] == "":
            # RFC 7505 §3: a lone MX with exchange "." means "no mail service".
            raise PermanentDNSError(f"domain {domain} does not accept mail (null MX)",
                                    status="5.1.10", code=556)
        usable = []
        for pref, host in exchanges:
            if host == "":
                # RFC 7505 §3: a null MX MUST NOT be mixed with others; ignore it.
                log.warn("ignoring null MX of {domain} listed with other MX records",
                         domain=domain)
            elif _is_ip(host):
                # RFC 1035 §3.3.9: the exchange is a domain name, never an address.
                log.warn("ignoring MX of {domain} naming an IP address {host}",
                         domain=domain, host=host)
            else:
                usable.append((pref, host))
        if not usable:
            # RFC 5321 §5.1: MX records present but none usable is an error.
            raise PermanentDNSError(f"no usable MX record for {domain}", status="5.4.4")
        ordered = order_by_preference(usable, self._rng)
        return self._cut_at_own_name(domain, ordered)

    def _cut_at_own_name(self, domain: str,
                         ordered: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """RFC 5321 §5.1: drop our own entry and every one not better than it."""
        own = [pref for pref, host in ordered if host in self._own_names]
        if not own:
            return ordered
        kept = [(pref, host) for pref, host in ordered if pref < min(own)]
        if not kept:
            raise PermanentDNSError(f"mail for {domain} loops back to myself",
                                    status="5.4.6", code=554)
        return kept

    async def _resolve_hosts(self, ordered: list[tuple[int, str]]) -> list[_HostLookup]:
        lookups = [Deferred.fromCoroutine(self._resolve_host(pref, host))
                   for pref, host in ordered]
        return list(await defer.gatherResults(lookups, consumeErrors=True))

    async def _resolve_host(self, preference: int, host: str) -> _HostLookup:
        """AAAA and A for one host, asked together; failures noted, not raised."""
        queries = [
            (dns.AAAA, self._resolver.lookupIPV6Address(host)),
            (dns.A, self._resolver.lookupAddress(host)),
        ]
        v6: list[str] = []
        v4: list[str] = []
        problems: list[str] = []
        for rtype, query in queries:
            try:
                answers, _authority, _additional = await query
            except dns_error.DNSNameError:
                continue  # the host name does not exist: no address of this kind
            except _TEMPORARY as e:
                problems.append(f"{dns.QUERY_TYPES[rtype]} {_describe(e)}")
                continue
            (v6 if rtype == dns.AAAA else v4).extend(_addresses(answers, rtype))
        addresses = v4 + v6 if self._prefer_ipv4 else v6 + v4
        if not addresses:
            log.info("MX host {host} has no usable address{why}", host=host,
                     why=f" ({'; '.join(problems)})" if problems else "")
        return _HostLookup(host, preference, addresses, problems)

    @staticmethod
    def _no_address_text(domain: str, hosts: list[_HostLookup]) -> str:
        if len(hosts) == 1 and hosts[0].name == domain and not hosts[0].temporary:
            return f"{domain} has no MX record and no address (A/AAAA) record"
        parts = []
        for h in hosts:
            parts.append(f"{h.name}: {'; '.join(h.problems)}" if h.temporary
                         else f"{h.name}: no address record")
        return f"no mail host for {domain} could be resolved ({', '.join(parts)})"
