"""``mta route explain ADDRESS``: every step of the routing decision for one recipient.

:func:`explain` walks what the daemon would do with mail to ``ADDRESS``
without sending anything: whether the domain is local, the alias expansion
(through the configured aliases files), then per target the route (Maildir,
LMTP, delivery command, pipe, a smarthost, or the MX list with preferences
and addresses, looked up through the configured DNS servers), the TLS policy
that applies and where it came from (:mod:`mta.delivery.routes`), and what a
delivery requires (TLS, the name the certificate is verified against, port,
source address, HELO name, AUTH user; never the password).

The result is a list of *steps*, each ``{"step", "source", "detail"}``: the
step's kind, where its decision came from (a configuration key, a file,
``dns``) and one readable line.  DANE (:mod:`mta.delivery.dane`, with
``[dane]`` enabled) adds a ``dane`` step per MX host, asked of the validating
resolver as the courier asks it (the TLSA records, or why DANE does not
apply); MTA-STS (:mod:`mta.delivery.mtasts`) a ``mta-sts`` step with the
domain's cached policy (mode, MX patterns, id, its age and max_age), read
from the daemon's cache without fetching.  The
JSON form (``--json``, ``"version": 1``) adds the structured ``deliveries``:
one per target, with ``kind``, ``address``, ``route`` and, for remote mail,
``entry`` (the table key or null), ``tls`` (``level``, ``source``,
``origin``, ``required``, ``verified``) and ``hops`` (``name``,
``preference``, ``addresses``, ``port``, ``verify_name``; with DANE also
``dane``: ``dane`` (TLSA-authenticated), ``encrypt`` (TLSA present, none
usable), ``refused`` (bogus: not used) or ``none``), ``bind_address``,
``bind_address6``, ``helo_name``, ``auth_user`` and ``error`` (a DNS or
policy error that would defer or bounce it, else null).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mta.config import Config
from mta.delivery.mx import DNSError, MXResolver
from mta.delivery.routes import Route, RouteTable, Target

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Step:
    step: str
    source: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"step": self.step, "source": self.source, "detail": self.detail}


TLS_MEANING = {
    "none": "no STARTTLS: clear text",
    "may": "STARTTLS when offered, certificate not checked; clear text otherwise",
    "encrypt": "STARTTLS required, certificate not checked",
    "verify": "STARTTLS required, certificate verified (RFC 6125)",
    "dane": "DANE (RFC 7672): hosts with usable TLSA records authenticated by them, "
            "the others as may",
    "dane-only": "DANE required on every host (RFC 7672)",
    "mta-sts": "MTA-STS required (RFC 8461)",
}


class Explainer:
    """Builds the steps for one address; ``resolver`` is an :class:`MXResolver`
    (or anything with its ``resolve``), ``dane`` the daemon's DanePolicy (or
    None); MTA-STS policies are read from the daemon's on-disk cache."""

    def __init__(self, config: Config, resolver: MXResolver, dane: Any = None,
                 clock: Any = time.time, local_domains: Any = None) -> None:
        self.config = config
        # The directory's local domains (an SQL directory has its own; None: the files').
        self.local_domains = config.local_domains if local_domains is None else local_domains
        self.sql = config.directory.backend != "files"
        self.resolver = resolver
        self.dane = dane  # a mta.delivery.dane.DanePolicy when [dane] is enabled
        self.table = RouteTable(config.delivery)
        self.clock = clock
        self.sts_enabled = config.delivery_sts.enabled
        self._sts_cache: dict[str, Any] | None = None
        self.steps: list[Step] = []
        self.deliveries: list[dict[str, Any]] = []

    def add(self, step: str, source: str, detail: str) -> None:
        self.steps.append(Step(step, source, detail))

    async def explain(self, address: Any, targets: list[Any], refused: str | None) -> dict[str, Any]:
        config = self.config
        self.add("recipient", "argument", str(address))
        domain = address.domain
        domains_source = f"directory ({config.directory.backend})" if self.sql else "local_domains"
        if domain in self.local_domains:
            self.add("domain", domains_source, f"{domain} is a local domain")
        else:
            self.add("domain", domains_source, f"{domain} is not local: relayed, for "
                     "authenticated senders and relay_networks only")
        if refused is not None:
            self.add("refused", "recipient check", refused)
            return self.result(address)
        plain = [(t.kind, t.address) for t in targets] == [("local", str(address))] or \
            [(t.kind, t.address) for t in targets] == [("remote", str(address))]
        aliases_source = (f"directory ({config.directory.backend})" if self.sql
                          else str(config.aliases_file(domain)))
        if domain in self.local_domains and not plain:
            shown = ", ".join(t.address if t.kind != "pipe" else f"| {t.address}" for t in targets)
            self.add("alias", aliases_source, f"{address} expands to {shown}")
        for target in targets:
            if target.kind == "local":
                self.local(target)
            elif target.kind == "pipe":
                self.add("route", aliases_source, f"pipe to the command "
                         f"{target.address!r} (delivery.pipe_timeout {config.delivery.pipe_timeout:g}s)")
                self.deliveries.append({"kind": "pipe", "address": target.address, "route": "pipe"})
            else:
                await self.remote(target.address)
        return self.result(address)

    def result(self, address: Any) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "address": str(address),
                "steps": [s.as_dict() for s in self.steps], "deliveries": self.deliveries}

    # --- local ------------------------------------------------------------------------

    def local(self, target: Any) -> None:
        d = self.config.delivery
        if not target.mailbox:
            self.add("route", "users and aliases", f"{target.address}: no such user or alias: "
                     "refused with 550 5.1.1")
            self.deliveries.append({"kind": "local", "address": target.address, "route": "none"})
            return
        if d.lmtp:
            route, source, detail = "lmtp", "delivery.lmtp", f"LMTP to {d.lmtp} for {target.mailbox}"
        elif d.mailbox_command:
            route, source = "command", "delivery.mailbox_command"
            detail = f"delivery command {d.mailbox_command!r} for {target.mailbox}"
        else:
            user, _, mail_domain = target.mailbox.rpartition("@")
            route, source = "maildir", "mail_dir"
            detail = f"Maildir {self.config.mail_dir / mail_domain / user}"
        self.add("route", source, detail)
        self.deliveries.append({"kind": "local", "address": target.address, "route": route,
                                "mailbox": target.mailbox})

    # --- remote -----------------------------------------------------------------------

    async def remote(self, address: str) -> None:
        domain = address.rpartition("@")[2].lower()
        route = self.table.route(domain)
        entry = route.entry
        where = f'delivery.route."{entry.key}"' if entry is not None else None
        if route.kind == "mx":
            self.add("route", where or "default", f"MX delivery for {domain}" +
                     ("" if where else " (no route table entry)"))
        elif route.kind == "table":
            text = route.targets[0].text
            how = "its MX records" if route.targets[0].mx_lookup else "no MX lookup"
            self.add("route", f"{where}.smarthost", f"smarthost {text} ({how})")
        else:
            self.add("route", "delivery.smarthosts", "smarthost " + ", ".join(
                t.text for t in route.targets) + (f" (route table entry {entry.key})" if entry
                                                  else ""))
        record: dict[str, Any] = {"kind": "remote", "address": address, "route": route.kind,
                                  "entry": entry.key if entry is not None else None, "hops": [],
                                  "error": None}
        first = route.targets[0]
        hops: list[dict[str, Any]] = []
        error = None
        for target in route.targets:
            try:
                hops.extend(await self.hops(target, route))
            except DNSError as e:
                error = e.reply
                self.add("mx", "dns", f"{target.host}: {e.reply} (the message would "
                         f"{'bounce' if e.permanent else 'be deferred'})")
        self.tls(route, first)
        record["hops"] = hops
        policy = first.policy
        record["tls"] = {"level": policy.level, "source": policy.source, "origin": policy.origin,
                         "required": policy.requires_tls, "verified": policy.verifies}
        missing = (self.dane is None or not self.dane.available) if policy.mechanism == "dane" \
            else policy.mechanism == "mta-sts" and self.sts_policy(domain) is None
        if missing and policy.source == "table":
            error = (f"451 4.7.5 TLS policy {policy.mechanism} for {domain} ({policy.origin}) "
                     f"needs {policy.mechanism.upper()}, which is not available here")
        record.update(bind_address=first.bind_address, bind_address6=first.bind_address6,
                      helo_name=first.helo_name or self.config.hostname,
                      auth_user=first.username, error=error)
        self.requires(record, hops)
        self.deliveries.append(record)

    async def hops(self, target: Target, route: Route) -> list[dict[str, Any]]:
        if not target.mx_lookup:
            self.add("host", "configuration", f"{target.host} port {target.port}")
            return [{"name": target.host, "preference": None, "addresses": [], "port": target.port,
                     "verify_name": target.host if target.policy.verifies else None}]
        hosts = await self.resolver.resolve(target.host)
        out = []
        for mx in hosts:
            self.add("mx", "dns", f"preference {mx.preference}: {mx.name} "
                     f"({', '.join(mx.addresses)})")
            out.append({"name": mx.name, "preference": mx.preference,
                        "addresses": list(mx.addresses), "port": target.port,
                        "verify_name": mx.name if target.policy.level in ("verify", "mta-sts")
                        else None})
        if self.dane is not None and route.kind == "mx" and (
                route.consult_mechanisms or target.policy.mechanism == "dane"):
            await self.dane_steps(route.domain, hosts, out)
        return out

    async def dane_steps(self, domain: str, hosts: list[Any], out: list[dict[str, Any]]) -> None:
        """What DANE (mta.delivery.dane) decides for each MX host, as the courier asks it."""
        plan = await self.dane.plan(domain, hosts)
        if plan is None:
            why = (f"the validating resolver does not validate: {self.dane.check_problem}"
                   if not self.dane.available else "the MX records are not DNSSEC-signed "
                   "(insecure) or the domain is a literal")
            self.add("dane", "dns (validating resolver)", f"DANE does not apply to {domain}: {why}")
            return
        for hop in out:
            host = plan.get(hop["name"])
            source = f"TLSA _25._tcp.{hop['name']}"
            if host is None or (host.tls_policy is None and host.refusal is None):
                detail = f"{hop['name']}: no usable DANE (no TLSA records, or not secure): " \
                         "the other policy applies"
                hop["dane"] = "none"
            elif host.refusal is not None:
                detail = f"{hop['name']}: not used: {host.refusal}"
                hop["dane"] = "refused"
            elif host.tls_policy == "dane":
                records = ", ".join(str(r) for r in host.verifier.records)
                detail = (f"{hop['name']}: TLS required, the certificate must match {records}")
                hop["dane"] = "dane"
                hop["verify_name"] = "TLSA"
            else:
                detail = f"{hop['name']}: TLSA records present, none usable: TLS required, " \
                         "not authenticated"
                hop["dane"] = "encrypt"
            self.add("dane", source, detail)

    def tls(self, route: Route, target: Target) -> None:
        policy = target.policy
        self.add("tls", policy.origin, f"{policy.level}: {TLS_MEANING[policy.level]} "
                 f"({'route table entry' if policy.source == 'table' else policy.source})")
        if route.kind != "mx":
            return
        for mechanism in ("dane", "mta-sts"):
            if not route.consult_mechanisms and policy.mechanism != mechanism:
                self.add(mechanism, policy.origin, "not consulted: the route table entry sets "
                         "the TLS policy")
            elif mechanism == "dane" and self.dane is None:
                self.add("dane", "dane.enabled", "off: [dane] is not enabled")
            elif mechanism == "mta-sts":
                self.sts_step(route.domain)

    def sts_policy(self, domain: str) -> Any:
        """The domain's cached MTA-STS policy (mta.delivery.mtasts), or None; the cache
        is only read: a first policy is fetched by the daemon at the first delivery."""
        if not self.sts_enabled:
            return None
        from mta.delivery.mtasts import PolicyCache

        if self._sts_cache is None:
            self._sts_cache = PolicyCache(self.config.data_dir / "mta-sts").load_all()
        return self._sts_cache.get(domain)

    def sts_step(self, domain: str) -> None:
        if not self.sts_enabled:
            self.add("mta-sts", "delivery.mta_sts.enabled",
                     "off: [delivery.mta_sts] is not enabled")
            return
        policy = self.sts_policy(domain)
        source = str(self.config.data_dir / "mta-sts" / f"{domain}.json")
        if policy is None:
            self.add("mta-sts", source, "no cached policy (the daemon looks it up at the next "
                     "delivery)")
            return
        age = max(0, int(self.clock() - policy.fetched_at))
        left = int(policy.fetched_at + policy.max_age - self.clock())
        self.add("mta-sts", source, f"policy id {policy.id}: mode {policy.mode}, mx "
                 f"{' '.join(policy.mx) or '-'}; fetched {age}s ago, max_age {policy.max_age}s "
                 f"({'expires in ' + str(left) + 's' if left > 0 else 'expired'})")

    def requires(self, record: dict[str, Any], hops: list[dict[str, Any]]) -> None:
        tls = record["tls"]
        dane = [h["name"] for h in hops if h.get("dane") in ("dane", "encrypt")]
        matched = [h["name"] for h in hops if h.get("dane") == "dane"]
        if tls["required"]:
            parts = ["TLS required"]
        elif dane:
            parts = [f"TLS required on {', '.join(dane)} (DANE), not on the other hosts"
                     if len(dane) < len(hops) else "TLS required (DANE)"]
        else:
            parts = ["TLS not required"]
        names = [h["verify_name"] for h in hops if h["verify_name"] and h["verify_name"] != "TLSA"]
        if matched:
            parts.append("certificate matched against the TLSA records of " + ", ".join(matched))
        elif tls["verified"]:
            parts.append("certificate verified against " + (", ".join(dict.fromkeys(names))
                                                            or "the MX host name"))
        else:
            parts.append("certificate not verified")
        ports = sorted({h["port"] for h in hops})
        if ports:
            parts.append("port " + ", ".join(map(str, ports)))
        parts.append("from " + (record["bind_address"] or "any IPv4 address") + " / "
                     + (record["bind_address6"] or "any IPv6 address"))
        parts.append(f"HELO {record['helo_name']}")
        if record["auth_user"]:
            parts.append(f"AUTH as {record['auth_user']}")
        self.add("requires", "route", "; ".join(parts))
        if record["error"]:
            self.add("result", "route", record["error"])
