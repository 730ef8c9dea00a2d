"""The MTA's DNS resolver: built once from :class:`mta.config.DNSConfig`.

Everything that asks DNS questions from the reactor thread (MX lookups for
delivery, address lookups) uses the ``twisted.names`` resolver made here, so
the configured servers and timeout apply everywhere and tests can point the
whole MTA at a loopback DNS server.  The SPF check, which runs pyspf in a
worker thread, uses :func:`nameservers` to talk to the same servers.

When no servers are configured, ``/etc/resolv.conf`` is read once, here, when
the resolver is made (twisted's own resolv.conf support re-reads the file on a
60 s timer, which we do not want in a long-running daemon's test suite).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.names import client, dns

from mta.config import DNSConfig

log = Logger()

RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53


def nameservers(dns: DNSConfig, resolv_conf: Path = RESOLV_CONF) -> list[tuple[str, int]]:
    """The ``(host, port)`` servers to ask: the configured ones, else resolv.conf's.

    With neither, ``127.0.0.1:53`` (what the C resolver does, resolv.conf(5)).
    """
    if dns.servers:
        return list(dns.servers)
    servers = read_resolv_conf(resolv_conf)
    if not servers:
        log.warn("no nameserver in {path}; using 127.0.0.1", path=str(resolv_conf))
        servers = [("127.0.0.1", DNS_PORT)]
    return servers


def read_resolv_conf(path: Path) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf(5) file (missing file: none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append((fields[1], DNS_PORT))
    return servers


def attempt_timeouts(total: float, server_count: int) -> tuple[float, ...]:
    """Split one lookup's time budget into twisted's per-attempt timeouts.

    twisted.names asks every server with the first timeout, then every server
    again with the next one, and so on; a lookup fails with
    ``defer.TimeoutError`` after the last.  So ``sum(result) * server_count``
    is the configured ``dns.timeout``: one short try to absorb a lost
    datagram, then a longer one.
    """
    per_server = total / max(1, server_count)
    return (per_server / 3, per_server * 2 / 3)


def make_resolver(dns: DNSConfig, reactor: Any = None,
                  resolv_conf: Path = RESOLV_CONF) -> client.Resolver:
    """A ``twisted.names.client.Resolver`` asking the configured servers.

    Its lookups (``lookupMailExchange``, ``lookupAddress``, ...) fail with
    ``DNSNameError`` on NXDOMAIN, ``DNSServerError`` on SERVFAIL and
    ``defer.TimeoutError`` once ``dns.timeout`` has passed without an answer.
    """
    servers = nameservers(dns, resolv_conf)
    return client.Resolver(servers=servers, timeout=attempt_timeouts(dns.timeout, len(servers)),
                           reactor=reactor)


class CachingResolver:
    """Remembers answers for delivery lookups until their TTL runs out.

    Wraps a resolver for the three questions :class:`mta.delivery.mx.MXResolver`
    asks (MX, A, AAAA).  An answer is kept for the smallest TTL of its records,
    at most ``max_ttl`` seconds.  An empty answer ("no such record", such as
    the AAAA of a host with IPv4 only) is kept for the negative TTL of the SOA
    that comes with it (RFC 2308 §5: the smaller of the SOA's TTL and its
    MINIMUM field), and not at all without an SOA.  Errors (NXDOMAIN,
    SERVFAIL, timeouts) and answers with a TTL of 0 are never kept, so a
    failure is always asked again.  At most ``max_entries`` answers are held
    (the oldest goes first).  Entries expire by time stamp, without timers.
    """

    def __init__(self, resolver: Any, clock: Any, max_ttl: float = 3600.0,
                 max_entries: int = 10_000) -> None:
        self.resolver = resolver
        self.clock = clock
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self._answers: dict[tuple[str, str], tuple[float, Any]] = {}
        self.hits = 0
        self.misses = 0

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Any:  # noqa: N802
        return self._lookup("MX", name, self.resolver.lookupMailExchange)

    def lookupAddress(self, name: str, timeout: Any = None) -> Any:  # noqa: N802
        return self._lookup("A", name, self.resolver.lookupAddress)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Any:  # noqa: N802
        return self._lookup("AAAA", name, self.resolver.lookupIPV6Address)

    def _lookup(self, kind: str, name: str, ask: Any) -> Deferred[Any]:
        key = (kind, name.lower().rstrip("."))
        now = self.clock.seconds()
        cached = self._answers.get(key)
        if cached is not None:
            if cached[0] > now:
                self.hits += 1
                return succeed(cached[1])
            del self._answers[key]
        self.misses += 1
        d = ask(name)

        def keep(result: Any) -> Any:
            answers, authority = result[0], result[1]
            if answers:
                ttl = min(rr.ttl for rr in answers)
            else:  # NODATA: the SOA says how long "no such record" holds (RFC 2308 §5)
                ttl = min((min(rr.ttl, rr.payload.minimum) for rr in authority
                           if rr.type == dns.SOA), default=0)
            if ttl > 0 and self.max_ttl > 0:
                if len(self._answers) >= self.max_entries:
                    del self._answers[next(iter(self._answers))]
                self._answers[key] = (self.clock.seconds() + min(ttl, self.max_ttl), result)
            return result

        return d.addCallback(keep)


# --- DNSSEC: a validating resolver's answers with their AD bit (DANE) ------------------


class SecureAnswer:
    """One answer of a validating resolver: its RCODE, whether the resolver
    validated it (the AD bit, RFC 4035 §3.2.3) and the answer section."""

    __slots__ = ("answers", "rcode", "secure")

    def __init__(self, rcode: int, secure: bool, answers: list[dns.RRHeader]) -> None:
        self.rcode = rcode
        self.secure = secure
        self.answers = answers

    def records(self, rtype: int) -> list[Any]:
        """The payloads of the answer's records of ``rtype`` (any owner: CNAME chains)."""
        return [rr.payload for rr in self.answers if rr.type == rtype]


