"""The directory in SQL: SQLite (stdlib ``sqlite3``) or PostgreSQL (psycopg 3 and psycopg_pool).

The tables (``migrations/*.sql``, applied in order by ``mta directory
migrate``, which records each in ``schema_version``) hold what the files
hold, in the same forms: ``domains``, ``users`` (scrypt hashes as in a users
file), ``aliases`` (one row per target, in ``position`` order: an address, a
local part meaning this domain, or ``| command``; ``*`` is the catch-all),
``identities`` (sender binding) and ``dkim_keys``.  Names are stored folded
(:func:`mta.mail.address.fold_local`) and domains normalised, by the
writers here, so a lookup is one equality on the primary key.

Lookups and threads.  psycopg 3's asynchronous API runs on asyncio, and this
MTA runs on its own epoll reactor (:mod:`mta.system.fastpoll`), not on
Twisted's asyncio reactor: bridging would mean a second event loop.  So the
plain (blocking) driver is used in threads: a Twisted thread pool of its own,
of ``pool_size`` threads, over a psycopg_pool ``ConnectionPool`` of at most
as many connections (one connection per thread that holds one, never
waiting on each other); each connection is checked as it is taken, so the
pool drops and remakes the connections that a restarted server closed (it
recovers by itself).  SQLite uses the same thread pool with one connection per
thread.  Every query is bounded by ``timeout`` (waiting for a connection,
connecting, the statement itself).

Every answer is cached (:class:`TTLCache`: ``cache_ttl`` seconds, at most
``cache_size`` entries, "no such user" too), so a node asks the database at
most once per TTL per question, and sees a change within it.

The alias, user and identity rules are those of the files: the classes
here are :class:`~mta.policy.aliases.AliasResolver`,
:class:`~mta.policy.auth.UserDB` and :class:`~mta.policy.identities.Identities`
over tables that look up one key at a time, so the semantics cannot drift.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from mta.mail.address import AddressError, fold_local, normalize_domain
from mta.policy.aliases import CATCH_ALL, AliasResolver, Dest, Pipe, parse_lhs, parse_target
from mta.policy.auth import _DUMMY_HASH, UserDB, check_local, parse_hash, verify_password
from mta.policy.directory import DirectoryUnavailable
from mta.policy.identities import Identities, _canonical

log = Logger()

MIGRATIONS = Path(__file__).parent / "migrations"
MAX_TARGETS = 1000  # targets of one alias a writer accepts (and a lookup reads)
MAX_LIST = 1_000_000  # rows a listing reads at most


class SchemaError(Exception):
    """The database's schema is older (or newer) than this version of the MTA expects."""


class DirectoryEditError(ValueError):
    """An edit that makes no sense (a user that exists already, an unknown domain...)."""


# --- migrations -------------------------------------------------------------------


def migrations() -> list[tuple[int, str, list[str]]]:
    """``(version, file name, statements)`` of every migration file, in order."""
    out = []
    for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                         if not line.lstrip().startswith("--"))
        text = re.sub(r"--[^\n]*", "", text)
        statements = [s.strip() for s in text.split(";") if s.strip()]
        out.append((int(path.name[:4]), path.name, statements))
    return out


def latest_version() -> int:
    return max(v for v, _, _ in migrations())


# --- the cache --------------------------------------------------------------------

_MISS = object()


class TTLCache:
    """Answers kept ``ttl`` seconds, at most ``size`` of them (least recently used
    go first); safe to share between threads.  ``clock`` is monotonic seconds."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value, or ``_MISS`` when absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return _MISS
            if entry[0] <= self.clock():
                del self._entries[key]
                return _MISS
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Any, value: Any) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:  # bounded: at most one over
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# --- the stores: one query at a time, blocking ----------------------------------


class _Health:
    """One log event when the database stops answering, one when it is back;
    each failed lookup is also an event (counted by the metrics)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.down = False

    def failed(self, err: str) -> None:
        log.warn("directory ({backend}) unavailable: {err}", backend=self.backend, err=err,
                 event="directory", result="unavailable")
        self.down = True

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.info("directory ({backend}) answers again", backend=self.backend,
                     event="directory", result="recovered")


