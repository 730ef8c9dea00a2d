"""Aliases: the per-domain aliases files and the expansion of a recipient.

Each local domain may have ``<domains_dir>/<domain>/aliases`` (the format of
chasquid and Postfix)::

    # whole-line comments and blank lines are allowed
    # a target without @ is in this domain:
    info: alice, bob@other.example
    # everything after | is one command, run by /bin/sh -c:
    list: | /usr/local/bin/archive --list
    # the catch-all, used only when nothing else matches:
    *: alice

There are no comments at the end of a line (``#`` is a valid local-part
character) and a pipe cannot share its line with other targets.

Matching a local part tries, in order: the local part only case-folded (so a
name literally holding ``.`` or ``+`` matches), then with the suffix after a
separator cut (``user+tag`` → ``user``), then also without the drop characters
(``first.last`` → ``firstlast``).  For each form an alias comes before a user
of the same name (so ``alice: alice, archive@x`` means "alice's own mailbox and
a copy"); then ``postmaster`` (RFC 5321 §4.5.1: it exists for every local
domain); then the catch-all.

:class:`AliasResolver` is an immutable snapshot: reloading builds a new one.

A target in a local domain that is neither an alias nor a user (and that no
catch-all takes) is still returned as a ``local`` target with an empty
``mailbox``: the alias file names it, so the RCPT is accepted, and local
delivery is expected to fail it with 5.1.1 (unknown mailbox).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger

from mta.config import AliasConfig
from mta.mail.address import Address, AddressError, fold_local, normalize_domain, parse_mailbox
from mta.policy.auth import check_local

log = Logger()

CATCH_ALL = "*"
POSTMASTER = "postmaster"


class AliasFileError(Exception):
    """An aliases file cannot be read or has a malformed line."""

    def __init__(self, path: Path | str, lineno: int | None, problem: str) -> None:
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.lineno = lineno
        self.problem = problem


class AliasLoopError(Exception):
    """Expansion went deeper than ``max_depth`` or ended in nothing but cycles."""


@dataclass(frozen=True)
class Target:
    """One place a recipient goes after expansion.

    ``kind`` is ``local`` (``mailbox`` is the user ``user@domain`` to deliver
    to, or ``''`` for an unknown local address), ``remote`` (``address`` is
    the mailbox to relay to) or ``pipe`` (``address`` is the command line).
    """

    kind: str
    address: str
    mailbox: str = ""


@dataclass(frozen=True)
class Pipe:
    """A ``| command`` right-hand side."""

    command: str


Dest = Address | Pipe


class UserLookup(Protocol):
    def exists(self, local: str, domain: str) -> bool: ...


# --- parsing ----------------------------------------------------------------------


def parse_target(text: str, domain: str) -> Address:
    """One address target; without ``@`` it is in ``domain``. ValueError if bad."""
    if "@" not in text:
        text = f"{text}@{domain}"
    try:
        return parse_mailbox(text, smtputf8=True)
    except AddressError as e:
        raise ValueError(f"invalid target {text!r}: {e}") from None


def parse_rhs(rhs: str, domain: str) -> tuple[Dest, ...]:
    """The targets of one line: a single ``| command`` or comma-separated addresses."""
    rhs = rhs.strip()
    if not rhs:
        raise ValueError("no targets after ':'")
    if rhs.startswith("|"):
        command = rhs[1:].strip()
        if not command:
            raise ValueError("empty pipe command")
        return (Pipe(command),)
    dests = []
    for piece in rhs.split(","):
        piece = piece.strip()
        if not piece:
            raise ValueError("empty target (two commas, or a trailing comma)")
        if piece.startswith("|"):
            raise ValueError("a pipe target must be the only target on its line")
        dests.append(parse_target(piece, domain))
    return tuple(dests)


def parse_lhs(lhs: str) -> str:
    """The folded name of an alias (``*`` for the catch-all). ValueError if bad."""
    lhs = lhs.strip()
    if lhs == CATCH_ALL:
        return CATCH_ALL
    if "@" in lhs:
        raise ValueError("the name before ':' is a local part, without @domain")
    try:
        return check_local(lhs)
    except ValueError as e:
        raise ValueError(f"bad alias name: {e}") from None


def parse_aliases(lines: Iterable[str], domain: str,
                  path: Path | str = "<aliases>") -> dict[str, tuple[Dest, ...]]:
    """``{folded name: targets}`` from an aliases file's lines."""
    rules: dict[str, tuple[Dest, ...]] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        lhs, colon, rhs = text.partition(":")
        try:
            if not colon:
                raise ValueError("expected 'name: target, target...'")
            name = parse_lhs(lhs)
            if name in rules:
                raise ValueError(f"alias {name!r} already defined on line {first_line[name]}")
            rules[name] = parse_rhs(rhs, domain)
        except ValueError as e:
            raise AliasFileError(path, lineno, str(e)) from None
        first_line[name] = lineno
    return rules


