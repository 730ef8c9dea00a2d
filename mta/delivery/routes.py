"""The per-destination route table: where a remote domain's mail goes and how
(``[delivery.route."KEY"]``; Postfix's transport_maps, smtp_tls_policy_maps and
smtp_sasl_password_maps in one place).

A :class:`RouteTable` answers, for a recipient domain and without any I/O, a
:class:`Route`: the targets to try (the domain's MX hosts, the global
smarthosts or the entry's own smarthost), each with its TLS policy and where
that came from, credentials, port, source addresses and HELO name.  The DNS
part (MX lookup) is the courier's (:mod:`mta.delivery.remote`) and the
explain command's.

Lookup of a domain's entry: the exact domain first, then ``.parent`` keys
from the closest parent up (``.example.com`` matches ``a.b.example.com``
but not ``example.com`` itself, as Postfix with
parent_domain_matches_subdomains off).  A smarthost target (global or the
entry's) also takes the values of a next-hop entry ``[host]:port`` (or
``[host]``) for what the domain's entry leaves unset.

Precedence, per value, first that says something wins:

1. the domain's table entry;
2. the next-hop entry of the smarthost (smarthost targets only);
3. ``[delivery.relay."host:port"]`` (global smarthosts only);
4. the global default (``delivery.tls_policy`` for MX hosts,
   ``delivery.smarthost_tls`` / ``smarthost_username`` / ``smarthost_password``
   for smarthosts, ``delivery.bind_address`` / ``bind_address6`` /
   ``helo_name``).

TLS levels (Postfix's names) and the client policies
(:mod:`mta.delivery.tlspolicy`) they mean:

* ``none`` → ``none``: never STARTTLS;
* ``may`` → ``opportunistic``: STARTTLS when offered, certificate not
  checked, clear text if not offered or the handshake fails (RFC 7435);
* ``encrypt`` → ``require``: STARTTLS or defer, certificate not checked;
* ``verify`` → ``verify``: STARTTLS or defer, certificate verified for the
  MX host (or smarthost) name (RFC 6125);
* ``dane``: DANE (RFC 7672, :mod:`mta.delivery.dane`) as Postfix's "dane":
  hosts with usable TLSA records are authenticated by them, the others get
  ``may``; a table entry's ``dane`` also demands that DANE can be used
  (``[dane]`` enabled and its resolver validating), else the recipients are
  deferred with ``451 4.7.5`` (:class:`RouteError`);
* ``mta-sts``: MTA-STS (RFC 8461, :mod:`mta.delivery.mtasts`): the domain's
  policy applies as the courier applies it (enforce: only the MX hosts it
  names, certificate verified; testing: verified, else as without it); an
  entry's ``mta-sts`` also demands that MTA-STS is enabled
  (``[delivery.mta_sts]``) and that the domain has a policy, else the
  recipients are deferred with ``451 4.7.5``.

An entry that sets ``tls`` overrides DANE, MTA-STS and the global default for
its domain: :attr:`Route.consult_mechanisms` is then False and a DANE or
MTA-STS module must not change the policy (Postfix: a policy table entry
replaces the default security level, and its DANE/STS lookups with it).
Without ``tls`` in the entry (or without an entry) the mechanisms decide in
the RFCs' order, DANE before MTA-STS (RFC 8461 §2), then the global default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mta.config import DeliveryConfig, RouteEntry

# Postfix's level → the client's policy (mta.delivery.tlspolicy.TLS_POLICIES) for a
# host the mechanism leaves alone: under "dane" a host without usable TLSA records
# gets opportunistic TLS (as Postfix's "dane"; DANE itself gives the others "dane"),
# "dane-only" (delivery.tls_policy only) refuses them in mta.delivery.dane;
# MTA-STS needs a verified certificate at the least.
CLIENT_POLICY = {"none": "none", "may": "opportunistic", "encrypt": "require", "verify": "verify",
                 "dane": "opportunistic", "dane-only": "opportunistic", "mta-sts": "verify"}
# delivery.tls_policy / smarthost_tls → the level it is reported as (metrics, explain).
LEVEL = {"none": "none", "opportunistic": "may", "require": "encrypt", "verify": "verify",
         "dane": "dane", "dane-only": "dane-only"}
MECHANISMS = ("dane", "mta-sts")
# Where a policy came from (the ``source`` of a Policy, a log event and a metric label).
SOURCES = ("table", "relay", "default", "dane", "mta-sts")
MAX_LABELS = 127  # a domain name has at most 127 labels (RFC 1035 §2.3.4): bounds the walk


@dataclass(frozen=True)
class Policy:
    """The TLS level that applies and where it was configured.

    ``level``: one of :data:`mta.config.ROUTE_TLS`; ``source``: one of
    :data:`SOURCES`; ``origin``: the configuration key (``delivery.tls_policy``,
    ``delivery.route."example.com".tls``) or what a mechanism found."""

    level: str
    source: str
    origin: str

    @property
    def client_policy(self) -> str:
        """``ClientOptions.tls_policy`` for this level."""
        return CLIENT_POLICY[self.level]

    @property
    def mechanism(self) -> str | None:
        """``dane`` or ``mta-sts`` when this level demands that mechanism."""
        return self.level if self.level in MECHANISMS else None

    @property
    def requires_tls(self) -> bool:
        """TLS required on every host (under "dane" only on hosts with TLSA records)."""
        return self.level not in ("none", "may", "dane")

    @property
    def verifies(self) -> bool:
        """Every host's certificate is checked (PKIX, or TLSA under "dane-only")."""
        return self.level in ("verify", "dane-only", "mta-sts")