class SQLiteStore:
    """One SQLite file; a connection per thread (sqlite3 connections are not shared)."""

    backend = "sqlite"

    def __init__(self, path: Path, timeout: float, create: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.create = create
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.health = _Health(self.backend)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # mode=rw: a missing file is an error, not a new empty directory.
            uri = f"file:{self.path}?mode={'rwc' if self.create else 'rw'}"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            rows = self._connection().execute(sql, params).fetchmany(MAX_LIST)
        except sqlite3.Error as e:
            self.health.failed(str(e))
            raise DirectoryUnavailable(f"sqlite {self.path}: {e}") from None
        self.health.answered()
        return rows

    def transaction(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.IntegrityError as e:
            raise DirectoryEditError(str(e)) from None
        except sqlite3.Error as e:
            raise DirectoryUnavailable(f"sqlite {self.path}: {e}") from None

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


class PostgresStore:
    """A psycopg_pool ConnectionPool of at most ``pool_size`` connections (autocommit)."""

    backend = "postgresql"

    def __init__(self, dsn: str, pool_size: int, timeout: float) -> None:
        from psycopg_pool import ConnectionPool

        self.timeout = timeout
        self.health = _Health(self.backend)
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, timeout=timeout, open=False,
            name="mta-directory", check=ConnectionPool.check_connection,
            reconnect_timeout=max(60.0, 10 * timeout),
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout)),
                    "options": f"-c statement_timeout={int(timeout * 1000)}"})
        # Not waiting: a database down at start is not a reason not to start.
        self._pool.open(wait=False)

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with self._pool.connection() as conn:
                rows = conn.execute(self._sql(sql), params).fetchmany(MAX_LIST)
        except psycopg.Error as e:  # PoolTimeout is one too
            err = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.health.failed(err)
            raise DirectoryUnavailable(f"postgresql: {err}") from None
        self.health.answered()
        return rows

    def transaction(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        import psycopg

        try:
            with self._pool.connection() as conn, conn.transaction():
                for sql, params in statements:
                    conn.execute(self._sql(sql), params)
        except psycopg.IntegrityError as e:
            raise DirectoryEditError(str(e).strip().splitlines()[0]) from None
        except psycopg.Error as e:
            raise DirectoryUnavailable(f"postgresql: {str(e).strip()}") from None

    def close(self) -> None:
        self._pool.close(timeout=self.timeout)


def open_store(directory: Any, create: bool = False) -> Any:
    """The store of a :class:`mta.config.DirectoryConfig` (sqlite or postgresql)."""
    if directory.backend == "sqlite":
        return SQLiteStore(directory.path, directory.timeout, create=create)
    if directory.backend == "postgresql":
        return PostgresStore(directory.dsn, directory.pool_size, directory.timeout)
    raise ValueError(f"no SQL store for backend {directory.backend!r}")


def schema_version(store: Any) -> int:
    """The version recorded in ``schema_version`` (0: never migrated)."""
    try:
        rows = store.query("SELECT MAX(version) FROM schema_version")
    except DirectoryUnavailable as e:
        if "schema_version" in str(e):  # no such table / relation does not exist
            return 0
        raise
    return rows[0][0] or 0 if rows else 0


def migrate(store: Any) -> list[str]:
    """Apply the migrations newer than the database's version; the names applied.

    Each migration and its ``schema_version`` row are one transaction (both
    SQLite and PostgreSQL have transactional DDL), so a failure leaves the
    previous version whole."""
    store.transaction([("CREATE TABLE IF NOT EXISTS schema_version ("
                        "version INTEGER PRIMARY KEY, applied TEXT NOT NULL)", ())])
    if isinstance(store, SQLiteStore):
        store.query("PRAGMA journal_mode = WAL")  # readers never wait for the admin's writes
    current = schema_version(store)
    applied = []
    for version, name, statements in migrations():
        if version <= current:
            continue
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        store.transaction([(s, ()) for s in statements]
                          + [("INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                              (version, stamp))])
        applied.append(name)
    return applied


# --- cached lookups ---------------------------------------------------------------


class NeedsLookup(Exception):
    """A question asked with :meth:`Lookups.from_cache` whose answer is not cached."""


class Lookups:
    """Each question the rules ask, as one cached query (safe from any thread).

    :meth:`from_cache` runs a decision on the calling thread (the reactor's)
    with the cache alone: NeedsLookup as soon as it would need a query, and
    then the caller asks again in the directory's threads.  A recipient seen
    within the TTL is so decided without a thread or a Deferred."""

    def __init__(self, store: Any, cache: TTLCache, allow_pipes: bool = False) -> None:
        self.store = store
        self.cache = cache
        self.allow_pipes = allow_pipes
        self._local = threading.local()

    def from_cache(self, f: Callable[..., Any], *args: Any) -> Any:
        self._local.cache_only = True
        try:
            return f(*args)
        finally:
            self._local.cache_only = False

    def _cached(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        value = self.cache.get(key)
        if value is _MISS:
            if getattr(self._local, "cache_only", False):
                raise NeedsLookup(key)
            value = load()
            self.cache.put(key, value)
        return value

    def domain_names(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.store.query("SELECT name FROM domains"))

    def password(self, domain: str, local: str) -> str | None:
        def load() -> str | None:
            rows = self.store.query("SELECT password FROM users WHERE domain = ? AND local = ?",
                                    (domain, local))
            return rows[0][0] if rows else None

        return self._cached(("user", domain, local), load)

    def alias(self, domain: str, name: str) -> tuple[Dest, ...] | None:
        def load() -> tuple[Dest, ...] | None:
            rows = self.store.query("SELECT target FROM aliases WHERE domain = ? AND name = ? "
                                    "ORDER BY position", (domain, name))
            if not rows:
                return None
            return tuple(d for d in (self._dest(domain, name, r[0]) for r in rows[:MAX_TARGETS])
                         if d is not None)

        return self._cached(("alias", domain, name), load)

    def _dest(self, domain: str, name: str, text: str) -> Dest | None:
        text = text.strip()
        if text.startswith("|"):
            if self.allow_pipes and text[1:].strip():
                return Pipe(text[1:].strip())
            log.warn("alias {name}@{domain}: a pipe target in SQL is ignored "
                     "(directory.allow_pipes is off)", name=name, domain=domain,
                     event="directory", result="pipe_refused")
            return None
        try:
            return parse_target(text, domain)
        except ValueError as e:
            log.warn("alias {name}@{domain}: target ignored: {err}", name=name, domain=domain,
                     err=str(e), event="directory", result="bad_row")
            return None

    def identities(self, domain: str, local: str) -> frozenset[str]:
        def load() -> frozenset[str]:
            rows = self.store.query("SELECT identity FROM identities WHERE domain = ? "
                                    "AND local = ?", (domain, local))
            return frozenset(r[0] for r in rows)

        return self._cached(("identities", domain, local), load)


class _DomainTable:
    """One domain's rows of one kind, as the rules read a dict: ``in``, ``[]``, ``get``."""

    __slots__ = ("_find", "_domain")

    def __init__(self, find: Callable[[str, str], Any], domain: str) -> None:
        self._find = find
        self._domain = domain

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(self._domain, key) is not None

    def __getitem__(self, key: str) -> Any:
        value = self._find(self._domain, key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._find(self._domain, key)
        return default if value is None else value


class _ByDomain:
    """``{domain: _DomainTable}`` made on demand."""

    __slots__ = ("_find",)

    def __init__(self, find: Callable[[str, str], Any]) -> None:
        self._find = find

    def get(self, domain: str, default: Any = None) -> _DomainTable:
        return _DomainTable(self._find, domain)

    __getitem__ = get


class _IdentityTable:
    """``{"user@domain": entries}`` as :class:`Identities` reads it."""

    def __init__(self, lookups: Lookups) -> None:
        self._lookups = lookups

    def get(self, user: str, default: Any = frozenset()) -> frozenset[str]:
        local, _, domain = user.rpartition("@")
        return self._lookups.identities(domain, local) or default


class SQLUserDB(UserDB):
    """:class:`UserDB` over the ``users`` table: ``authenticate`` looks the user up
    in the directory's threads, then checks the hash as the files do (dummy hash
    for an unknown user: no enumeration by timing)."""

    blocking = True

    def __init__(self, lookups: Lookups, defer: Callable[..., Deferred[Any]],
                 run_in_thread: Any = None) -> None:
        from mta.policy.auth import _default_run_in_thread

        self._users = _ByDomain(lookups.password)  # type: ignore[assignment]
        self._run = run_in_thread or _default_run_in_thread
        self._lookups = lookups
        self.defer = defer

    def users(self, domain: str) -> list[str]:
        rows = self._lookups.store.query("SELECT local FROM users WHERE domain = ? "
                                         "ORDER BY local", (domain,))
        return [r[0] for r in rows]

    def authenticate(self, username: str, password: str) -> Deferred[str | None]:
        """Fires with the canonical user or None; fails with DirectoryUnavailable."""

        def found(entry: tuple[str, str] | None) -> Deferred[str | None]:
            stored = entry[1] if entry else _DUMMY_HASH
            d = maybeDeferred(self._run, verify_password, stored, password)
            return d.addCallback(lambda ok: entry[0] if ok and entry else None)

        return self.defer(self._lookup, username).addCallback(found)


class SQLAliasResolver(AliasResolver):
    """:class:`AliasResolver` over the ``aliases`` table and the directory's domains."""

    blocking = True

    def __init__(self, lookups: Lookups, users: Any, options: Any,
                 domains: Callable[[], frozenset[str]], defer: Callable[..., Deferred[Any]]) -> None:
        self._rules = _ByDomain(lookups.alias)  # type: ignore[assignment]
        self._users = users
        self._options = options
        self._domains_now = domains
        self.defer = defer
        self.from_cache = lookups.from_cache  # NeedsLookup when it would need a query

    @property
    def _domains(self) -> frozenset[str]:  # type: ignore[override]
        return self._domains_now()


class SQLIdentities(Identities):
    blocking = True


# --- the directory ----------------------------------------------------------------


class SQLDirectory:
    """The SQL back end of :class:`mta.policy.directory.Directory` for one node.

    ``reactor`` None: no threads (the admin command asks synchronously, and
    ``defer`` runs at once).  The local domains are a snapshot refreshed every
    ``cache_ttl`` seconds (at least 1) in the background, so whether a
    recipient's domain is ours is known without waiting; while the database is
    down the last snapshot stays (relaying goes on as it was decided).
    """

    blocking = True

    def __init__(self, config: Any, store: Any, reactor: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        dcfg = config.directory
        self.backend = dcfg.backend
        self.store = store
        self.config_domains = frozenset(config.local_domains)
        self.lookups = Lookups(store, TTLCache(dcfg.cache_ttl, dcfg.cache_size, clock),
                               dcfg.allow_pipes)
        self.reactor = reactor
        self._pool: Any = None
        self._loop: Any = None
        self._refreshing = False
        self._snapshot: frozenset[str] | None = None
        self._keys: list[tuple[str, str, str | None, str | None]] = []
        if reactor is not None:
            from twisted.python.threadpool import ThreadPool

            self._pool = ThreadPool(minthreads=0, maxthreads=dcfg.pool_size, name="mta-directory")
            self._pool.start()
            self._shutdown = reactor.addSystemEventTrigger("during", "shutdown", self.close)
        self.users = SQLUserDB(self.lookups, self.defer)
        self.aliases = SQLAliasResolver(self.lookups, self.users, config.aliases,
                                        self._domains_or_config, self.defer)
        self.identities = SQLIdentities(_IdentityTable(self.lookups),  # type: ignore[arg-type]
                                        config.aliases.suffix_separators)
        object.__setattr__(self.identities, "defer", self.defer)  # a frozen dataclass

    @classmethod
    def open(cls, config: Any, reactor: Any = None) -> SQLDirectory:
        """Open the store and read the domains and DKIM keys once (SchemaError
        when the database answers with another schema than this code's)."""
        dcfg = config.directory
        if dcfg.backend == "sqlite" and not Path(dcfg.path).exists():
            raise SchemaError(f"{dcfg.path} does not exist: run `mta directory migrate`")
        store = open_store(dcfg)
        directory = cls(config, store, reactor)
        try:
            version = schema_version(store)
            if version != latest_version():
                store.close()
                directory.close()
                raise SchemaError(f"directory schema is version {version}, this mta needs "
                                  f"{latest_version()}: run `mta directory migrate`")
            directory._snapshot = directory.lookups.domain_names()
            directory._keys = [tuple(r) for r in store.query(  # type: ignore[misc]
                "SELECT domain, selector, private_key, key_path FROM dkim_keys "
                "ORDER BY domain, selector")]
        except DirectoryUnavailable:
            pass  # logged by the store; the node starts and retries
        if reactor is not None:
            from twisted.internet.task import LoopingCall

            directory._loop = LoopingCall(directory._refresh)
            directory._loop.clock = reactor
            directory._loop.start(max(1.0, config.directory.cache_ttl), now=False)
        return directory

    def _domains_or_config(self) -> frozenset[str]:
        return self.local_domains() or self.config_domains

    def local_domains(self) -> frozenset[str] | None:
        if self._snapshot is None:
            return None
        return self._snapshot | self.config_domains

    def _refresh(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True

        def got(names: frozenset[str]) -> None:
            self._snapshot = names

        def done(result: Any) -> None:
            self._refreshing = False

        d = self.defer(self.lookups.domain_names)
        d.addCallbacks(got, lambda f: f.trap(DirectoryUnavailable) and None)
        d.addBoth(done)

    def defer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._pool is None:
            return maybeDeferred(f, *args)
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def dkim_keys(self) -> list[tuple[str, str, str | None, str | None]]:
        return list(self._keys)

    def close(self) -> None:
        if self._loop is not None and self._loop.running:
            from twisted.internet.error import AlreadyCalled, AlreadyCancelled

            try:
                self._loop.stop()
            except (AlreadyCalled, AlreadyCancelled):
                pass
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown)
            except (ValueError, KeyError, TypeError):
                pass
        self.store.close()


# --- editing (the admin commands and import) ------------------------------------


def _domain(name: str) -> str:
    try:
        return normalize_domain(name)
    except AddressError as e:
        raise DirectoryEditError(f"{name!r} is not a domain: {e}") from None


def _local(local: str) -> str:
    try:
        return check_local(local)
    except ValueError as e:
        raise DirectoryEditError(str(e)) from None


class SQLAdmin:
    """Edits of the tables, each one transaction, each checked as the files are."""

    def __init__(self, store: Any, allow_pipes: bool = False) -> None:
        self.store = store
        self.allow_pipes = allow_pipes

    def _need_domain(self, domain: str) -> str:
        domain = _domain(domain)
        if not self.store.query("SELECT 1 FROM domains WHERE name = ?", (domain,)):
            raise DirectoryEditError(f"{domain} is not a local domain (mta domain add {domain})")
        return domain

    # domains
    def domains(self) -> list[str]:
        return [r[0] for r in self.store.query("SELECT name FROM domains ORDER BY name")]

    def add_domain(self, domain: str) -> str:
        domain = _domain(domain)
        if domain in self.domains():
            raise DirectoryEditError(f"domain {domain} exists already")
        self.store.transaction([("INSERT INTO domains (name) VALUES (?)", (domain,))])
        return domain

    def remove_domain(self, domain: str) -> str:
        domain = self._need_domain(domain)
        # Explicit deletes (SQLite enforces ON DELETE CASCADE only with foreign_keys on).
        self.store.transaction([(f"DELETE FROM {table} WHERE domain = ?", (domain,))
                                for table in ("dkim_keys", "identities", "aliases", "users")]
                               + [("DELETE FROM domains WHERE name = ?", (domain,))])
        return domain

    # users
    def users(self, domain: str) -> list[str]:
        domain = self._need_domain(domain)
        return [r[0] for r in self.store.query(
            "SELECT local FROM users WHERE domain = ? ORDER BY local", (domain,))]

    def has_user(self, domain: str, local: str) -> bool:
        return bool(self.store.query("SELECT 1 FROM users WHERE domain = ? AND local = ?",
                                     (_domain(domain), _local(local))))

    def add_user(self, domain: str, local: str, password_hash: str) -> str:
        domain, local = self._need_domain(domain), _local(local)
        parse_hash(password_hash)
        if self.has_user(domain, local):
            raise DirectoryEditError(f"user {local!r} already exists in {domain}")
        self.store.transaction([("INSERT INTO users (domain, local, password) VALUES (?, ?, ?)",
                                 (domain, local, password_hash))])
        return f"{local}@{domain}"

    def set_password(self, domain: str, local: str, password_hash: str) -> str:
        domain, local = self._need_domain(domain), _local(local)
        parse_hash(password_hash)
        if not self.has_user(domain, local):
            raise DirectoryEditError(f"no user {local!r} in {domain}")
        self.store.transaction([("UPDATE users SET password = ? WHERE domain = ? AND local = ?",
                                 (password_hash, domain, local))])
        return f"{local}@{domain}"

    def remove_user(self, domain: str, local: str) -> str:
        domain, local = self._need_domain(domain), _local(local)
        if not self.has_user(domain, local):
            raise DirectoryEditError(f"no user {local!r} in {domain}")
        self.store.transaction([
            ("DELETE FROM identities WHERE domain = ? AND local = ?", (domain, local)),
            ("DELETE FROM users WHERE domain = ? AND local = ?", (domain, local))])
        return f"{local}@{domain}"

    # aliases
    def check_targets(self, domain: str, targets: Sequence[str]) -> list[str]:
        """The targets as stored: addresses checked; a pipe alone on its alias, and
        only with directory.allow_pipes (whoever can write the table could
        otherwise run commands as the MTA; without it pipes stay in the files)."""
        if not targets:
            raise DirectoryEditError("an alias needs at least one target")
        if len(targets) > MAX_TARGETS:
            raise DirectoryEditError(f"more than {MAX_TARGETS} targets")
        out = []
        for text in targets:
            text = text.strip()
            if text.startswith("|"):
                if not self.allow_pipes:
                    raise DirectoryEditError("pipe targets are allowed in SQL only with "
                                             "directory.allow_pipes = true")
                if len(targets) != 1 or not text[1:].strip():
                    raise DirectoryEditError("a pipe target must be the only target of its alias")
                out.append("| " + text[1:].strip())
                continue
            try:
                parse_target(text, domain)
            except ValueError as e:
                raise DirectoryEditError(str(e)) from None
            out.append(text)
        return out

    def aliases(self, domain: str) -> dict[str, list[str]]:
        domain = self._need_domain(domain)
        table: dict[str, list[str]] = {}
        for name, target in self.store.query("SELECT name, target FROM aliases WHERE domain = ? "
                                             "ORDER BY name, position", (domain,)):
            table.setdefault(name, []).append(target)
        return table

    def set_alias(self, domain: str, name: str, targets: Sequence[str]) -> str:
        """Create or replace alias ``name`` (``*``: the catch-all) with ``targets``."""
        domain = self._need_domain(domain)
        try:
            name = parse_lhs(name)
        except ValueError as e:
            raise DirectoryEditError(str(e)) from None
        try:
            stored = self.check_targets(domain, targets)
        except DirectoryEditError as e:
            raise DirectoryEditError(f"alias {name}@{domain}: {e}") from None
        self.store.transaction(
            [("DELETE FROM aliases WHERE domain = ? AND name = ?", (domain, name))]
            + [("INSERT INTO aliases (domain, name, position, target) VALUES (?, ?, ?, ?)",
                (domain, name, i, t)) for i, t in enumerate(stored)])
        return f"{name}@{domain}"

    def remove_alias(self, domain: str, name: str) -> str:
        domain = self._need_domain(domain)
        name = name.strip() if name.strip() == CATCH_ALL else _local(name)
        if not self.store.query("SELECT 1 FROM aliases WHERE domain = ? AND name = ?",
                                (domain, name)):
            raise DirectoryEditError(f"no alias {name!r} in {domain}")
        self.store.transaction([("DELETE FROM aliases WHERE domain = ? AND name = ?",
                                 (domain, name))])
        return f"{name}@{domain}"

    # identities and DKIM keys
    def identities(self, domain: str) -> dict[str, list[str]]:
        domain = self._need_domain(domain)
        table: dict[str, list[str]] = {}
        for local, identity in self.store.query("SELECT local, identity FROM identities WHERE "
                                                "domain = ? ORDER BY local, identity", (domain,)):
            table.setdefault(local, []).append(identity)
        return table

    def add_identity(self, domain: str, local: str, identity: str, suffixes: str = "+") -> None:
        domain, local = self._need_domain(domain), _local(local)
        identity = identity.strip()
        if identity == "*":
            entry = "*"
        elif identity.startswith("@"):
            entry = "@" + _domain(identity[1:])
        elif "@" in identity:
            entry = _canonical(identity, suffixes)
        else:
            raise DirectoryEditError(f"{identity!r} is not an address, @domain or *")
        self.store.transaction([("DELETE FROM identities WHERE domain = ? AND local = ? AND "
                                 "identity = ?", (domain, local, entry)),
                                ("INSERT INTO identities (domain, local, identity) "
                                 "VALUES (?, ?, ?)", (domain, local, entry))])

    def dkim_keys(self) -> list[tuple[str, str, str | None, str | None]]:
        return [tuple(r) for r in self.store.query(  # type: ignore[misc]
            "SELECT domain, selector, private_key, key_path FROM dkim_keys "
            "ORDER BY domain, selector")]

    def set_dkim_key(self, domain: str, selector: str, pem: str | None = None,
                     path: str | None = None) -> None:
        domain = self._need_domain(domain)
        if (pem is None) == (path is None):
            raise DirectoryEditError("a DKIM key is a PEM or a path, one of them")
        self.store.transaction([
            ("DELETE FROM dkim_keys WHERE domain = ? AND selector = ?", (domain, selector)),
            ("INSERT INTO dkim_keys (domain, selector, private_key, key_path) "
             "VALUES (?, ?, ?, ?)", (domain, selector, pem, path))])


def folded(local: str) -> str:
    """A local part as the tables hold it."""
    return fold_local(local)
