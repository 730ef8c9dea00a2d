"""Who may send where: the recipient decision at RCPT time.

Port 25 accepts mail for our local domains from anyone, and relays to other
domains only for an authenticated user or a client in ``relay_networks``
(empty by default: loopback is not trusted).  A local recipient must be a
user, an alias, ``postmaster`` or caught by a catch-all; otherwise 550 5.1.1.
Percent-hack (``user%other@local``), bang paths and quoted local parts holding
an ``@`` are never interpreted as routes: they are just local parts, which
match no user, so they cannot be used to relay.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from mta.mail import replies as R
from mta.mail.address import Address
from mta.mail.replies import Reply
from mta.policy.aliases import Target  # where a recipient goes: one class for aliases and relay


@dataclass(frozen=True)
class RecipientDecision:
    reply: Reply | None  # None: accepted
    targets: tuple[Any, ...] = field(default_factory=tuple)


def relay_allowed(auth_user: str | None, client_ip: str, relay_networks: tuple[str, ...]) -> bool:
    if auth_user:
        return True
    if not relay_networks:
        return False
    return _in_networks(client_ip, relay_networks)


@functools.lru_cache(maxsize=1024)
def _in_networks(client_ip: str, relay_networks: tuple[str, ...]) -> bool:
    """Whether ``client_ip`` is in one of the networks (answers cached: most
    connections come from a few addresses, and parsing one costs more than
    the rest of the connection's policy)."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(ip in net for net in _networks(relay_networks))


@functools.cache
def _networks(texts: tuple[str, ...]) -> tuple[Any, ...]:
    """Parsed once per configuration (validated by mta.config at load)."""
    return tuple(ipaddress.ip_network(net, strict=False) for net in texts)


def check_recipient(address: Address, local_domains: tuple[str, ...], aliases: Any,
                    may_relay: bool, srs: Any = None) -> RecipientDecision:
    """Accept or refuse one RCPT TO address; on acceptance, its expanded targets."""
    from mta.policy.aliases import AliasLoopError
    from mta.policy.srs import SRSError, is_srs_local

    if address.domain in local_domains and srs is not None and is_srs_local(address.local):
        # A bounce to an address we rewrote when forwarding: back to the original
        # sender, but only if our HMAC and timestamp verify (no relay by forgery).
        try:
            original = srs.reverse(str(address))
        except SRSError:
            return RecipientDecision(R.unknown_user(str(address)))
        return RecipientDecision(None, (Target("remote", original),))
    if address.domain in local_domains:
        if not aliases.exists(address.local, address.domain):
            return RecipientDecision(R.unknown_user(str(address)))
        try:
            targets = tuple(aliases.resolve(str(address)))
        except AliasLoopError:
            return RecipientDecision(R.ALIAS_LOOP)
        return RecipientDecision(None, targets)
    if may_relay:
        return RecipientDecision(None, (Target("remote", str(address)),))
    return RecipientDecision(R.relay_denied(str(address)))


class Answers:
    """An SQL directory's answers for some recipients, asked ahead (in its threads,
    ``Answers(aliases, addresses)``) for a caller that decides synchronously
    (local submission, :mod:`mta.intake.submit`): ``exists`` and ``resolve``
    as :class:`~mta.policy.aliases.AliasResolver`'s, for those addresses only.
    DirectoryUnavailable propagates from the constructor."""

    def __init__(self, aliases: Any, addresses: list[str]) -> None:
        from mta.mail.address import AddressError, parse_mailbox
        from mta.policy.aliases import AliasLoopError

        self._exists: dict[tuple[str, str], bool] = {}
        self._resolved: dict[str, Any] = {}
        for text in addresses[:1000]:  # bounded: max_recipients is checked later, lower
            try:
                address = parse_mailbox(text.strip().strip("<>"), smtputf8=True)
            except AddressError:
                continue  # refused with its reason by the caller
            key = (address.local, address.domain)
            self._exists[key] = exists = aliases.exists(*key)
            if exists:
                try:
                    self._resolved[str(address)] = aliases.resolve(str(address))
                except AliasLoopError as e:
                    self._resolved[str(address)] = e

    def exists(self, local: str, domain: str) -> bool:
        return self._exists.get((local, domain), False)

    def resolve(self, address: str) -> Any:
        answer = self._resolved[address]
        if isinstance(answer, Exception):
            raise answer
        return answer
