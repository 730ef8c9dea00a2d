"""The ``mta`` commands of the directory, against whichever back end is configured.

* ``user add|passwd|remove|list`` (with SQL; with the files, :mod:`mta.admin.cli`
  edits the users file as before): a change in SQL needs no reload, every node
  sees it within ``directory.cache_ttl`` seconds;
* ``alias add|remove`` (``alias resolve`` is in :mod:`mta.admin.cli`):
  SQL rows, or the domain's aliases file (then the daemon reloads);
* ``domain add|remove|list``: SQL rows; with the files the local domains are
  ``local_domains`` of the configuration, listed but not edited here;
* ``directory migrate``: apply the schema migrations (SQL only);
  ``directory import`` copies the files into SQL, ``directory export DIR``
  writes SQL out as files.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mta.config import Config

# The output helpers and CLIError of mta.admin.cli, handed over by register() (importing
# that module here would make a circle of imports, which tests/test_layers.py forbids).
_helpers: Any = None


def _cli() -> Any:
    return _helpers


def sql(config: Config) -> bool:
    return config.directory.backend != "files"


def _admin(config: Config) -> Any:
    from mta.policy.directory import DirectoryUnavailable
    from mta.policy.sqldirectory import SQLAdmin, latest_version, open_store, schema_version

    store = open_store(config.directory)
    try:
        version = schema_version(store)
    except DirectoryUnavailable as e:
        store.close()
        raise _cli().CLIError(f"the directory cannot be reached: {e}") from None
    if version != latest_version():
        store.close()
        raise _cli().CLIError(f"the directory's schema is version {version}, this mta needs "
                              f"{latest_version()}: run `mta directory migrate`")
    return SQLAdmin(store, config.directory.allow_pipes)


def _run(config: Config, edit: Callable[[Any], Any]) -> Any:
    """``edit(admin)`` with the configured SQL store; its errors as CLIError."""
    from mta.policy.directory import DirectoryUnavailable
    from mta.policy.sqldirectory import DirectoryEditError

    admin = _admin(config)
    try:
        return edit(admin)
    except (DirectoryEditError, ValueError) as e:
        raise _cli().CLIError(str(e)) from None
    except DirectoryUnavailable as e:
        raise _cli().CLIError(f"the directory cannot be reached: {e}") from None
    finally:
        admin.store.close()


def _seen(config: Config, what: str) -> int:
    ttl = config.directory.cache_ttl
    _cli()._out(f"{what}; every node sees it within {ttl:g} s (directory.cache_ttl)")
    return 0


# --- users (SQL) -----------------------------------------------------------------


def user_add(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import check_local, hash_password

    cli = _cli()
    try:
        check_local(args.user)
    except ValueError as e:
        raise cli.CLIError(str(e)) from None
    password = cli.read_password()
    user = _run(config, lambda a: a.add_user(args.domain, args.user, hash_password(password)))
    return _seen(config, f"user {user} added")


def user_passwd(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import hash_password

    cli = _cli()
    if not _run(config, lambda a: a.has_user(a._need_domain(args.domain), args.user)):
        raise cli.CLIError(f"no user {args.user!r} in {args.domain}")
    password = cli.read_password()
    user = _run(config, lambda a: a.set_password(args.domain, args.user, hash_password(password)))
    return _seen(config, f"password of {user} changed")


def user_remove(config: Config, args: argparse.Namespace) -> int:
    user = _run(config, lambda a: a.remove_user(args.domain, args.user))
    return _seen(config, f"user {user} removed")


def user_list(config: Config, args: argparse.Namespace) -> int:
    cli = _cli()
    users = _run(config, lambda a: a.users(args.domain))
    domain = args.domain.lower()
    if args.json:
        cli._print_json(users)
    elif not users:
        cli._out(f"no users in {domain}")
    else:
        for user in users:
            cli._out(f"{user}@{domain}")
    return 0


# --- aliases -----------------------------------------------------------------------


def alias_add(config: Config, args: argparse.Namespace) -> int:
    cli = _cli()
    if sql(config):
        name = _run(config, lambda a: a.set_alias(args.domain, args.name, args.targets))
        return _seen(config, f"alias {name} set")
    from mta.policy.aliases import AliasFileError
    from mta.policy.dirfiles import set_file_alias

    domain = cli._local_domain(config, args.domain)
    path = config.aliases_file(domain)
    try:
        set_file_alias(path, domain, args.name, args.targets)
    except (ValueError, AliasFileError) as e:
        raise cli.CLIError(str(e)) from None
    return cli._reload_after_change(config, f"{path} updated")


def alias_remove(config: Config, args: argparse.Namespace) -> int:
    cli = _cli()
    if sql(config):
        name = _run(config, lambda a: a.remove_alias(args.domain, args.name))
        return _seen(config, f"alias {name} removed")
    from mta.policy.aliases import AliasFileError
    from mta.policy.dirfiles import remove_file_alias

    domain = cli._local_domain(config, args.domain)
    path = config.aliases_file(domain)
    try:
        remove_file_alias(path, domain, args.name)
    except (ValueError, AliasFileError) as e:
        raise cli.CLIError(str(e)) from None
    return cli._reload_after_change(config, f"{path} updated")


def resolver(config: Config) -> tuple[Any, Any, Callable[[], None]]:
    """``(aliases, local domains, close)`` of the SQL directory, asked synchronously
    (for ``mta alias resolve``)."""
    from mta.policy.sqldirectory import SQLDirectory

    admin = _admin(config)
    admin.store.close()
    directory = SQLDirectory.open(config)
    domains = directory.local_domains()
    if domains is None:
        directory.close()
        raise _cli().CLIError("the directory cannot be reached")
    return directory.aliases, domains, directory.close


# --- domains -----------------------------------------------------------------------


def domain_add(config: Config, args: argparse.Namespace) -> int:
    if not sql(config):
        raise _cli().CLIError("with directory.backend = \"files\" the local domains are "
                              "local_domains in the configuration: add it there and reload")
    domain = _run(config, lambda a: a.add_domain(args.domain))
    return _seen(config, f"domain {domain} added")


def domain_remove(config: Config, args: argparse.Namespace) -> int:
    if not sql(config):
        raise _cli().CLIError("with directory.backend = \"files\" the local domains are "
                              "local_domains in the configuration: remove it there and reload")
    domain = _run(config, lambda a: a.remove_domain(args.domain))
    return _seen(config, f"domain {domain} removed, with its users, aliases, identities "
                         "and DKIM keys")


def domain_list(config: Config, args: argparse.Namespace) -> int:
    cli = _cli()
    if sql(config):
        domains = sorted(set(_run(config, lambda a: a.domains())) | set(config.local_domains))
    else:
        domains = list(config.local_domains)
    if args.json:
        cli._print_json(domains)
    else:
        for domain in domains:
            cli._out(domain)
    return 0


# --- migrate, import, export ----------------------------------------------------------


def _need_sql(config: Config, what: str) -> None:
    if not sql(config):
        raise _cli().CLIError(f"{what} needs directory.backend = \"sqlite\" or \"postgresql\" "
                              "in the configuration")


def directory_migrate(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.directory import DirectoryUnavailable
    from mta.policy.sqldirectory import DirectoryEditError, latest_version, migrate, open_store

    cli = _cli()
    _need_sql(config, "directory migrate")
    if config.directory.backend == "sqlite":
        config.directory.path.parent.mkdir(parents=True, exist_ok=True)
    store = open_store(config.directory, create=True)
    try:
        applied = migrate(store)
    except (DirectoryUnavailable, DirectoryEditError) as e:
        raise cli.CLIError(f"migration failed: {e}") from None
    finally:
        store.close()
    if applied:
        cli._out(f"applied {', '.join(applied)}; schema version {latest_version()}")
    else:
        cli._out(f"schema version {latest_version()}: up to date")
    return 0


def directory_import(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.aliases import AliasFileError
    from mta.policy.auth import UsersFileError
    from mta.policy.dirfiles import import_files
    from mta.policy.identities import IdentitiesFileError

    cli = _cli()
    _need_sql(config, "directory import")

    def run(admin: Any) -> dict[str, int]:
        try:
            return import_files(config, admin, replace=args.replace)
        except (UsersFileError, AliasFileError, IdentitiesFileError) as e:
            raise cli.CLIError(str(e)) from None

    counts = _run(config, run)
    return _seen(config, "imported " + ", ".join(f"{n} {k}" for k, n in counts.items()))


def directory_export(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.dirfiles import export_files

    cli = _cli()
    _need_sql(config, "directory export")
    target = Path(args.dir)
    counts = _run(config, lambda a: export_files(a, target))
    cli._out(f"exported to {target}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    domains = _run(config, lambda a: a.domains())
    listed = ", ".join(f'"{d}"' for d in domains)
    cli._out(f'for the files back end: domains_dir = "{target}", local_domains = [{listed}]')
    return 0


def register(sub: Any, add: Callable[..., argparse.ArgumentParser],
             alias_sub: Any, helpers: Any) -> None:
    """Add the commands above to the ``mta`` parser (``alias`` exists already);
    ``helpers`` is :mod:`mta.admin.cli` (CLIError, _out, read_password...)."""
    global _helpers
    _helpers = helpers
    p = add(alias_sub, "add", alias_add, "set an alias (replacing its targets if it exists)")
    p.add_argument("domain")
    p.add_argument("name", help="the local part, or * for the catch-all")
    p.add_argument("targets", nargs="+", help="addresses (without @: this domain)")
    p = add(alias_sub, "remove", alias_remove, "remove an alias")
    p.add_argument("domain")
    p.add_argument("name")

    domain = sub.add_parser("domain", help="the local domains (SQL directory)")
    dsub = domain.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, text in (("add", domain_add, "add a local domain"),
                             ("remove", domain_remove, "remove a local domain and all it holds")):
        p = add(dsub, name, func, text)
        p.add_argument("domain")
    add(dsub, "list", domain_list, "list the local domains", json_flag=True)

    directory = sub.add_parser("directory", help="the SQL directory: schema, import, export")
    rsub = directory.add_subparsers(dest="action", metavar="ACTION", required=True)
    add(rsub, "migrate", directory_migrate, "create or upgrade the directory's tables")
    p = add(rsub, "import", directory_import, "copy the files' users, aliases, identities, "
                                               "domains and DKIM keys into SQL")
    p.add_argument("--replace", action="store_true", help="replace domains already in SQL")
    p = add(rsub, "export", directory_export, "write the SQL directory out as files")
    p.add_argument("dir", help="the new domains_dir")