def read_aliases_file(path: Path, domain: str) -> dict[str, tuple[Dest, ...]]:
    """The aliases of one domain's file; a missing file has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise AliasFileError(path, None, "not valid UTF-8") from None
    except OSError as e:
        raise AliasFileError(path, None, f"cannot read: {e.strerror or e}") from None
    return parse_aliases(text.splitlines(), domain, path)


# --- resolution -------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    kind: str  # 'alias', 'user', 'postmaster' or 'catchall'
    key: str


class AliasResolver:
    """Expands local recipients through the aliases of every local domain.

    ``rules`` is ``{domain: {folded name or '*': targets}}`` as returned by
    :func:`parse_aliases`; ``users`` answers ``exists(local, domain)``.
    """

    blocking = False  # answers from memory (mta.policy.directory)

    def __init__(self, rules: Mapping[str, Mapping[str, Sequence[Dest]]], users: UserLookup,
                 options: AliasConfig | None = None,
                 local_domains: Iterable[str] | None = None) -> None:
        self._rules = {normalize_domain(d): {k: tuple(v) for k, v in table.items()}
                       for d, table in rules.items()}
        domains = set(self._rules)
        domains.update(normalize_domain(d) for d in local_domains or ())
        self._domains = frozenset(domains)
        self._users = users
        self._options = options or AliasConfig()

    @classmethod
    def load(cls, domains_dir: Path, local_domains: Iterable[str], users: UserLookup,
             options: AliasConfig | None = None) -> AliasResolver:
        """Read ``<domains_dir>/<domain>/aliases`` for each local domain."""
        local_domains = tuple(local_domains)
        rules = {}
        for domain in local_domains:
            rules[domain] = read_aliases_file(Path(domains_dir) / domain / "aliases", domain)
            log.info("{count} aliases for {domain}", count=len(rules[domain]), domain=domain)
        return cls(rules, users, options, local_domains)

    @classmethod
    def from_text(cls, texts: Mapping[str, str], users: UserLookup,
                  options: AliasConfig | None = None,
                  local_domains: Iterable[str] | None = None) -> AliasResolver:
        """Build from ``{domain: aliases file text}`` (handy in tests)."""
        rules = {d: parse_aliases(text.splitlines(), d, f"<{d} aliases>")
                 for d, text in texts.items()}
        return cls(rules, users, options, local_domains)

    # --- matching ---

    def _candidates(self, local: str) -> list[str]:
        """The forms of ``local`` to look up, most exact first, without repeats."""
        seps, drop = self._options.suffix_separators, self._options.drop_characters
        forms = [fold_local(local), fold_local(local, "", seps), fold_local(local, drop, seps)]
        return [f for i, f in enumerate(forms) if f and f not in forms[:i]]

    def _match(self, local: str, domain: str) -> _Match | None:
        table = self._rules.get(domain, {})
        candidates = self._candidates(local)
        for key in candidates:
            if key != CATCH_ALL and key in table:
                return _Match("alias", key)
            if self._users.exists(key, domain):
                return _Match("user", key)
        if POSTMASTER in candidates:
            return _Match("postmaster", POSTMASTER)
        if CATCH_ALL in table:
            return _Match("catchall", CATCH_ALL)
        return None

    def _own_mailbox(self, key: str, domain: str) -> str | None:
        """The mailbox a name stands for without its alias, if it has one."""
        if key != CATCH_ALL and self._users.exists(key, domain):
            return f"{key}@{domain}"
        if key == POSTMASTER:
            return f"{POSTMASTER}@{domain}"
        return None

    def exists(self, local: str, domain: str) -> bool:
        """True if ``local@domain`` (domain normalised) is deliverable here.

        A user, an alias, ``postmaster`` or anything in a domain with a catch-all.
        """
        return domain in self._domains and self._match(local, domain) is not None

    def is_local_domain(self, domain: str) -> bool:
        return domain in self._domains

    # --- expansion ---

    def resolve(self, address: str) -> list[Target]:
        """Expand ``address`` into its final targets, in order, without duplicates.

        Remote addresses are final.  An alias met again during one expansion
        (a cycle such as ``a: b`` / ``b: a``, or ``a: a, ...``) is not expanded
        again: it stands for the user of that name if there is one, otherwise
        that branch ends.  AliasLoopError if the expansion goes deeper than
        ``max_depth`` aliases or yields nothing at all.
        """
        start = _split(address)
        out: dict[tuple[str, str], Target] = {}
        self._expand(start, 0, set(), out)
        if not out:
            raise AliasLoopError(f"{address}: aliases loop and deliver nowhere")
        return list(out.values())

    def _expand(self, addr: Address, depth: int, visited: set[tuple[str, str]],
                out: dict[tuple[str, str], Target]) -> None:
        text = str(addr)
        if addr.domain not in self._domains:
            _emit(out, Target("remote", text))
            return
        match = self._match(addr.local, addr.domain)
        if match is None:
            # Unknown here; local delivery fails it with 5.1.1 (see module docstring).
            _emit(out, Target("local", text), fold_local(addr.local))
            return
        if match.kind in ("user", "postmaster"):
            _emit(out, Target("local", text, f"{match.key}@{addr.domain}"))
            return
        node = (addr.domain, match.key)
        if node in visited:
            mailbox = self._own_mailbox(match.key, addr.domain)
            if mailbox:
                _emit(out, Target("local", text, mailbox))
            return
        if depth >= self._options.max_depth:
            raise AliasLoopError(f"{text}: aliases nested deeper than {self._options.max_depth}")
        visited.add(node)
        for dest in self._rules[addr.domain][match.key]:
            if isinstance(dest, Pipe):
                _emit(out, Target("pipe", dest.command))
            else:
                self._expand(dest, depth + 1, visited, out)


def _emit(out: dict[tuple[str, str], Target], target: Target, unknown_key: str = "") -> None:
    """Add ``target`` unless it goes where an earlier one already goes."""
    if target.kind == "local":
        key = target.mailbox or "?" + unknown_key + "@" + target.address.rpartition("@")[2]
    else:
        key = target.address
    out.setdefault((target.kind, key), target)


def _split(address: str) -> Address:
    """``local@domain`` (possibly with a quoted local part) as an Address."""
    try:
        return parse_mailbox(address, smtputf8=True)
    except AddressError:
        local, _, domain = address.rpartition("@")
        return Address(local, domain.lower())
