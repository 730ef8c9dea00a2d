"""DNS blocklists and allowlists: the query names, reply filters, scores and a TTL cache.

A client address is looked up in each configured zone (``[dnsbl] sites``,
Postfix's postscreen_dnsbl_sites syntax, parsed by :func:`mta.config.dnsbl_site`):
the address in reverse order under the zone (RFC 5782 §2.1: IPv4 octets,
``2.0.0.127.zen.example``; §2.4: IPv6 nibbles, 32 of them), asked for its A
record.  A zone *lists* the client when it answers an A record that its filter
admits (``=127.0.0.[2..11]``; RFC 5782 §2.1: answers are in 127.0.0.0/8, any
of them without a filter); NXDOMAIN means not listed.  The weights of the
zones that list a client are summed (each zone once, RFC 5782 lists may answer
several records): at ``threshold`` or more the client is refused, at
``allowlist_threshold`` or less (negative weights: allowlists, as Postfix's
postscreen_dnsbl_allowlist_threshold) it is allowlisted.

A zone that cannot be asked (SERVFAIL, timeout, a refused query) counts as
not listing the client: a broken or slow list never blocks mail; each such
failure is one log event (``dnsbl``, ``result`` ``error``).

Answers are kept for their TTL (at most ``cache_max_ttl``): a listing for the
smallest TTL of its A records, an NXDOMAIN for the negative TTL of the SOA
that comes with it (RFC 2308 §5; none without one); at most
``max_cache_entries`` (the oldest goes first).  The delivery side's
:class:`mta.system.dns.CachingResolver` keeps neither NXDOMAIN nor failures,
and most blocklist answers are NXDOMAIN, so this cache is the blocklists' own.
When every answer a client needs is in the cache, :meth:`Screen.score` answers
synchronously (no Deferred): a client that reconnects costs no DNS round trip.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.names import dns, error

from mta.config import DNSBLConfig, DNSBLSite

log = Logger(namespace="mta.policy.dnsbl")

# A cached "not listed": no addresses.
_NONE: tuple[str, ...] = ()


def reversed_name(ip: str) -> str | None:
    """The address as a DNSBL query prefix (RFC 5782 §2.1, §2.4), without the zone;
    None for text that is no address (a unix socket's peer, say)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:192.0.2.1 is the IPv4 client it stands for
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def matches(site: DNSBLSite, answer: str) -> bool:
    """Whether an A record ``answer`` of ``site`` lists the client (its filter)."""
    if site.filter is None:
        return True
    try:
        octets = [int(x) for x in answer.split(".")]
    except ValueError:
        return False
    return len(octets) == 4 and all(o in allowed for o, allowed in zip(octets, site.filter, strict=True))


class Score(NamedTuple):
    """A client's result: the summed weight and the zones that listed it."""

    total: int
    listed_by: tuple[str, ...]  # zones with a positive weight whose answer matched
    allowed_by: tuple[str, ...]  # zones with a negative weight whose answer matched

    def names(self) -> str:
        return ", ".join(self.listed_by)


class Screen:
    """Looks clients up in the configured zones, with the cache described above.

    ``resolver`` has twisted.names' ``lookupAddress`` (the daemon's, from
    :func:`mta.system.dns.make_resolver`); ``clock`` gives ``seconds()``.
    """

    def __init__(self, config: DNSBLConfig, resolver: Any, clock: Any) -> None:
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.lookups = 0  # DNS questions asked (for tests and the note)

    def score(self, ip: str) -> Score | Deferred[Score]:
        """The client's score: a Score at once when the cache has every answer,
        else a Deferred firing with one.  Never fails (see the module docstring)."""
        prefix = reversed_name(ip)
        if prefix is None:
            return Score(0, (), ())
        sites = self.config.sites
        answers: list[Any] = []
        waiting = False
        now = self.clock.seconds()
        for site in sites:
            name = f"{prefix}.{site.zone}"
            cached = self._cache.get(name)
            if cached is not None and cached[0] > now:
                answers.append(cached[1])
                continue
            if cached is not None:
                del self._cache[name]
            answers.append(self._ask(name, site, ip))
            waiting = True
        if not waiting:
            return self._sum(answers, sites)
        return gatherResults([a if isinstance(a, Deferred) else succeed(a) for a in answers]
                             ).addCallback(self._sum, sites)

    def allowlisted(self, ip: str) -> bool:
        """Whether the cache says the client's score is at or below
        ``allowlist_threshold`` (0: the feature is off).  Asks no DNS: the answers
        are those the check got at CONNECT or at an earlier RCPT; a client not in
        the cache is not allowlisted."""
        threshold = self.config.allowlist_threshold
        prefix = reversed_name(ip) if threshold < 0 else None
        if prefix is None:
            return False
        now = self.clock.seconds()
        answers = []
        for site in self.config.sites:
            cached = self._cache.get(f"{prefix}.{site.zone}")
            if cached is None or cached[0] <= now:
                return False
            answers.append(cached[1])
        return self._sum(answers, self.config.sites).total <= threshold

    def _ask(self, name: str, site: DNSBLSite, ip: str) -> Deferred[tuple[str, ...]]:
        self.lookups += 1
        d = self.resolver.lookupAddress(name)
        d.addCallbacks(self._answered, self._failed, (name,), None, (name, site, ip))
        return d

    def _answered(self, result: Any, name: str) -> tuple[str, ...]:
        records = [rr for rr in result[0] if rr.type == dns.A]
        addresses = tuple(rr.payload.dottedQuad() for rr in records)
        if records:
            self._keep(name, min(rr.ttl for rr in records), addresses)
        else:  # NOERROR without an A record: not listed; the SOA says for how long
            self._keep(name, _negative_ttl(result[1]), _NONE)
        return addresses

    def _failed(self, failure: Any, name: str, site: DNSBLSite, ip: str) -> tuple[str, ...]:
        if failure.check(error.DNSNameError):  # NXDOMAIN: the usual "not listed"
            message = failure.value.args[0] if failure.value.args else None
            self._keep(name, _negative_ttl(getattr(message, "authority", ())), _NONE)
            return _NONE
        log.warn("dnsbl {zone} could not be asked about {ip}: {err}; counted as not listed",
                 zone=site.zone, ip=ip, err=failure.getErrorMessage() or failure.type.__name__,
                 event="dnsbl", result="error")
        return _NONE

    def _keep(self, name: str, ttl: float, addresses: tuple[str, ...]) -> None:
        ttl = min(ttl, self.config.cache_max_ttl)
        if ttl <= 0:
            return
        if len(self._cache) >= self.config.max_cache_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[name] = (self.clock.seconds() + ttl, addresses)

    @staticmethod
    def _sum(answers: Sequence[tuple[str, ...]], sites: Sequence[DNSBLSite]) -> Score:
        total = 0
        listed: list[str] = []
        allowed: list[str] = []
        for site, addresses in zip(sites, answers, strict=True):
            if any(matches(site, a) for a in addresses):
                total += site.weight
                (listed if site.weight > 0 else allowed).append(site.zone)
        return Score(total, tuple(listed), tuple(allowed))


def _negative_ttl(authority: Any) -> float:
    """RFC 2308 §5: the smaller of the SOA's TTL and its MINIMUM; 0 without an SOA."""
    return min((min(rr.ttl, rr.payload.minimum) for rr in authority or ()
                if rr.type == dns.SOA), default=0)
