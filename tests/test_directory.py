"""The directory's contract, the same for the three back ends: files, SQLite, PostgreSQL.

Each back end is built from the same files: the files back end reads them;
for SQLite and PostgreSQL (a real server, the session's ``postgres``
fixture, a fresh database per test) ``mta directory migrate`` creates the
tables and ``mta directory import`` copies the files in, through the
command itself.  The contract tests then ask every back end the same
questions (AUTH, alias expansion with its drop characters, suffixes,
catch-all, pipes and loops, sender identities, local domains) and expect the
same answers; an SQL directory is asked through its own thread pool, as the
daemon asks it.  Then what only SQL has: the cache (TTL, bounded, negative
answers), schema versions, pipes refused without ``allow_pipes``, the
admin commands, export, and a database that stops answering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mta.admin import cli
from mta.config import config_from_dict
from mta.policy.aliases import AliasLoopError, Target
from mta.policy.auth import hash_password, read_users_file
from mta.policy.directory import DirectoryUnavailable, FilesDirectory
from mta.policy.sqldirectory import (
    SchemaError,
    SQLAdmin,
    SQLDirectory,
    TTLCache,
    latest_version,
    migrate,
    open_store,
    schema_version,
)

ORG, NET = "example.org", "example.net"
USERS = {ORG: {"alice": "alice-secret", "bob": "bob-secret", "firstlast": "fl-secret"},
         NET: {"carol": "carol-secret"}}
ALIASES = {ORG: """\
# the contract's aliases
info: alice, bob@other.example
team: info, carol@example.net
archive: | /usr/bin/archive --all
loop1: loop2
loop2: loop1
self: self, alice
*: bob
""", NET: "sales: carol, alice@example.org\n"}
IDENTITIES = {ORG: "alice: sales@example.org, @example.net\nbob: *\n"}
PASSWORDS: dict[str, str] = {}


def _hash(password: str) -> str:
    # One hash per password for the whole module: scrypt is deliberately slow.
    if password not in PASSWORDS:
        PASSWORDS[password] = hash_password(password, n=1024)
    return PASSWORDS[password]


def write_files(root: Path) -> None:
    for domain, users in USERS.items():
        base = root / "domains" / domain
        base.mkdir(parents=True, exist_ok=True)
        (base / "users").write_text("".join(f"{u} {_hash(p)}\n" for u, p in users.items()))
        (base / "aliases").write_text(ALIASES.get(domain, ""))
        if domain in IDENTITIES:
            (base / "identities").write_text(IDENTITIES[domain])


def raw_config(root: Path, directory: dict[str, Any]) -> dict[str, Any]:
    return {"hostname": "mx.example.org", "local_domains": [ORG, NET],
            "data_dir": str(root / "var"), "domains_dir": str(root / "domains"),
            "directory": directory}


def write_config(root: Path, directory: dict[str, Any]) -> Path:
    import json

    lines = ['hostname = "mx.example.org"', f'local_domains = ["{ORG}", "{NET}"]',
             f'data_dir = {json.dumps(str(root / "var"))}',
             f'domains_dir = {json.dumps(str(root / "domains"))}',
             f'control_socket = {json.dumps(str(root / "ctl.sock"))}', "", "[directory]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in directory.items()]
    path = root / "mta.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def directory_settings(backend: str, root: Path, request: Any) -> dict[str, Any]:
    if backend == "sqlite":
        return {"backend": "sqlite", "path": str(root / "dir.sqlite"), "allow_pipes": True}
    if backend == "postgresql":
        pg = request.getfixturevalue("postgres")
        return {"backend": "postgresql", "dsn": pg.dsn(pg.create_database()), "pool_size": 2,
                "allow_pipes": True}
    return {}


def run_cli(*argv: str, stdin: str | None = None, monkeypatch: Any = None) -> int:
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main(list(argv))


@pytest.fixture(params=["files", "sqlite", "postgresql"])
def directory(request, tmp_path):
    """A started directory of each back end holding the contract's data."""
    write_files(tmp_path)
    settings = directory_settings(request.param, tmp_path, request)
    config = config_from_dict(raw_config(tmp_path, settings), tmp_path)
    if request.param == "files":
        d = FilesDirectory.load(config)
    else:
        path = write_config(tmp_path, settings)
        assert cli.main(["directory", "migrate", "--config", str(path)]) == 0
        assert cli.main(["directory", "import", "--config", str(path)]) == 0
        d = SQLDirectory.open(config, reactor)
    yield d
    d.close()


async def ask(directory: Any, f: Any, *args: Any) -> Any:
    """``f(*args)`` as the daemon asks it: through the directory (threads for SQL)."""
    return await directory.defer(f, *args)


