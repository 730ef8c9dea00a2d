"""A real, authoritative DNS server on loopback for the test suite.

Tests describe the DNS they need as a plain dictionary and get a server on
127.0.0.1 that answers over UDP and TCP on the same ephemeral port::

    server = LoopbackDNS({
        "example.test": {
            "MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
            "A": ["127.0.0.1"],
            "AAAA": ["::1"],
            "TXT": ["v=spf1 ip4:127.0.0.1 -all"],
        },
        "www.example.test": {"CNAME": "example.test"},
        "broken.test": "SERVFAIL",            # every query for the name
        "slow.test": {"A": "TIMEOUT"},        # only A queries are dropped
    })
    await server.start()
    resolver = make_resolver(server.dns_config(timeout=0.5))
    ...
    await server.stop()

Semantics, chosen to look like a real authoritative server:

* A name that is not in the description answers NXDOMAIN, unless it is an
  "empty non-terminal" (a parent of a described name), which answers NOERROR
  with no data (RFC 8020).
* A described name without records of the asked type answers NOERROR with an
  empty answer and an SOA in the authority section (RFC 2308 "NODATA").
* A name with a CNAME answers every other type with the CNAME chain, followed
  inside the description (at most 8 links), and the target's records.
* ``"SERVFAIL"`` answers RCODE 2; ``"TIMEOUT"`` silently drops the query so
  the client's own timeout fires.  Either may be given for a whole name or
  for one record type of a name.

Record values: ``A``/``AAAA`` address strings; ``MX`` ``(preference, host)``
pairs (host ``"."`` is the RFC 7505 null MX); ``TXT`` strings (split into
255-octet character-strings) or tuples of strings (one character-string each);
``CNAME``/``PTR``/``NS`` host names; ``TLSA`` ``(usage, selector, matching type,
hex data)`` tuples (served as raw RDATA: twisted.names has no TLSA class).  The description may be changed while the
server runs (:meth:`set`, :meth:`add`, :meth:`remove`, :meth:`servfail`,
:meth:`drop`); answers are built from it at each query.  Every query received
is appended to :attr:`queries` as ``(name, TYPE)``.

Use the ``dns_server`` fixture from ``tests/conftest.py`` to get a started
server that is stopped after the test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.names import dns, server

from mta.config import DNSConfig

SERVFAIL = "SERVFAIL"
TIMEOUT = "TIMEOUT"
BEHAVIOURS = (SERVFAIL, TIMEOUT)

SUPPORTED_TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "PTR", "NS", "TLSA")
# Types twisted.names has no record class for: served as raw RDATA (RFC 3597).
_RAW_TYPES = {"TLSA": 52}  # RFC 6698 §7.1
MAX_CNAME_CHAIN = 8
_DEFAULT_TTL = 60

# One entry of the description: a behaviour for the whole name, or a mapping
# from record type to a list of values (or a behaviour for that type).
ZoneEntry = str | Mapping[str, Any]


def _norm_name(name: str) -> str:
    name = name.strip().lower()
    if name != ".":
        name = name.rstrip(".")
    return name


def _type_name(qtype: int) -> str:
    for name, code in _RAW_TYPES.items():
        if code == qtype:
            return name
    return dns.QUERY_TYPES.get(qtype, "")


def _norm_type(rtype: str) -> str:
    rtype = rtype.upper()
    if rtype not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported record type {rtype!r}; use one of {SUPPORTED_TYPES}")
    return rtype


def _txt_strings(value: str | tuple[str, ...] | list[str]) -> list[bytes]:
    if isinstance(value, tuple | list):
        return [part.encode("utf-8") for part in value]
    data = value.encode("utf-8")
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _record(rtype: str, value: Any, ttl: int) -> dns.IEncodable:
    """Build the twisted.names record object for one described value."""
    if rtype == "A":
        return dns.Record_A(str(ipaddress.IPv4Address(value)), ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=ttl)
    if rtype == "MX":
        preference, host = value
        exchange = b"" if _norm_name(host) == "." else _norm_name(host).encode("ascii")
        return dns.Record_MX(int(preference), exchange, ttl=ttl)
    if rtype == "TXT":
        return dns.Record_TXT(*_txt_strings(value), ttl=ttl)
    if rtype == "TLSA":  # (usage, selector, matching type, hex data), RFC 6698 §2.1
        usage, selector, mtype, data = value
        return dns.UnknownRecord(bytes([usage, selector, mtype]) + bytes.fromhex(data), ttl=ttl)
    host = _norm_name(value).encode("ascii")
    if rtype == "CNAME":
        return dns.Record_CNAME(host, ttl=ttl)
    if rtype == "PTR":
        return dns.Record_PTR(host, ttl=ttl)
    if rtype == "NS":
        return dns.Record_NS(host, ttl=ttl)
    raise ValueError(f"unsupported record type {rtype!r}")


def _validate(rtype: str, values: Any) -> list[Any] | str:
    """Check a described value list now, so a typo fails where it is written."""
    if isinstance(values, str) and values.upper() in BEHAVIOURS:
        return values.upper()
    if isinstance(values, str) or (isinstance(values, tuple) and rtype != "MX"):
        values = [values]  # one value given bare
    elif rtype == "MX" and isinstance(values, tuple) and isinstance(values[0], int):
        values = [values]  # one (preference, host) pair given bare
    values = list(values)
    if rtype == "CNAME" and len(values) > 1:
        raise ValueError("a name has at most one CNAME (RFC 1034 §3.6.2)")
    for value in values:
        _record(rtype, value, _DEFAULT_TTL)
    return values


class _Zone:
    """The described names, their records and their special behaviours."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.names: dict[str, dict[str, list[Any] | str] | str] = {}

    def load(self, description: Mapping[str, ZoneEntry]) -> None:
        for name, entry in description.items():
            if isinstance(entry, str):
                self.set_behaviour(name, None, entry)
            else:
                for rtype, values in entry.items():
                    self.set(name, rtype, values)
            self.names.setdefault(_norm_name(name), {})

    def set(self, name: str, rtype: str, values: Any) -> None:
        rtype = _norm_type(rtype)
        entry = self.names.get(_norm_name(name))
        if not isinstance(entry, dict):
            entry = {}
            self.names[_norm_name(name)] = entry
        entry[rtype] = _validate(rtype, values)

    def set_behaviour(self, name: str, rtype: str | None, behaviour: str) -> None:
        behaviour = behaviour.upper()
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; use one of {BEHAVIOURS}")
        if rtype is None:
            self.names[_norm_name(name)] = behaviour
        else:
            self.set(name, rtype, behaviour)

    # --- answering ------------------------------------------------------------

    def behaviour(self, name: str, qtype: int) -> str | None:
        entry = self.names.get(name)
        if isinstance(entry, str):
            return entry
        if entry is not None:
            value = entry.get(_type_name(qtype))
            if isinstance(value, str):
                return value
        return None

    def _records(self, name: str, rtype: str) -> list[Any]:
        entry = self.names.get(name)
        if not isinstance(entry, dict):
            return []
        values = entry.get(rtype, [])
        return [] if isinstance(values, str) else list(values)

    def _exists(self, name: str) -> bool:
        if name in self.names:
            return True
        # An empty non-terminal exists (RFC 8020: NXDOMAIN means nothing below).
        return any(other.endswith("." + name) for other in self.names)

    def _soa(self, name: str) -> dns.RRHeader:
        labels = name.split(".")
        zone = ".".join(labels[-2:]) if len(labels) >= 2 else name
        soa = dns.Record_SOA(
            mname=b"ns." + zone.encode("ascii"), rname=b"hostmaster." + zone.encode("ascii"),
            serial=1, refresh=3600, retry=600, expire=86400, minimum=self.ttl, ttl=self.ttl,
        )
        return dns.RRHeader(zone.encode("ascii"), dns.SOA, dns.IN, self.ttl, soa, auth=True)

    def _rr(self, owner: str, rtype: str, value: Any) -> dns.RRHeader:
        record = _record(rtype, value, self.ttl)
        return dns.RRHeader(owner.encode("ascii"), _RAW_TYPES.get(rtype) or record.TYPE, dns.IN,
                            self.ttl, record, auth=True)

    def answer(self, name: str, qtype: int) -> tuple[int, list, list]:
        """(rcode, answers, authority) for one question, CNAMEs followed."""
        rtype = _type_name(qtype)
        answers: list[dns.RRHeader] = []
        current = name
        for _ in range(MAX_CNAME_CHAIN):
            cnames = self._records(current, "CNAME") if rtype != "CNAME" else []
            if not cnames:
                break
            answers.append(self._rr(current, "CNAME", cnames[0]))
            current = _norm_name(cnames[0])
            if self.behaviour(current, qtype) is not None:
                # A broken target: say what we know and let the client go on.
                return dns.OK, answers, []
        if qtype == dns.ALL_RECORDS:
            types: Iterable[str] = SUPPORTED_TYPES
        else:
            types = (rtype,) if rtype in SUPPORTED_TYPES else ()
        for t in types:
            answers += [self._rr(current, t, v) for v in self._records(current, t)]
        if answers:
            return dns.OK, answers, []
        if not self._exists(current):
            return dns.ENAME, [], [self._soa(current)]
        return dns.OK, [], [self._soa(current)]