@dataclass(frozen=True)
class Target:
    """One configured next hop, before DNS: a domain whose MX hosts to look up
    (``mx_lookup``) or one host to connect to."""

    host: str  # a domain (MX lookup), a host name or an IP address
    port: int
    mx_lookup: bool
    policy: Policy
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    bind_address: str | None = None
    bind_address6: str | None = None
    helo_name: str | None = None
    via: str = "mx"  # "mx", "smarthost" (delivery.smarthosts) or "table" (the entry's smarthost)
    text: str = ""  # as configured ("relay.example:587"), for the explain command

    def bind_for(self, address: str) -> str | None:
        """The source address for a connection to ``address`` (v6 if it has a colon)."""
        return self.bind_address6 if ":" in address else self.bind_address


@dataclass(frozen=True)
class Route:
    """Where mail for ``domain`` goes: ``targets`` in order, tried until one answers."""

    domain: str
    entry: RouteEntry | None  # the domain's table entry, if any
    targets: tuple[Target, ...]
    # False when the table entry sets tls: DANE and MTA-STS are not consulted.
    consult_mechanisms: bool = True

    @property
    def kind(self) -> str:
        return self.targets[0].via if self.targets else "mx"


class RouteError(Exception):
    """The route cannot be used now (a mechanism the policy demands is missing):
    like :class:`mta.delivery.mx.DNSError`, with ``permanent``, ``status``, ``reply``."""

    permanent = False

    def __init__(self, text: str, status: str = "4.7.5", code: int = 451) -> None:
        super().__init__(text)
        self.text, self.status, self.code = text, status, code

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def entry_origin(entry: RouteEntry, key: str) -> str:
    return f'delivery.route."{entry.key}".{key}'