# --- the contract ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_authenticate_gives_the_canonical_user_only_for_the_right_password(directory):
    async def auth(user: str, password: str) -> Any:
        return await directory.users.authenticate(user, password)

    assert await auth("alice@example.org", "alice-secret") == "alice@example.org"
    assert await auth("ALICE@Example.ORG", "alice-secret") == "alice@example.org"
    assert await auth("carol@example.net", "carol-secret") == "carol@example.net"
    assert await auth("alice@example.org", "bob-secret") is None
    assert await auth("nobody@example.org", "alice-secret") is None
    assert await auth("alice@example.net", "alice-secret") is None  # the wrong domain
    assert await auth("no-at-sign", "x") is None


@pytest_twisted.ensureDeferred
async def test_exists_for_users_aliases_postmaster_and_the_catch_all(directory):
    aliases = directory.aliases
    for local, domain, expected in [("alice", ORG, True), ("info", ORG, True),
                                    ("anything", ORG, True),  # the catch-all
                                    ("carol", NET, True), ("sales", NET, True),
                                    ("postmaster", NET, True), ("nobody", NET, False),
                                    ("alice", "elsewhere.example", False)]:
        assert await ask(directory, aliases.exists, local, domain) is expected, (local, domain)
    assert await ask(directory, directory.users.exists, "alice", ORG) is True
    assert await ask(directory, directory.users.exists, "info", ORG) is False


@pytest_twisted.ensureDeferred
async def test_resolve_follows_the_files_semantics(directory):
    resolve = directory.aliases.resolve

    assert await ask(directory, resolve, "info@example.org") == [
        Target("local", "alice@example.org", "alice@example.org"),
        Target("remote", "bob@other.example")]
    # Nested, across domains, without duplicates.
    assert await ask(directory, resolve, "team@example.org") == [
        Target("local", "alice@example.org", "alice@example.org"),
        Target("remote", "bob@other.example"),
        Target("local", "carol@example.net", "carol@example.net")]
    # Suffix and drop characters; the catch-all only when nothing else matches.
    assert await ask(directory, resolve, "Alice+tag@example.org") == [
        Target("local", "Alice+tag@example.org", "alice@example.org")]
    assert await ask(directory, resolve, "first.last@example.org") == [
        Target("local", "first.last@example.org", "firstlast@example.org")]
    assert await ask(directory, resolve, "whoever@example.org") == [
        Target("local", "bob@example.org", "bob@example.org")]
    assert await ask(directory, resolve, "archive@example.org") == [
        Target("pipe", "/usr/bin/archive --all")]
    # A cycle through an alias of the same name as nothing: loops are refused.
    with pytest.raises(AliasLoopError):
        await ask(directory, resolve, "loop1@example.org")
    assert await ask(directory, resolve, "self@example.org") == [
        Target("local", "alice@example.org", "alice@example.org")]
    assert await ask(directory, resolve, "sales@example.net") == [
        Target("local", "carol@example.net", "carol@example.net"),
        Target("local", "alice@example.org", "alice@example.org")]
    assert await ask(directory, resolve, "someone@remote.example") == [
        Target("remote", "someone@remote.example")]


@pytest_twisted.ensureDeferred
async def test_identities_bind_senders(directory):
    may = directory.identities.may_send_as
    assert await ask(directory, may, "alice@example.org", "Alice+x@example.org") is True
    assert await ask(directory, may, "alice@example.org", "sales@example.org") is True
    assert await ask(directory, may, "alice@example.org", "anyone@example.net") is True
    assert await ask(directory, may, "alice@example.org", "bob@example.org") is False
    assert await ask(directory, may, "alice@example.org", "") is False
    assert await ask(directory, may, "bob@example.org", "") is True  # *: the null sender too
    assert await ask(directory, may, "carol@example.net", "alice@example.org") is False


def test_local_domains(directory):
    assert directory.local_domains() == frozenset({ORG, NET})
    assert directory.aliases.is_local_domain(ORG)
    assert not directory.aliases.is_local_domain("other.example")


# --- SQL only -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_setup(request, tmp_path, monkeypatch):
    """``(config path, config)`` of an SQL directory that is migrated and empty."""
    write_files(tmp_path)
    settings = directory_settings(request.param, tmp_path, request)
    settings["allow_pipes"] = False
    settings["cache_ttl"] = 0.5
    path = write_config(tmp_path, settings)
    assert cli.main(["directory", "migrate", "--config", str(path)]) == 0
    config = config_from_dict(raw_config(tmp_path, settings), tmp_path)
    return path, config


