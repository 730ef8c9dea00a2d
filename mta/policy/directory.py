"""The directory: where users, aliases, identities, local domains and DKIM keys come from.

Three back ends, chosen by ``[directory] backend`` (:class:`mta.config.DirectoryConfig`):

``files`` (the default)
    today's per-domain files (``users``, ``aliases``, ``identities`` under
    ``domains_dir``), ``local_domains`` and ``dkim.keys`` of the configuration;
    read at start and on ``mta reload`` into immutable snapshots, so every
    answer comes from memory, at once.
``sqlite`` / ``postgresql``
    the tables of :mod:`mta.policy.sqldirectory` (one SQLite file for one
    machine; one PostgreSQL database shared by several nodes); each answer is
    a query, cached ``cache_ttl`` seconds, so a change made with ``mta user
    add`` or in SQL is seen by every node within that time without a reload.

Whoever asks sees the same three objects either way (``users``,
``aliases``, ``identities``: :class:`Directory`) with the same semantics
(the alias rules of :mod:`mta.policy.aliases` run unchanged over either
store).  The one difference is ``blocking``: an SQL directory's answers need
I/O, so its callers ask through ``defer(f, *args)``, which runs ``f`` in the
directory's own bounded thread pool and gives a Deferred; the files keep the
synchronous fast path (no Deferred, no thread), and a plain message on a
files-only MTA does no more work than before.

An SQL database that cannot answer raises :class:`DirectoryUnavailable`:
the callers turn it into a temporary refusal (``451 4.3.0`` at MAIL and
RCPT, ``454 4.7.0`` for AUTH, RFC 4954 §6), never a 5xx and never an
acceptance; what needs no lookup (relaying for relay_networks and for
sessions already authenticated) goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred


class DirectoryUnavailable(Exception):
    """The directory's database could not answer (down, timed out, not migrated).

    Its message is for the log (never holds a password or the DSN)."""


class Directory(Protocol):
    """What the daemon's parts ask of the directory, owned here by its users
    (the checks of :mod:`mta.policy.checks`, AUTH in :mod:`mta.smtp.sasl`
    through the server context, the daemon's wiring).

    ``users`` has ``exists(local, domain)`` and ``authenticate(user, password)
    -> Deferred[canonical user or None]``; ``aliases`` has ``exists``,
    ``resolve`` and ``is_local_domain`` (:class:`mta.policy.aliases.AliasResolver`);
    ``identities`` has ``may_send_as`` (:class:`mta.policy.identities.Identities`).
    Each of the three has the same ``blocking`` as the directory, and ``defer``
    when it is True.
    """

    backend: str  # "files", "sqlite" or "postgresql"
    blocking: bool  # True: call the lookups through defer(), off the reactor thread
    users: Any
    aliases: Any
    identities: Any

    def local_domains(self) -> frozenset[str] | None:
        """The local domains now, without I/O; None when an SQL directory has
        never been able to read them (then only ``local_domains`` of the
        configuration are known to be ours)."""
        ...

    def defer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f(*args)`` off the reactor thread (SQL) or at once (files)."""
        ...

    def dkim_keys(self) -> list[tuple[str, str, str | None, str | None]]:
        """``(domain, selector, private key PEM or None, key path or None)``."""
        ...

    def close(self) -> None:
        """Stop its threads and connections (on reload and shutdown)."""
        ...


class FilesDirectory:
    """The files back end: snapshots read from ``domains_dir`` and the configuration."""

    backend = "files"
    blocking = False

    def __init__(self, users: Any, aliases: Any, identities: Any,
                 domains: tuple[str, ...], keys: tuple[tuple[str, str, Any], ...] = ()) -> None:
        self.users = users
        self.aliases = aliases
        self.identities = identities
        self._domains = frozenset(domains)
        self._keys = keys

    @classmethod
    def load(cls, config: Any) -> FilesDirectory:
        """Read the files (UsersFileError, AliasFileError, IdentitiesFileError, OSError)."""
        from mta.policy.aliases import AliasResolver
        from mta.policy.auth import UserDB
        from mta.policy.identities import Identities

        users = UserDB.load(config.domains_dir, config.local_domains)
        aliases = AliasResolver.load(config.domains_dir, config.local_domains, users, config.aliases)
        identities = Identities.load(config.domains_dir, config.local_domains,
                                     config.aliases.suffix_separators)
        return cls(users, aliases, identities, config.local_domains, config.dkim.keys)

    def local_domains(self) -> frozenset[str]:
        return self._domains

    def defer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        from twisted.internet.defer import maybeDeferred

        return maybeDeferred(f, *args)

    def dkim_keys(self) -> list[tuple[str, str, str | None, str | None]]:
        return [(d, s, None, str(p)) for d, s, p in self._keys]

    def close(self) -> None:
        pass