class _ServerFactory(server.DNSServerFactory):
    """DNSServerFactory answering from a :class:`_Zone` (and logging queries)."""

    def __init__(self, zone: _Zone, queries: list[tuple[str, str]]) -> None:
        super().__init__(authorities=[])
        self.noisy = False
        self._zone = zone
        self._queries = queries
        self._lost: list[defer.Deferred[None]] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        name = _norm_name(query.name.name.decode("ascii", "replace"))
        self._queries.append((name, _type_name(query.type) or str(query.type)))
        behaviour = self._zone.behaviour(name, query.type)
        if behaviour == TIMEOUT:
            return  # no reply at all: the client's timeout decides
        if behaviour == SERVFAIL:
            rcode, answers, authority = dns.ESERVER, [], []
        else:
            rcode, answers, authority = self._zone.answer(name, query.type)
        response = self._responseFromMessage(message=message, rCode=rcode, answers=answers,
                                             authority=authority)
        response.auth = True
        self.sendReply(protocol, response, address)

    def connectionLost(self, protocol: Any) -> None:
        super().connectionLost(protocol)
        if not self.connections:
            waiting, self._lost = self._lost, []
            for d in waiting:
                d.callback(None)

    def all_connections_closed(self) -> defer.Deferred[None]:
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._lost.append(d)
        return d


