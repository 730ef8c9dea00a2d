"""A real PostgreSQL server for the tests, on loopback in a temporary directory.

:class:`PostgresServer` runs Debian's PostgreSQL 15 binaries
(``/usr/lib/postgresql/15/bin``, package ``postgresql``, installed by
tests/deps.sh): ``initdb`` into a fresh directory, then ``postgres`` itself
on 127.0.0.1 and a free port, its Unix socket in that directory too (nothing
in /var/run).  PostgreSQL refuses to run as root: as root the directory is
given to the ``postgres`` user and both programs run as it (``subprocess``'s
``user=``, no wrapper process between us and the server, so a signal reaches
it); as anyone else they run as that user.  Authentication is ``trust`` on
loopback only (a throw-away cluster).

The session fixture ``postgres`` (tests/conftest.py) starts one for the whole
run; a test asks it for a database of its own with :meth:`create_database`
(a fresh, empty one: tests do not see each other's rows) and may stop it
mid-test with :meth:`kill` (immediate shutdown, as a crash: no checkpoint)
and :meth:`start` it again on the same port.  Reusable by any test that needs
PostgreSQL (the directory's, and a second node's): ``dsn(dbname)`` is a libpq
connection string.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.daemon import free_port

PG_BIN = Path(os.environ.get("MTA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "mta"


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mta-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self._counter = 0

    def initdb(self) -> None:
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER,
                        "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.root, **self._as)

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the server process
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             # fsync off: a process crash (the tests' kill) still loses nothing the
             # kernel has.  synchronous_commit stays on: off, a commit made less than
             # wal_writer_delay before a SIGQUIT is lost (its WAL still in shared
             # memory), and a user just added was then "unknown" after the restart.
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off",
             "-c", "max_connections=100"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self._as)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.read_log()}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start:\n" + self.read_log()) from None
                time.sleep(0.1)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database's name."""
        import psycopg

        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, clients cut off), as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the directory is removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    server = PostgresServer()
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server