class RouteTable:
    """The table and the global settings, answering :meth:`route` per domain."""

    def __init__(self, delivery: DeliveryConfig) -> None:
        self.delivery = d = delivery
        self.entries = {e.key: e for e in d.routes}
        self.domains = {k for k in self.entries if not k.startswith("[")}
        self._relays = {name: (tls, user, password) for name, tls, user, password in d.relays}
        self._global = tuple(self._smarthost_target(text, None) for text in d.smarthosts)
        self._default = Policy(LEVEL[d.tls_policy], "default", "delivery.tls_policy")

    @property
    def empty(self) -> bool:
        return not self.entries

    def entry_for(self, domain: str) -> RouteEntry | None:
        """The domain's entry: exact, else the closest ``.parent`` key."""
        if not self.domains:
            return None
        entry = self.entries.get(domain)
        if entry is not None:
            return entry
        labels = domain.split(".")
        for i in range(1, min(len(labels), MAX_LABELS)):
            entry = self.entries.get("." + ".".join(labels[i:]))
            if entry is not None:
                return entry
        return None

    def group(self, domain: str) -> str:
        """The courier's grouping key for ``domain``: "" for every domain that goes
        to the global smarthosts (one transaction for all), else the domain."""
        if self.delivery.smarthosts and self.entry_for(domain) is None:
            return ""
        return domain

    def route(self, domain: str) -> Route:
        """Where mail for ``domain`` ("" for the global smarthosts) goes."""
        entry = self.entry_for(domain) if domain else None
        if entry is None:
            if self._global:
                return Route(domain, None, self._global)
            return Route(domain, None, (Target(domain, self.delivery.mx_port, True, self._default,
                                               bind_address=self.delivery.bind_address,
                                               bind_address6=self.delivery.bind_address6,
                                               helo_name=self.delivery.helo_name),))
        consult = entry.tls is None
        if entry.smarthost is not None:
            targets: Sequence[Target] = (self._smarthost_target(entry.smarthost, entry),)
        elif self._global:
            targets = [self._smarthost_target(text, entry) for text in self.delivery.smarthosts]
        else:
            policy = (Policy(entry.tls, "table", entry_origin(entry, "tls"))
                      if entry.tls is not None else self._default)
            targets = (Target(domain, entry.port or self.delivery.mx_port, True, policy,
                              **self._addresses(entry, None)),)
        return Route(domain, entry, tuple(targets), consult_mechanisms=consult)

    # --- smarthosts ---------------------------------------------------------------------

    def _smarthost_target(self, text: str, entry: RouteEntry | None) -> Target:
        """A smarthost: global (``delivery.smarthosts``, "host:port" connected to
        directly) or the entry's (Postfix relayhost syntax: ``[host]:port`` directly,
        ``host:port`` through the MX records of host)."""
        d = self.delivery
        if entry is not None and entry.smarthost == text:
            host, port, mx_lookup = _relayhost(text)
            via = "table"
            relay = None
        else:
            host, port = parse_smarthost(text, None)
            mx_lookup, via = False, "smarthost"
            relay = self._relays.get(text)
        if port is None:
            port = (entry.port if entry is not None and entry.port else None) or 25
        hop = self.entries.get(f"[{host}]:{port}") or self.entries.get(f"[{host}]")
        # TLS: entry, next-hop entry, [delivery.relay], delivery.smarthost_tls.
        policy = None
        for candidate in (entry, hop):
            if candidate is not None and candidate.tls is not None:
                policy = Policy(candidate.tls, "table", entry_origin(candidate, "tls"))
                break
        if policy is None and relay is not None:
            policy = Policy(LEVEL[relay[0]], "relay", f'delivery.relay."{text}".tls')
        if policy is None:
            policy = Policy(LEVEL[d.smarthost_tls], "default", "delivery.smarthost_tls")
        # Credentials: as a pair, from the first that has them.
        username, password = None, None
        for candidate in (entry, hop):
            if candidate is not None and candidate.username is not None:
                username, password = candidate.username, candidate.password
                break
        else:
            if relay is not None and relay[1] is not None:
                username, password = relay[1], relay[2]
            elif via == "smarthost":
                username, password = d.smarthost_username, d.smarthost_password
        return Target(host, port, mx_lookup, policy, username, password, via=via, text=text,
                      **self._addresses(entry, hop))

    def _addresses(self, entry: RouteEntry | None, hop: RouteEntry | None) -> dict[str, Any]:
        values = {}
        for key in ("bind_address", "bind_address6", "helo_name"):
            value = None
            for candidate in (entry, hop):
                if candidate is not None and getattr(candidate, key) is not None:
                    value = getattr(candidate, key)
                    break
            values[key] = value if value is not None else getattr(self.delivery, key)
        return values


def parse_smarthost(text: str, default_port: int | None = 25) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` (delivery.smarthosts) → (host, port),
    ``default_port`` when the text names none."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, default_port
    return host, int(port)


def _relayhost(text: str) -> tuple[str, int | None, bool]:
    """Postfix relayhost syntax → (host, port or None, look up MX records of host)."""
    if text.startswith("["):
        host, port = parse_smarthost(text, None)
        return host, port, False
    host, port = parse_smarthost(text, None)
    return host.lower(), port, True
