"""The remote courier: routes recipients to a smarthost or to their domain's MX hosts.

It implements :class:`mta.queue.courier.Courier`.  For each destination (all
recipients for a smarthost; one domain for MX delivery) it tries the servers in
order -- each address of each MX host, or each configured smarthost -- with
:func:`mta.delivery.client.send`, and stops at the first server that gives
every recipient a final answer (RFC 5321 §5.1: "try the next address on a
temporary failure").  Recipients still without an answer after the last server
are DEFERRED with the last error.  A permanent DNS error (no such domain, null
MX) fails the domain's recipients; a temporary one defers them.

Which servers, and with which TLS policy, credentials, port, source address
and HELO name, the route table decides (:mod:`mta.delivery.routes`:
``[delivery.route."KEY"]`` entries over the global settings); a domain with
an entry gets its own transaction even with global smarthosts.  Each new
connection's TLS outcome is one ``tls_outcome`` event
(:mod:`mta.delivery.tlsoutcome`).

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

MTA-STS (RFC 8461, :mod:`mta.delivery.mtasts`, with ``[delivery.mta_sts]`` enabled)
is asked for each MX domain before its hops are tried: under ``enforce`` the MX
hosts its patterns do not name are left out and the others are tried with the
``verify`` TLS policy (a failure defers, never a clear-text retry); under
``testing`` each host is tried with ``verify`` first and, if TLS fails, as
without a policy; either way each TLS outcome is counted for the TLS report
(RFC 8460, :mod:`mta.delivery.tlsrpt`).  Precedence: an entry of the routing
table for the domain, when there is one, overrides both DANE and MTA-STS;
DANE goes first (RFC 8461 §2): a host DANE gave a policy (usable TLSA
records) or refused (bogus) is left as DANE says, and MTA-STS applies to the
hosts without usable TLSA records; ``TLS-Required: No`` (RFC 8689 §4.1)
turns MTA-STS off for the message, as it does DANE.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

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
from mta.delivery.mtasts import STSPolicy
from mta.delivery.mx import DNSError
from mta.delivery.routes import (
    LEVEL,
    Policy,
    RouteError,
    RouteTable,
    Target,
)
from mta.delivery.tlsoutcome import log_tls_outcome
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
    password: str | None = field(default=None, repr=False)
    # DANE (mta.delivery.dane): the TLSA check under "dane", or why the host is not used.
    verifier: Any = field(default=None, compare=False)
    refusal: str | None = field(default=None, compare=False)
    # The MTA-STS policy this hop is tried under (None: no policy applies).
    sts: STSPolicy | None = None
    # From the route table (mta.delivery.routes): the policy with its source, the
    # source addresses (v4, v6) and the HELO name; None: the global settings.
    policy: Policy | None = None
    bind_address: str | None = None
    bind_address6: str | None = None
    helo_name: str | None = None
    # RFC 8689 §4.2.1: the name is authenticated (configured, a smarthost or a
    # table's next hop; in a DNSSEC-validated MX RRset; or named by the domain's
    # MTA-STS policy): only then may a REQUIRETLS message go to it.
    mx_authenticated: bool = False

    @property
    def display(self) -> str:
        return self.name if self.name == self.host else f"{self.name}[{self.host}]"


class STSPolicies(Protocol):
    """What the courier asks of MTA-STS (:class:`mta.delivery.mtasts.MTASTS`)."""

    trust_root: Any  # MX certificates under a policy chain to it (None: the courier's)

    def policy(self, domain: str) -> Deferred[STSPolicy | None]: ...

    def stop(self) -> None: ...


class TLSCounter(Protocol):
    """Where TLS outcomes are counted (:class:`mta.delivery.tlsrpt.TLSReporter`)."""

    def record(self, domain: str, policy_type: str, result: str, mx: str = "",
               details: dict[str, str] | str | None = None, *,
               policy_string: Sequence[str] = (), mx_patterns: Sequence[str] = ()) -> None: ...

    def stop(self) -> None: ...


def _hop(target: Target, host: str, name: str, **changes: Any) -> NextHop:
    values: dict[str, Any] = {
        "tls_policy": target.policy.client_policy, "username": target.username,
        "password": target.password, "policy": target.policy,
        "bind_address": target.bind_address, "bind_address6": target.bind_address6,
        "helo_name": target.helo_name}
    return NextHop(host, target.port, name, **{**values, **changes})


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class RemoteCourier:
    def __init__(self, config: Config, mx_resolver: Any, reactor: Any, trust_root: Any = None, *,
                 timeouts: Timeouts | None = None, clock: Any = None, dane: Any = None,
                 sts: STSPolicies | None = None, tlsrpt: TLSCounter | None = None) -> None:
        self.delivery = config.delivery
        self.dane = dane  # a mta.delivery.dane.DanePolicy, or None without DANE
        self.helo_name = config.delivery.helo_name or config.hostname
        # The per-destination route table (mta.delivery.routes): its entries' levels
        # override DANE and MTA-STS for their domains.
        self.routes = RouteTable(config.delivery)
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
        # MTA-STS policies (mta.delivery.mtasts.MTASTS) and the TLS report counts
        # (mta.delivery.tlsrpt.TLSReporter); None when not configured.
        self.sts = sts
        self.tlsrpt = tlsrpt

    def close(self) -> Deferred[Any]:
        """Close the cached connections (QUIT); fires when they are gone."""
        for part in (self.sts, self.tlsrpt):
            if part is not None:
                part.stop()
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
            domain = self.routes.group(_domain(r.address))
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
        """The servers to try for ``domain`` ("" for the global smarthosts), as the
        route table (:mod:`mta.delivery.routes`) decides, MX hosts looked up; DANE
        for MX hosts unless a table level other than "dane" is set (or ``relaxed``:
        TLS-Required: No), then MTA-STS."""
        route = self.routes.route(domain)
        policy = route.targets[0].policy
        mechanism = policy.mechanism
        # The table's "dane" demands DANE (delivery.tls_policy "dane" keeps main's
        # meaning: DANE when it can be used, else the other policy).
        dane_required = mechanism == "dane" and policy.source == "table"
        if dane_required and self.dane is None and not relaxed:
            raise RouteError(f"TLS policy dane for {domain} ({policy.origin}) needs DANE, "
                             "which is not available here ([dane] is not enabled)")
        use_dane = (self.dane is not None and not relaxed and route.kind == "mx"
                    and (route.consult_mechanisms or mechanism == "dane"))
        hops: list[NextHop] = []
        for target in route.targets:
            if not target.mx_lookup:
                hops.append(_hop(target, target.host, target.host, mx_authenticated=True))
                continue
            answer = self.resolver.resolve(target.host)
            hosts = await answer if inspect.isawaitable(answer) else answer
            if use_dane and target.via == "mx":
                hops.extend(await self._dane_hops(domain, hosts, target, dane_required))
            else:
                hops.extend(_hop(target, address, mx.name)
                            for mx in hosts for address in mx.addresses)
        if mechanism == "mta-sts" and policy.source == "table" and not relaxed:
            # The table demands MTA-STS: without it, or without a policy, nothing goes out.
            if self.sts is None:
                raise RouteError(f"TLS policy mta-sts for {domain} ({policy.origin}) needs "
                                 "MTA-STS, which is not available here ([delivery.mta_sts] "
                                 "is not enabled)")
            if await self.sts.policy(domain) is None:
                raise RouteError(f"TLS policy mta-sts for {domain} ({policy.origin}): the "
                                 "domain has no MTA-STS policy")
        return hops

    async def _dane_hops(self, domain: str, hosts: list[Any], target: Target,
                         required: bool = False) -> list[NextHop]:
        """The hops with the TLS policy DANE gives each host (before any other policy);
        the others get the target's.  ``required``: the route table says "dane", so a
        DANE that cannot be used (its resolver does not validate) defers the domain."""
        plan = await self.dane.plan(domain, hosts)
        if plan is None and required and not self.dane.available:
            raise RouteError(f"TLS policy dane for {domain} ({target.policy.origin}) needs DANE, "
                             f"which is not available: {self.dane.check_problem or 'not checked'}")
        secure = plan is not None  # the MX RRset validated (dane.DanePolicy.plan)
        plan = plan or {}
        base = target.policy.client_policy
        hops = []
        for mx in hosts:
            host = plan.get(mx.name)
            authenticated = secure and host is not None and host.secure_mx
            for address in mx.addresses:
                if host is None or (host.tls_policy is None and host.refusal is None):
                    hops.append(_hop(target, address, mx.name, mx_authenticated=authenticated))
                else:
                    # RFC 7672: the host's TLSA records decide (usable: "dane"; present
                    # but none usable: encrypted, unauthenticated).
                    level = "dane" if host.tls_policy == "dane" else "encrypt"
                    hops.append(_hop(target, address, mx.name, tls_policy=host.tls_policy or base,
                                     verifier=host.verifier, refusal=host.refusal,
                                     mx_authenticated=authenticated,
                                     policy=Policy(level, "dane", f"TLSA _25._tcp.{mx.name}")))
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
        # Whether a server was tried, and whether one got as far as a transaction:
        # tried but none did means the destination is down (DeliveryResult.destination_down).
        tried = reached = False

        async def attempt(hop: NextHop) -> None:
            nonlocal last, tried, reached
            if hop.refusal is not None:  # DANE: this host must not be used (RFC 7672 §2.2)
                last = (f"{hop.display}: {hop.refusal}", "4.7.5", hop.name)
                return
            if envelope.requiretls and not hop.mx_authenticated:
                # RFC 8689 §4.2.1: a verified certificate for a name an insecure MX
                # answer gave proves nothing; 5.7.10 (§5) when no host is left.
                last = (f"REQUIRETLS: the MX host {hop.display} of {domain} is not "
                        "authenticated by DNSSEC or an MTA-STS policy (RFC 8689 §4.2.1)",
                        "5.7.10", hop.name)
                return
            tx = OutboundMessage(sender=sender, recipients=list(waiting), data_path=data_path,
                                 size=size, body_8bit=envelope.body_8bit, smtputf8=envelope.smtputf8,
                                 binarymime=envelope.binarymime, requiretls=envelope.requiretls)
            if envelope.dsn:
                _add_dsn(tx, envelope, waiting)
            session = await self._attempt(hop, tx, domain)
            tried = True
            reached = reached or session.connection_error is None or bool(
                session.transactions[0].replies)
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

        policy = await self.sts.policy(domain) if self.sts is not None and domain \
            and self._sts_applies(domain) else None
        reused = self._reusable_hop(domain)
        if reused is not None and self.sts is not None and not _sts_allows(reused, policy):
            reused = None
        if reused is not None:
            await attempt(reused)
        if waiting:
            try:
                relaxed = self._relaxed(envelope, domain, data_path)
                hops = await self._next_hops(domain, relaxed)
            except (DNSError, RouteError) as e:
                outcome = Outcome.FAILED if e.permanent else Outcome.DEFERRED
                for group in waiting.values():
                    results.extend(DeliveryResult(r, outcome, e.reply, "", e.status) for r in group)
                return results
            if policy is not None and not relaxed:
                hops, refused = _sts_hops(policy, hops)
                if not hops:  # RFC 8461 §4.1: no MX host matches under enforce
                    names = ", ".join(dict.fromkeys(h.name for h in refused))
                    last = (f"451 4.7.0 no MX host of {domain} matches its MTA-STS policy "
                            f"({names})", "4.7.0", "")
                    self._record_sts_mismatch(domain, policy, refused)
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
        down = tried and not reached
        for group in waiting.values():
            for r in group:
                results.append(DeliveryResult(r, outcome, last_error, last_server, last_status,
                                              destination_down=down))
        return results

    def _sts_applies(self, domain: str) -> bool:
        """MTA-STS is asked for MX delivery to a domain whose route table entry sets no
        TLS level, or sets "mta-sts" (an entry's level overrides it)."""
        route = self.routes.route(domain)
        return route.kind == "mx" and (route.consult_mechanisms
                                       or route.targets[0].policy.level == "mta-sts")

    def _relaxed(self, envelope: Envelope, domain: str, data_path: Path) -> bool:
        """RFC 8689 §4.1/§5: ``TLS-Required: No`` asks that the recipient domain's
        policies (DANE here, MTA-STS) be ignored: opportunistic TLS then.  Our own
        configured policies (verify, require, credentials) still hold, and the header
        is ignored for a REQUIRETLS message.  Only read when DANE or MTA-STS is
        configured."""
        if (self.dane is None and self.sts is None) or not domain or envelope.requiretls:
            return False
        if not tls_required_no(data_path):
            return False
        log.info("{id}: TLS-Required: No; DANE and MTA-STS are not applied for {domain}",
                 id=envelope.id, domain=domain, event="dane", mx="", result="tls-required-no")
        return True

    def _options(self, hop: NextHop, policy: str | None = None) -> ClientOptions:
        return ClientOptions(
            helo_name=hop.helo_name or self.helo_name,
            tls_policy=policy or hop.tls_policy,
            tls_hostname=hop.name,
            trust_root=self.trust_root,
            username=hop.username,
            password=hop.password,
            timeouts=self.timeouts,
            peer_verifier=hop.verifier,
            bind_address=hop.bind_address,
            bind_address6=hop.bind_address6,
        )

    async def _attempt(self, hop: NextHop, tx: OutboundMessage, domain: str = "") -> SessionResult:
        if hop.sts is not None:
            return await self._sts_attempt(hop, tx, domain)
        session = await send(self.reactor, (hop.host, hop.port), [tx], self._options(hop),
                             clock=self.clock, server=hop.display, cache=self.cache)
        _tls_outcome(domain, hop, session)
        if session.tls_failed and hop.tls_policy == "opportunistic":
            unanswered = session.transactions[0].unanswered()
            if unanswered:
                log.info("TLS with {server} failed ({error}); trying again in plaintext",
                         server=hop.display, error=session.connection_error)
                retry = replace(tx, recipients=unanswered)
                again = await send(self.reactor, (hop.host, hop.port), [retry],
                                   self._options(hop, "none"), clock=self.clock,
                                   server=hop.display, cache=self.cache)
                _tls_outcome(domain, hop, again)
                again.transactions[0].replies = {**session.transactions[0].replies,
                                                 **again.transactions[0].replies}
                return again
        return session

    # --- MTA-STS (RFC 8461) ---------------------------------------------------------

    def _record_sts(self, policy: STSPolicy, result: str, hop: NextHop, reason: str = "",
                    local_ip: str = "") -> None:
        if self.tlsrpt is None:
            return
        details = {"receiving-ip": hop.host, "sending-mta-ip": local_ip}
        if reason:
            details["failure-reason-code"] = reason[:200]
        self.tlsrpt.record(policy.domain, "sts", result, hop.name, details,
                           policy_string=policy.lines(), mx_patterns=policy.mx)

    def _record_sts_mismatch(self, domain: str, policy: STSPolicy, refused: list[NextHop]) -> None:
        log.warn("MTA-STS (enforce): no MX host of {domain} matches {patterns}; deferred",
                 domain=domain, patterns=" ".join(policy.mx), event="mta_sts",
                 result="mx_mismatch")
        for name in dict.fromkeys(h.name for h in refused):
            hop = next(h for h in refused if h.name == name)
            self._record_sts(policy, "validation-failure", hop, "MX host not in the MTA-STS policy")

    async def _sts_attempt(self, hop: NextHop, tx: OutboundMessage, domain: str = "") -> SessionResult:
        """One server under an STS policy: ``verify`` TLS; under ``testing`` a TLS
        failure (or an MX not in the patterns) is counted, then the server is
        tried as without a policy (RFC 8461 §5)."""
        from mta.delivery.tlsrpt import tls_result

        policy = hop.sts
        assert policy is not None
        base = self.delivery.tls_policy
        if base in ("dane", "dane-only"):  # a host DANE left alone: as _dane_hops gives it
            base = "opportunistic"
        plain = replace(hop, sts=None, tls_policy=base,
                        policy=Policy(LEVEL.get(base, base), "default", "delivery.tls_policy"))
        if policy.mode == "testing" and not policy.matches(hop.name):
            self._record_sts(policy, "validation-failure", hop, "MX host not in the MTA-STS policy")
            return await self._attempt(plain, tx, domain)
        options = self._options(hop)
        if self.sts is not None and self.sts.trust_root is not None:
            options = replace(options, trust_root=self.sts.trust_root)
        session = await send(self.reactor, (hop.host, hop.port), [tx], options, clock=self.clock,
                             server=hop.display, cache=self.cache)
        _tls_outcome(domain, hop, session)
        result = tls_result(session)
        if result is None:
            return session  # no TLS outcome (connection refused, 421 greeting): nothing to count
        self._record_sts(policy, result, hop, "" if result == "success" else
                         (session.connection_error or ""), session.local_ip)
        if result == "success":
            return session
        log.info("MTA-STS ({mode}) TLS with {server} failed: {error}", mode=policy.mode,
                 server=hop.display, error=session.connection_error, event="mta_sts",
                 result=result, domain=policy.domain)
        if policy.mode == "testing" and not session.transactions[0].replies:
            return await self._attempt(plain, tx, domain)
        return session


def _tls_outcome(domain: str, hop: NextHop, session: SessionResult) -> None:
    """The TLS outcome event of a new session (a reused connection had its own)."""
    if not (session.tls_checked or session.tls_failure):
        return  # reused, or failed before the TLS step (connect, greeting, EHLO)
    policy = hop.policy or Policy(LEVEL.get(hop.tls_policy, hop.tls_policy), "default",
                                  "delivery.tls_policy")
    log_tls_outcome(domain=domain, server=hop.display, policy=policy.level, source=policy.source,
                    origin=policy.origin, tls=session.tls, verified=session.tls_verified,
                    failure=session.tls_failure, error=session.connection_error or "")


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


# --- MTA-STS helpers ---------------------------------------------------------------------


def _sts_hops(policy: STSPolicy, hops: list[NextHop]) -> tuple[list[NextHop], list[NextHop]]:
    """(hops to try, hops refused) under ``policy``, in MX order: a hop DANE decided
    (a TLSA verifier, or a refusal) stays as DANE says (RFC 8461 §2); under
    ``enforce`` a hop whose name matches no pattern is refused (§4.1); the
    rest are tried under the policy."""
    kept, refused = [], []
    for hop in hops:
        if hop.verifier is not None or hop.refusal is not None:
            kept.append(hop)
        elif policy.mode == "enforce" and not policy.matches(hop.name):
            refused.append(hop)
        else:
            kept.append(_under_sts(hop, policy))
    return kept, refused


def _under_sts(hop: NextHop, policy: STSPolicy) -> NextHop:
    """``hop`` tried under ``policy``: TLS with the certificate verified for the MX name."""
    return replace(hop, sts=policy, tls_policy="verify",
                   mx_authenticated=hop.mx_authenticated or policy.matches(hop.name),
                   policy=Policy("mta-sts", "mta-sts", f"MTA-STS {policy.mode} policy id "
                                 f"{policy.id}"))


def _sts_allows(hop: NextHop, policy: STSPolicy | None) -> bool:
    """Whether a cached connection opened for ``hop`` may carry mail under ``policy``."""
    if policy is None:
        return hop.sts is None
    return hop.sts == policy and (policy.mode != "enforce" or policy.matches(hop.name))
