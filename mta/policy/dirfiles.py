"""Between the files and SQL: ``mta directory import`` / ``export``, and alias edits of the files.

:func:`import_files` reads what the files back end reads (``local_domains``,
each domain's ``users``, ``aliases`` and ``identities``, ``dkim.keys``) with
the same parsers, so a file that the daemon would refuse is refused here
too, and writes it to the tables (a pipe alias only with
``directory.allow_pipes``: without it an import that has one is refused, and
nothing is written).
:func:`export_files` writes the tables back as files in that format
(atomically, mode 0600), one directory per domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mta.policy.aliases import CATCH_ALL, Pipe, parse_lhs, parse_rhs, read_aliases_file
from mta.policy.auth import _read_lines, _write_atomically, read_users_file
from mta.policy.sqldirectory import DirectoryEditError, SQLAdmin


def _rhs_texts(dests: tuple[Any, ...]) -> list[str]:
    return ["| " + d.command if isinstance(d, Pipe) else str(d) for d in dests]


def _identity_lines(path: Path) -> list[tuple[str, list[str]]]:
    """``(user, [identity...])`` of an identities file, as Identities.load reads it."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        user, _, rest = line.partition(":")
        out.append((user.strip(), [x.strip() for x in rest.split(",") if x.strip()]))
    return out


def import_files(config: Any, admin: SQLAdmin, replace: bool = False) -> dict[str, int]:
    """Copy the files' directory into SQL; counts of what was written.

    A domain already in SQL is refused unless ``replace`` (then its rows are
    replaced by the files')."""
    from mta.policy.identities import Identities

    # Parse everything first (the daemon's own checks), so nothing half-imports.
    Identities.load(config.domains_dir, config.local_domains, config.aliases.suffix_separators)
    counts = {"domains": 0, "users": 0, "aliases": 0, "identities": 0, "dkim_keys": 0}
    plan = []
    for domain in config.local_domains:
        users = read_users_file(config.users_file(domain))
        rules = read_aliases_file(config.aliases_file(domain), domain)
        plan.append((domain, users, rules, _identity_lines(config.identities_file(domain))))
    for domain, _, rules, _ in plan:
        for name, dests in rules.items():
            try:
                admin.check_targets(domain, _rhs_texts(dests))
            except DirectoryEditError as e:
                raise DirectoryEditError(f"alias {name}@{domain}: {e}") from None
    existing = set(admin.domains())
    for domain, *_ in plan:
        if domain in existing and not replace:
            raise DirectoryEditError(f"domain {domain} is in SQL already (--replace to replace it)")
    for domain, users, rules, identities in plan:
        if domain in existing:
            admin.remove_domain(domain)
        admin.add_domain(domain)
        counts["domains"] += 1
        for local, stored in users.items():
            admin.add_user(domain, local, stored)
            counts["users"] += 1
        for name, dests in rules.items():
            admin.set_alias(domain, name, _rhs_texts(dests))
            counts["aliases"] += 1
        for user, items in identities:
            for item in items:
                admin.add_identity(domain, user, item, config.aliases.suffix_separators)
                counts["identities"] += 1
    for domain, selector, path in config.dkim.keys:
        if domain in {p[0] for p in plan}:
            admin.set_dkim_key(domain, selector, path=str(path))
            counts["dkim_keys"] += 1
    return counts


def export_files(admin: SQLAdmin, target: Path) -> dict[str, int]:
    """Write every SQL domain as ``target/<domain>/{users,aliases,identities}``."""
    counts = {"domains": 0, "users": 0, "aliases": 0, "identities": 0}
    for domain in admin.domains():
        base = target / domain
        users = admin.users(domain)
        rows = admin.store.query("SELECT local, password FROM users WHERE domain = ? "
                                 "ORDER BY local", (domain,))
        _write_atomically(base / "users", [f"{local} {stored}" for local, stored in rows])
        counts["users"] += len(users)
        aliases = admin.aliases(domain)
        lines = []
        for name in sorted(aliases, key=lambda n: (n == CATCH_ALL, n)):  # the catch-all last
            targets = aliases[name]
            lines.append(f"{name}: {', '.join(targets)}")
        _write_atomically(base / "aliases", lines)
        counts["aliases"] += len(aliases)
        identities = admin.identities(domain)
        _write_atomically(base / "identities",
                          [f"{local}: {', '.join(items)}" for local, items in identities.items()])
        counts["identities"] += sum(len(v) for v in identities.values())
        counts["domains"] += 1
    return counts


# --- alias edits of an aliases file (the files back end) ---------------------------


def set_file_alias(path: Path, domain: str, name: str, targets: list[str]) -> str:
    """Add alias ``name`` to an aliases file, or replace its line; the other lines
    (comments too) are kept.  ValueError when the name or a target is bad."""
    key = parse_lhs(name)
    rhs = ", ".join(t.strip() for t in targets)
    parse_rhs(rhs, domain)  # the file's own rules: a pipe alone on its line
    lines = _read_lines(path)
    read_aliases_file(path, domain)  # refuse to edit a malformed file
    new = f"{key}: {rhs}"
    for i, line in enumerate(lines):
        text = line.strip()
        if text and not text.startswith("#") and text.partition(":")[1] \
                and _name(text) == key:
            lines[i] = new
            break
    else:
        lines.append(new)
    _write_atomically(path, lines)
    return f"{key}@{domain}"


def remove_file_alias(path: Path, domain: str, name: str) -> str:
    key = parse_lhs(name)
    lines = _read_lines(path)
    read_aliases_file(path, domain)
    kept = [line for line in lines if not (line.strip() and not line.strip().startswith("#")
                                           and line.partition(":")[1] and _name(line) == key)]
    if len(kept) == len(lines):
        raise ValueError(f"no alias {key!r} in {path}")
    _write_atomically(path, kept)
    return f"{key}@{domain}"


def _name(line: str) -> str:
    try:
        return parse_lhs(line.strip().partition(":")[0])
    except ValueError:
        return ""