def test_migrate_is_versioned_and_idempotent(sql_setup, capsys):
    path, config = sql_setup
    store = open_store(config.directory)
    try:
        assert schema_version(store) == latest_version() == 1
        assert migrate(store) == []
        tables = {"domains", "users", "aliases", "identities", "dkim_keys", "schema_version"}
        for table in tables:
            store.query(f"SELECT COUNT(*) FROM {table}")
    finally:
        store.close()
    capsys.readouterr()
    assert cli.main(["directory", "migrate", "--config", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_an_unmigrated_database_stops_the_start_with_a_clear_error(tmp_path, request):
    settings = directory_settings("postgresql", tmp_path, request)
    config = config_from_dict(raw_config(tmp_path, settings), tmp_path)
    with pytest.raises(SchemaError, match="version 0.*mta directory migrate"):
        SQLDirectory.open(config)
    sqlite = config_from_dict(raw_config(tmp_path, {"backend": "sqlite"}), tmp_path)
    with pytest.raises(SchemaError, match="does not exist.*mta directory migrate"):
        SQLDirectory.open(sqlite)


def test_admin_commands_edit_the_tables(sql_setup, capsys, monkeypatch):
    path, config = sql_setup
    c = ["--config", str(path)]
    assert run_cli("domain", "add", "Example.ORG", *c) == 0
    assert run_cli("domain", "add", "example.org", *c) == 1
    assert "exists already" in capsys.readouterr().err
    assert run_cli("user", "add", "example.org", "Dave", *c, stdin="dave-pw\n",
                   monkeypatch=monkeypatch) == 0
    assert "user dave@example.org added; every node sees it within 0.5 s" in capsys.readouterr().out
    assert run_cli("user", "add", "unknown.example", "x", *c, stdin="pw\n",
                   monkeypatch=monkeypatch) == 1
    assert "not a local domain" in capsys.readouterr().err
    assert run_cli("user", "list", "example.org", "--json", *c) == 0
    assert '"dave"' in capsys.readouterr().out
    assert run_cli("alias", "add", "example.org", "Help", "dave", "x@remote.example", *c) == 0
    assert run_cli("alias", "add", "example.org", "run", "| /bin/sh -c evil", *c) == 1
    assert "allow_pipes" in capsys.readouterr().err
    assert run_cli("alias", "resolve", "help+x@example.org", "--json", *c) == 0
    out = capsys.readouterr().out
    assert '"mailbox": "dave@example.org"' in out and '"address": "x@remote.example"' in out
    # The row itself, as another node (or a DBA) reads it.
    store = open_store(config.directory)
    try:
        assert store.query("SELECT name, position, target FROM aliases ORDER BY position") == [
            ("help", 0, "dave"), ("help", 1, "x@remote.example")]
        (stored,), = store.query("SELECT password FROM users WHERE local = 'dave'")
        assert stored.startswith("$scrypt$n=16384,r=8,p=1$")
    finally:
        store.close()
    assert run_cli("user", "passwd", "example.org", "dave", *c, stdin="new-pw\n",
                   monkeypatch=monkeypatch) == 0
    assert run_cli("alias", "remove", "example.org", "help", *c) == 0
    assert run_cli("user", "remove", "example.org", "dave", *c) == 0
    assert run_cli("user", "remove", "example.org", "dave", *c) == 1
    assert "no user 'dave'" in capsys.readouterr().err
    assert run_cli("domain", "list", *c) == 0
    assert capsys.readouterr().out.split() == [NET, ORG]  # config's and SQL's
    assert run_cli("domain", "remove", "example.org", *c) == 0


def test_import_then_export_gives_the_same_files(sql_setup, tmp_path, capsys):
    path, config = sql_setup
    # Without allow_pipes the files' pipe alias is refused, and nothing is imported.
    assert cli.main(["directory", "import", "--config", str(path)]) == 1
    assert "allow_pipes" in capsys.readouterr().err
    (tmp_path / "domains" / ORG / "aliases").write_text(
        ALIASES[ORG].replace("archive: | /usr/bin/archive --all\n", ""))
    assert cli.main(["directory", "import", "--config", str(path)]) == 0
    assert "imported 2 domains, 4 users, 7 aliases, 3 identities, 0 dkim_keys" in capsys.readouterr().out
    assert cli.main(["directory", "import", "--config", str(path)]) == 1
    assert "--replace" in capsys.readouterr().err
    out = tmp_path / "exported"
    assert cli.main(["directory", "export", str(out), "--config", str(path)]) == 0
    for domain, users in USERS.items():
        assert read_users_file(out / domain / "users") == {
            u: _hash(p) for u, p in users.items()}
    assert (out / ORG / "aliases").read_text().splitlines() == [
        "info: alice@example.org, bob@other.example", "loop1: loop2@example.org",
        "loop2: loop1@example.org", "self: self@example.org, alice@example.org",
        "team: info@example.org, carol@example.net", "*: bob@example.org"]
    assert (out / ORG / "identities").read_text().splitlines() == [
        "alice: @example.net, sales@example.org", "bob: *"]


def test_a_pipe_row_without_allow_pipes_is_ignored_and_logged(sql_setup, capsys):
    from twisted.logger import globalLogPublisher

    path, config = sql_setup
    admin = SQLAdmin(open_store(config.directory), allow_pipes=True)
    admin.add_domain(ORG)
    admin.set_alias(ORG, "run", ["| /bin/evil"])  # as a DBA could write it
    admin.set_alias(ORG, "both", ["alice", "x@remote.example"])
    admin.store.close()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    d = SQLDirectory.open(config)
    try:
        with pytest.raises(AliasLoopError):  # nothing left to deliver to
            d.aliases.resolve("run@example.org")
    finally:
        globalLogPublisher.removeObserver(events.append)
        d.close()
    assert any(e.get("event") == "directory" and e.get("result") == "pipe_refused"
               for e in events)


def test_changes_are_seen_within_the_ttl_and_negative_answers_are_cached(sql_setup):
    path, config = sql_setup
    now = [1000.0]
    admin = SQLAdmin(open_store(config.directory))
    admin.add_domain(ORG)
    d = SQLDirectory(config, open_store(config.directory), clock=lambda: now[0])
    try:
        assert d.aliases.exists("late", ORG) is False
        admin.set_alias(ORG, "late", ["x@remote.example"])
        assert d.aliases.exists("late", ORG) is False  # the cached "no"
        now[0] += 0.6  # past cache_ttl = 0.5
        assert d.aliases.resolve("late@example.org") == [Target("remote", "x@remote.example")]
        admin.set_alias(ORG, "late", ["y@remote.example"])
        assert d.aliases.resolve("late@example.org") == [Target("remote", "x@remote.example")]
        now[0] += 0.6
        assert d.aliases.resolve("late@example.org") == [Target("remote", "y@remote.example")]
    finally:
        d.close()
        admin.store.close()


def test_the_cache_is_bounded_and_expires():
    now = [0.0]
    cache = TTLCache(ttl=10, size=3, clock=lambda: now[0])
    for i in range(5):
        cache.put(i, str(i))
    assert len(cache) == 3
    assert [cache.get(i) == str(i) for i in range(5)] == [False, False, True, True, True]
    now[0] = 10.0
    assert cache.get(4) != "4"
    off = TTLCache(ttl=0, size=100)
    off.put("k", "v")
    assert len(off) == 0


def test_a_database_that_does_not_answer_raises_directory_unavailable(tmp_path, request):
    """A lookup against a server nobody runs: DirectoryUnavailable (no hang: timeout)."""
    from tests.daemon import free_port

    settings = {"backend": "postgresql", "timeout": 1.0,
                "dsn": f"host=127.0.0.1 port={free_port()} user=mta dbname=none"}
    config = config_from_dict(raw_config(tmp_path, settings), tmp_path)
    d = SQLDirectory(config, open_store(config.directory))
    try:
        with pytest.raises(DirectoryUnavailable, match="postgresql"):
            d.aliases.exists("alice", ORG)
        with pytest.raises(DirectoryUnavailable):
            d.identities.may_send_as("alice@example.org", "x@example.org")
    finally:
        d.close()


def test_config_validates_the_directory_section(tmp_path):
    from mta.config import ConfigError

    for settings, message in [({"backend": "ldap"}, "backend"),
                              ({"backend": "postgresql"}, "dsn"),
                              ({"pool_size": 0}, "pool_size"),
                              ({"cache_ttl": -1}, "cache_ttl"),
                              ({"colour": "blue"}, "unknown key")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw_config(tmp_path, settings), tmp_path)
    default = config_from_dict({"hostname": "h.example"}, tmp_path).directory
    assert default.backend == "files" and default.cache_ttl == 30.0
    sqlite = config_from_dict(raw_config(tmp_path, {"backend": "sqlite"}), tmp_path).directory
    assert sqlite.path == tmp_path / "var" / "directory.sqlite"


def test_check_config_names_an_unmigrated_directory(tmp_path, request, capsys):
    write_files(tmp_path)
    path = write_config(tmp_path, directory_settings("postgresql", tmp_path, request))
    assert cli.main(["check-config", "--config", str(path)]) == 1
    assert "directory: the directory's schema is version 0, this mta needs 1: run " \
           "`mta directory migrate`" in capsys.readouterr().out
    assert cli.main(["directory", "migrate", "--config", str(path)]) == 0
    capsys.readouterr()
    cli.main(["check-config", "--config", str(path)])
    assert "directory:" not in capsys.readouterr().out
