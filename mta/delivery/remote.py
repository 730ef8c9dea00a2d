"""The remote courier: routes recipients to a smarthost or to their domain's MX hosts.

It implements :class:`mta.queue.courier.Courier`.  For each destination (all
recipients for a smarthost; one domain for MX delivery) it tries the servers in
order -- each address of each MX host, or each configured smarthost -- with
:func:`mta.delivery.client.send`, and stops at the first server that gives
every recipient a final answer (RFC 5321 §5.1: "try the next address on a
temporary failure").  Recipients still without an answer after the last server
are DEFERRED with the last error.  A permanent DNS error (no such domain, null
MX) fails the domain's recipients; a temporary one defers them.

With an idle cached connection to the server that took the domain's last
message (delivery.connection_cache_time, 2 s), the next message to that domain
goes over it without a DNS lookup, as Postfix reuses a connection by its next
hop before it resolves; only if that server does not answer every recipient
are the domain's MX hosts looked up and the others tried.

With the "opportunistic" TLS policy a server whose TLS handshake fails is tried
once more on the same address in plaintext (as Postfix does at security level
"may"); "require" and "verify" never fall back.

DANE (RFC 7672; ``delivery.tls_policy = "dane"``, :mod:`mta.delivery.dane`):
after the MX lookup, each MX host gets the TLS policy its TLSA records ask
for; a host whose TLSA answer is bogus is not connected to at all (its
refusal is the error the recipients are deferred with if no other host takes
them).  DANE is decided first: another policy (MTA-STS) only applies to a
host without usable TLSA records (RFC 8461 §2).

DSN (RFC 3461 §5.2): the envelope's RET/ENVID and each recipient's
NOTIFY/ORCPT go to a server that offers DSN (the client leaves them out for
one that does not); a recipient it accepts is then reported ``dsn_passed``,
and its success and delay notices are that server's job.

``deliver`` never errbacks: an unexpected exception becomes a DEFERRED result
with the reason, so the queue retries later.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from mta.config import Config
from mta.delivery.cache import ConnectionCache
from mta.delivery.client import (
    ClientOptions,
    OutboundMessage,
    SessionResult,
    Timeouts,
    cache_key,
    send,
)
from mta.delivery.mx import DNSError
from mta.mail.dsnfields import mail_params, rcpt_params
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient
from mta.queue.layout import QueuedMessage

log = Logger()

# Domains remembered with the server of their last message (for reuse without
# a DNS lookup while its connection is cached); the memory starts afresh past it.
MAX_RECENT = 1000
# A REQUIRETLS message that no server could take for these reasons bounces (RFC 8689 §5):
# 5.7.10 no verified TLS, 5.7.30 REQUIRETLS support required.
REQUIRETLS_FAILURES = ("5.7.10", "5.7.30")


@dataclass(frozen=True)
class NextHop:
    """One server to try for a domain (an MX address or a smarthost): where to
    connect and how to talk to it."""

    host: str  # what to connect to: an IP address (MX) or a host name (smarthost)
    port: int
    name: str  # the server's name: TLS verification, logs, Remote-MTA
    tls_policy: str
    username: str | None = None
    password: str | None = None
    # DANE (mta.delivery.dane): the TLSA check under "dane", or why the host is not used.
    verifier: Any = field(default=None, compare=False)
    refusal: str | None = field(default=None, compare=False)

    @property
    def display(self) -> str:
        return self.name if self.name == self.host else f"{self.name}[{self.host}]"


def parse_smarthost(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` → (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, default_port
    return host, int(port)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class RemoteCourier:
    def __init__(self, config: Config, mx_resolver: Any, reactor: Any, trust_root: Any = None, *,
                 timeouts: Timeouts | None = None, clock: Any = None, dane: Any = None) -> None:
        self.delivery = config.delivery
        self.dane = dane  # a mta.delivery.dane.DanePolicy, or None without DANE
        self.helo_name = config.hostname
        self.resolver = mx_resolver
        self.reactor = reactor
        self.clock = clock or reactor
        self.trust_root = trust_root
        self.timeouts = timeouts or Timeouts(connect=config.delivery.connect_timeout,
                                             **dict(config.delivery.stage_timeouts))
        # The server that took each MX domain's last message (see _reusable_hop).
        self._recent: dict[str, NextHop] = {}
        # Open connections kept between messages (delivery.connection_cache_time).
        self.cache = ConnectionCache(self.clock, idle_time=config.delivery.connection_cache_time,
                                     max_idle=config.delivery.max_connections)

    def close(self) -> Deferred[Any]:
        """Close the cached connections (QUIT); fires when they are gone."""
        return self.cache.close()

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        async def guarded() -> list[DeliveryResult]:
            try:
                return await self._deliver(envelope, recipients, data_path)
            except Exception as e:
                log.failure("remote delivery of {id} failed unexpectedly", id=envelope.id)
                reason = f"451 4.3.0 internal error during delivery: {type(e).__name__}: {e}"
                return [DeliveryResult(r, Outcome.DEFERRED, reason, "", "4.3.0") for r in recipients]

        return Deferred.fromCoroutine(guarded())

    async def _deliver(self, envelope: Envelope, recipients: list[Recipient],
                       data_path: Path) -> list[DeliveryResult]:
        # One transaction per destination and envelope sender: forwarded recipients
        # carry the SRS-rewritten sender the server recorded (mta.policy.srs).
        srs_sender = envelope.extra.get("srs_sender", "")
        srs_recipients = set(envelope.extra.get("srs_recipients", ()))
        groups: dict[tuple[str, str], list[Recipient]] = {}
        for r in recipients:
            domain = "" if self.delivery.smarthosts else _domain(r.address)
            sender = srs_sender if srs_sender and r.address in srs_recipients else envelope.sender
            groups.setdefault((domain, sender), []).append(r)
        size = envelope.size or os.stat(data_path).st_size
        if len(groups) == 1:  # most mail: one destination, awaited here without a gather
            ((domain, sender), group), = groups.items()
            lists = [await self._deliver_group(envelope, domain, group, data_path, size, sender)]
        else:
            lists = await gatherResults([
                Deferred.fromCoroutine(self._deliver_group(envelope, domain, group, data_path,
                                                           size, sender))
                for (domain, sender), group in groups.items()
            ])
        by_id = {id(res.recipient): res for results in lists for res in results}
        return [by_id[id(r)] for r in recipients]

    async def _next_hops(self, domain: str, relaxed: bool = False) -> list[NextHop]:
        d = self.delivery
        if d.smarthosts:
            hops = []
            per_relay = {name: (tls, user, password) for name, tls, user, password in d.relays}
            for text in d.smarthosts:
                host, port = parse_smarthost(text)
                tls, user, password = per_relay.get(
                    text, (d.smarthost_tls, d.smarthost_username, d.smarthost_password))
                hops.append(NextHop(host, port, host, tls, user, password))
            return hops
        answer = self.resolver.resolve(domain)
        hosts = await answer if inspect.isawaitable(answer) else answer
        if self.dane is not None and not relaxed:
            return await self._dane_hops(domain, hosts)
        if relaxed and d.tls_policy in ("dane", "dane-only"):
            return [NextHop(address, d.mx_port, mx.name, "opportunistic")
                    for mx in hosts for address in mx.addresses]
        return [NextHop(address, d.mx_port, mx.name, d.tls_policy)
                for mx in hosts for address in mx.addresses]

    async def _dane_hops(self, domain: str, hosts: list[Any]) -> list[NextHop]:
        """The hops with the TLS policy DANE gives each host (before any other policy)."""
        d = self.delivery
        base = "opportunistic" if d.tls_policy in ("dane", "dane-only") else d.tls_policy
        plan = await self.dane.plan(domain, hosts) or {}
        hops = []
        for mx in hosts:
            host = plan.get(mx.name)
            for address in mx.addresses:
                if host is None or (host.tls_policy is None and host.refusal is None):
                    hops.append(NextHop(address, d.mx_port, mx.name, base))
                else:
                    hops.append(NextHop(address, d.mx_port, mx.name, host.tls_policy or base,
                                        verifier=host.verifier, refusal=host.refusal))
        return hops

    async def _deliver_group(self, envelope: Envelope, domain: str, recipients: list[Recipient],
                             data_path: Path, size: int, sender: str) -> list[DeliveryResult]:
        """One destination; an unexpected error defers this group only."""
        try:
            return await self._deliver_to(envelope, domain, recipients, data_path, size, sender)
        except Exception as e:
            log.failure("remote delivery of {id} to {domain} failed unexpectedly", id=envelope.id,
                        domain=domain or "smarthost")
            reason = f"451 4.3.0 internal error during delivery: {type(e).__name__}: {e}"
            return [DeliveryResult(r, Outcome.DEFERRED, reason, "", "4.3.0") for r in recipients]

    def _reusable_hop(self, domain: str) -> NextHop | None:
        """The hop of the domain's last message if its connection is idle in the cache."""
        hop = self._recent.get(domain) if domain else None
        if hop is None:
            return None
        if self.cache.has(self._cache_key(hop)):
            return hop
        del self._recent[domain]
        return None

    def _cache_key(self, hop: NextHop) -> tuple[Any, ...]:
        return cache_key(hop.host, hop.port, hop.display, self._options(hop))

    async def _deliver_to(self, envelope: Envelope, domain: str, recipients: list[Recipient],
                          data_path: Path, size: int, sender: str) -> list[DeliveryResult]:
        waiting: dict[str, list[Recipient]] = {}
        for r in recipients:
            waiting.setdefault(r.address, []).append(r)
        results: list[DeliveryResult] = []
        last = (f"no mail server found for {domain}", "4.4.4", "")  # error, status, server

        async def attempt(hop: NextHop) -> None:
            nonlocal last
            if hop.refusal is not None:  # DANE: this host must not be used (RFC 7672 §2.2)
                last = (f"{hop.display}: {hop.refusal}", "4.7.5", hop.name)
                return
            tx = OutboundMessage(sender=sender, recipients=list(waiting), data_path=data_path,
                                 size=size, body_8bit=envelope.body_8bit, smtputf8=envelope.smtputf8,
                                 binarymime=envelope.binarymime, requiretls=envelope.requiretls)
            if envelope.dsn:
                _add_dsn(tx, envelope, waiting)
            session = await self._attempt(hop, tx)
            if hop.verifier is not None:
                self.dane.outcome(domain, hop.name, hop.verifier, bool(session.tls),
                                  session.connection_error)
            dsn = session.transactions[0].dsn
            for address, reply in session.transactions[0].replies.items():
                for r in waiting.pop(address, []):
                    results.append(DeliveryResult(r, reply.outcome, str(reply), hop.name,
                                                  reply.enhanced, tls=session.tls,
                                                  dsn_passed=dsn and bool(r.notify or r.orcpt),
                                                  tls_verified=session.tls_verified))
            if session.connection_error is not None:
                last = (f"{hop.display}: {session.connection_error}",
                        session.error_status or "4.4.2", hop.name)
            elif domain and self.cache.enabled:
                if len(self._recent) >= MAX_RECENT and domain not in self._recent:
                    self._recent.clear()
                self._recent[domain] = hop

        reused = self._reusable_hop(domain)
        if reused is not None:
            await attempt(reused)
        if waiting:
            try:
                hops = await self._next_hops(domain, self._relaxed(envelope, domain, data_path))
            except DNSError as e:
                outcome = Outcome.FAILED if e.permanent else Outcome.DEFERRED
                for group in waiting.values():
                    results.extend(DeliveryResult(r, outcome, e.reply, "", e.status) for r in group)
                return results
            for hop in hops:
                if not waiting:
                    break
                if hop != reused:
                    await attempt(hop)
        last_error, last_status, last_server = last
        outcome = Outcome.DEFERRED
        if envelope.requiretls and last_status in REQUIRETLS_FAILURES:
            # RFC 8689 §5: no server could take it as REQUIRETLS asks: a non-delivery notice.
            outcome, last_error = Outcome.FAILED, f"550 {last_status} {last_error}"
        for group in waiting.values():
            for r in group:
                results.append(DeliveryResult(r, outcome, last_error, last_server, last_status))
        return results

    def _relaxed(self, envelope: Envelope, domain: str, data_path: Path) -> bool:
        """RFC 8689 §4.1/§5: ``TLS-Required: No`` asks that the recipient domain's
        policies (DANE here, MTA-STS) be ignored: opportunistic TLS then.  Our own
        configured policies (verify, require, credentials) still hold, and the header
        is ignored for a REQUIRETLS message.  Only read when DANE is configured."""
        if self.dane is None or not domain or envelope.requiretls:
            return False
        if not tls_required_no(data_path):
            return False
        log.info("{id}: TLS-Required: No; DANE is not applied for {domain}", id=envelope.id,
                 domain=domain, event="dane", mx="", result="tls-required-no")
        return True

    def _options(self, hop: NextHop, policy: str | None = None) -> ClientOptions:
        return ClientOptions(
            helo_name=self.helo_name,
            tls_policy=policy or hop.tls_policy,
            tls_hostname=hop.name,
            trust_root=self.trust_root,
            username=hop.username,
            password=hop.password,
            timeouts=self.timeouts,
            peer_verifier=hop.verifier,
        )

    async def _attempt(self, hop: NextHop, tx: OutboundMessage) -> SessionResult:
        session = await send(self.reactor, (hop.host, hop.port), [tx], self._options(hop),
                             clock=self.clock, server=hop.display, cache=self.cache)
        if session.tls_failed and hop.tls_policy == "opportunistic":
            unanswered = session.transactions[0].unanswered()
            if unanswered:
                log.info("TLS with {server} failed ({error}); trying again in plaintext",
                         server=hop.display, error=session.connection_error)
                retry = replace(tx, recipients=unanswered)
                again = await send(self.reactor, (hop.host, hop.port), [retry],
                                   self._options(hop, "none"), clock=self.clock,
                                   server=hop.display, cache=self.cache)
                again.transactions[0].replies = {**session.transactions[0].replies,
                                                 **again.transactions[0].replies}
                return again
        return session


def _add_dsn(tx: OutboundMessage, envelope: Envelope, waiting: dict[str, list[Recipient]]) -> None:
    """Give ``tx`` the DSN parameters to pass on (RFC 3461 §5.2.1 ff.).  Recipients
    that share an address share one RCPT: the first with parameters speaks for it."""
    tx.dsn_mail = mail_params(envelope.ret, envelope.envid)
    tx.dsn_rcpt = {}
    for address, group in waiting.items():
        for r in group:
            params = rcpt_params(r.notify, r.orcpt, r.original)
            if params:
                tx.dsn_rcpt[address] = params
                break


HEADER_READ = 64 * 1024  # the part of a message looked at for TLS-Required


def tls_required_no(data_path: Path) -> bool:
    """Whether the message's header section has ``TLS-Required: No`` (RFC 8689 §4.1,
    case-insensitive, folding allowed)."""
    try:
        head = QueuedMessage(data_path).read_start(HEADER_READ)
    except OSError:
        return False
    section = head.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in section.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False