def loopback_servers(servers: list[tuple[str, int]]) -> bool:
    """Whether every server is on loopback: the only place an AD bit is trusted from."""
    import ipaddress

    try:
        return bool(servers) and all(ipaddress.ip_address(h).is_loopback for h, _ in servers)
    except ValueError:
        return False


class ValidatingResolver:
    """Asks a *local* validating resolver, with the AD bit set in the query, and
    reports the AD bit of the answer (RFC 6840 §5.7: a resolver sets AD in the
    answer only for a query that had AD or DO; we want AD, not the signatures).

    As Postfix does, the AD bit is trusted only because the resolver is on
    loopback (the path to it cannot be tampered with); the caller checks that
    (:func:`loopback_servers`).  One UDP query per server in turn, each with
    its share of ``timeout``; a truncated answer is asked again over TCP
    (RFC 7766).  Fails with ``defer.TimeoutError`` when no server answered;
    SERVFAIL (a bogus answer, RFC 4035 §5.5) and NXDOMAIN are answers, in
    :attr:`SecureAnswer.rcode`.
    """

    MAX_ID = 0xFFFF

    def __init__(self, servers: list[tuple[str, int]], timeout: float, reactor: Any,
                 rng: Any = None) -> None:
        import random

        self.servers = list(servers)
        self.timeout = timeout
        self.reactor = reactor
        self._rng = rng or random.SystemRandom()

    def query(self, name: str, rtype: int) -> Deferred[SecureAnswer]:
        return Deferred.fromCoroutine(self._query(name, rtype))

    async def _query(self, name: str, rtype: int) -> SecureAnswer:
        from twisted.internet import defer

        per_server = self.timeout / max(1, len(self.servers))
        for server in self.servers:
            message = dns.Message(id=self._rng.randrange(1, self.MAX_ID), recDes=1,
                                  authenticData=1)
            message.queries = [dns.Query(name.rstrip(".") or ".", rtype, dns.IN)]
            try:
                answer = await self._udp(server, message, per_server)
                if answer.trunc:
                    answer = await self._tcp(server, message, per_server)
            except (defer.TimeoutError, OSError, EOFError):
                continue
            return SecureAnswer(answer.rCode, bool(answer.authenticData), list(answer.answers))
        raise defer.TimeoutError(f"no answer from the validating resolver for {name}")

    def _deadline(self, d: Deferred[Any], timeout: float) -> Deferred[Any]:
        from twisted.internet import defer

        def expire() -> None:
            if not d.called:
                d.errback(defer.TimeoutError("timeout"))

        timer = self.reactor.callLater(timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    async def _udp(self, server: tuple[str, int], message: dns.Message,
                   timeout: float) -> dns.Message:
        from twisted.internet.protocol import DatagramProtocol

        d: Deferred[dns.Message] = Deferred()
        wanted = message.id

        class Query(DatagramProtocol):
            def startProtocol(self) -> None:
                self.transport.connect(*server)
                self.transport.write(message.toStr())

            def datagramReceived(self, data: bytes, addr: Any) -> None:
                answer = dns.Message()
                try:
                    answer.fromStr(data)
                except Exception:
                    return  # not a DNS message: keep waiting
                if answer.id == wanted and answer.answer and not d.called:
                    d.callback(answer)

            def connectionRefused(self) -> None:
                if not d.called:
                    d.errback(ConnectionRefusedError("connection refused"))

        interface = "::1" if ":" in server[0] else "127.0.0.1"
        port = self.reactor.listenUDP(0, Query(), interface=interface)
        try:
            return await self._deadline(d, timeout)
        finally:
            await port.stopListening()

    async def _tcp(self, server: tuple[str, int], message: dns.Message,
                   timeout: float) -> dns.Message:
        import struct

        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol

        d: Deferred[dns.Message] = Deferred()

        class Query(Protocol):
            buffer = b""

            def connectionMade(self) -> None:
                data = message.toStr()
                self.transport.write(struct.pack("!H", len(data)) + data)

            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                if len(self.buffer) >= 2:
                    size = struct.unpack("!H", self.buffer[:2])[0]
                    if len(self.buffer) >= 2 + size and not d.called:
                        answer = dns.Message()
                        answer.fromStr(self.buffer[2:2 + size])
                        d.callback(answer)
                        self.transport.loseConnection()

            def connectionLost(self, reason: Any = None) -> None:
                if not d.called:
                    d.errback(EOFError("connection closed before the answer"))

        kind = TCP6ClientEndpoint if ":" in server[0] else TCP4ClientEndpoint
        endpoint = kind(self.reactor, server[0], server[1], timeout=timeout)
        proto = await endpoint.connect(Factory.forProtocol(Query))
        try:
            return await self._deadline(d, timeout)
        finally:
            if proto.transport.connected:
                proto.transport.abortConnection()