class LoopbackDNS:
    """An authoritative DNS server for tests, on 127.0.0.1, UDP and TCP, one port.

    ``zone`` is the description documented at the top of this module.
    """

    def __init__(self, zone: Mapping[str, ZoneEntry] | None = None, *,
                 reactor: Any = None, interface: str = "127.0.0.1",
                 ttl: int = _DEFAULT_TTL) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._interface = interface
        self._zone = _Zone(ttl)
        self._zone.load(zone or {})
        self.queries: list[tuple[str, str]] = []
        self._factory = _ServerFactory(self._zone, self.queries)
        self._udp: IListeningPort | None = None
        self._tcp: IListeningPort | None = None

    # --- life cycle -------------------------------------------------------------

    async def _start(self) -> LoopbackDNS:
        last_error: Exception | None = None
        for _ in range(20):  # bounded: an ephemeral UDP port whose TCP twin is free
            udp = self._reactor.listenUDP(0, dns.DNSDatagramProtocol(self._factory),
                                          interface=self._interface)
            port = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(port, self._factory, interface=self._interface)
            except CannotListenError as e:
                last_error = e
                await defer.maybeDeferred(udp.stopListening)
                continue
            self._udp, self._tcp = udp, tcp
            return self
        raise RuntimeError(f"no port free for both UDP and TCP: {last_error}")

    def start(self) -> defer.Deferred[LoopbackDNS]:
        """Listen on an ephemeral port; fires with ``self``."""
        return defer.Deferred.fromCoroutine(self._start())

    async def _stop(self) -> None:
        udp, tcp, self._udp, self._tcp = self._udp, self._tcp, None, None
        if tcp is not None:
            await defer.maybeDeferred(tcp.stopListening)
        if udp is not None:
            await defer.maybeDeferred(udp.stopListening)
        for protocol in list(self._factory.connections):
            protocol.transport.loseConnection()
        await self._factory.all_connections_closed()

    def stop(self) -> defer.Deferred[None]:
        """Close both ports and any open TCP connection."""
        return defer.Deferred.fromCoroutine(self._stop())

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server answers on, over UDP and TCP."""
        if self._udp is None:
            raise RuntimeError("the DNS server is not started")
        return self._interface, self._udp.getHost().port

    def dns_config(self, timeout: float = 1.0) -> DNSConfig:
        """A :class:`mta.config.DNSConfig` pointing at this server only."""
        return DNSConfig(servers=(self.address,), timeout=timeout)

    # --- changing the data while running ----------------------------------------

    def load(self, description: Mapping[str, ZoneEntry]) -> None:
        """Merge a description (same shape as the constructor's) into the data."""
        self._zone.load(description)

    def set(self, name: str, rtype: str, values: Any) -> None:
        """Replace the ``rtype`` records of ``name`` (or give it a behaviour string)."""
        self._zone.set(name, rtype, values)

    def add(self, name: str, rtype: str, value: Any) -> None:
        """Add one record to ``name``."""
        rtype = _norm_type(rtype)
        entry = self._zone.names.get(_norm_name(name))
        current = entry.get(rtype, []) if isinstance(entry, dict) else []
        if isinstance(current, str):
            current = []
        self._zone.set(name, rtype, [*current, value])

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Forget the ``rtype`` records of ``name``, or the whole name (→ NXDOMAIN)."""
        key = _norm_name(name)
        if rtype is None:
            self._zone.names.pop(key, None)
            return
        entry = self._zone.names.get(key)
        if isinstance(entry, dict):
            entry.pop(_norm_type(rtype), None)

    def servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL for ``name`` (all types, or only ``rtype``)."""
        self._zone.set_behaviour(name, rtype, SERVFAIL)

    def drop(self, name: str, rtype: str | None = None) -> None:
        """Never answer queries for ``name`` (all types, or only ``rtype``)."""
        self._zone.set_behaviour(name, rtype, TIMEOUT)

    def asked(self, name: str, rtype: str) -> int:
        """How many ``rtype`` queries for ``name`` arrived so far."""
        return self.queries.count((_norm_name(name), rtype.upper()))
