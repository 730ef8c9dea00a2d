"""Sender binding: which envelope senders an authenticated user may use.

A user may always send as their own address (``user@domain``, any case, with
or without a ``+suffix``).  ``domains/<domain>/identities`` adds more, one user a
line::

    # user: identities
    alice: sales@example.org, alice@example.net
    bob: @example.net          # any address in example.net
    app: *                     # anything, including the null sender

Pure functions and an immutable snapshot; the SMTP session asks
``may_send_as`` at MAIL FROM (RFC 6409 §6.1 lets a submission server refuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mta.mail.address import AddressError, fold_local, normalize_domain


class IdentitiesFileError(ValueError):
    pass


def _canonical(address: str, suffixes: str) -> str:
    local, _, domain = address.rpartition("@")
    try:
        domain = normalize_domain(domain)
    except AddressError:
        return address.lower()
    return f"{fold_local(local, '', suffixes)}@{domain}"


@dataclass(frozen=True)
class Identities:
    # "user@domain" (canonical) -> allowed entries: "*", "@domain" or canonical addresses
    table: dict[str, frozenset[str]] = field(default_factory=dict)
    suffix_separators: str = "+"

    @classmethod
    def load(cls, domains_dir: Path, domains: tuple[str, ...], suffix_separators: str = "+") -> Identities:
        table: dict[str, frozenset[str]] = {}
        for domain in domains:
            path = domains_dir / domain / "identities"
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise IdentitiesFileError(f"{path}: cannot read: {e}") from None
            for lineno, raw in enumerate(text.splitlines(), 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                user, sep, rest = line.partition(":")
                if not sep or not user.strip():
                    raise IdentitiesFileError(f"{path}:{lineno}: expected 'user: identity, ...'")
                entries = set()
                for item in (x.strip() for x in rest.split(",")):
                    if not item:
                        continue
                    if item == "*":
                        entries.add("*")
                    elif item.startswith("@"):
                        try:
                            entries.add("@" + normalize_domain(item[1:]))
                        except AddressError as e:
                            raise IdentitiesFileError(f"{path}:{lineno}: {e}") from None
                    elif "@" in item:
                        entries.add(_canonical(item, suffix_separators))
                    else:
                        raise IdentitiesFileError(f"{path}:{lineno}: {item!r} is not an address")
                key = _canonical(f"{user.strip()}@{domain}", suffix_separators)
                table[key] = frozenset(entries) | table.get(key, frozenset())
        return cls(table, suffix_separators)

    blocking = False  # a snapshot in memory (mta.policy.sqldirectory has one that is not)

    def own_address(self, auth_user: str, sender: str) -> bool:
        """``sender`` is the user's own address (any case, any suffix): no table needed."""
        return bool(sender) and (_canonical(sender, self.suffix_separators)
                                 == _canonical(auth_user, self.suffix_separators))

    def may_send_as(self, auth_user: str, sender: str) -> bool:
        """True if ``auth_user`` ("user@domain") may use ``sender`` ("" = null sender)."""
        user = _canonical(auth_user, self.suffix_separators)
        allowed = self.table.get(user, frozenset())
        if "*" in allowed:
            return True
        if not sender:
            return False
        wanted = _canonical(sender, self.suffix_separators)
        if wanted == user or wanted in allowed:
            return True
        return "@" + wanted.rpartition("@")[2] in allowed


def header_from_addresses(header_lines: list[bytes]) -> list[str]:
    """The addresses in the From header field(s) of a header section."""
    from email.utils import getaddresses

    from mta.mail.headers import unfold_headers

    values = [b" ".join(x.strip() for x in group).split(b":", 1)[1].decode("utf-8", "replace")
              for name, group in unfold_headers(header_lines) if name == b"from"]
    return [addr for _, addr in getaddresses(values) if addr]
