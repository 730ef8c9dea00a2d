"""Several MTA nodes sharing one PostgreSQL directory: real ``twistd -n mta`` processes.

:func:`start_nodes` makes a fresh database on the session's PostgreSQL
(tests/pgserver.py, fixture ``postgres``), migrates it with ``mta directory
migrate`` and adds the domain with ``mta domain add`` (the console command,
as an admin runs it), then starts ``count`` daemons (tests/daemon.py), each
with its own folder, queue, ports and configuration, all pointing at that
database.  Each node has an ``mx`` and a ``submission`` listener (STARTTLS
with a certificate of the tests' CA, tests/harness.py) on 127.0.0.1;
``relay_networks`` is 127.0.0.3/32 only, so a client connecting from
127.0.0.2 is an outsider and one from 127.0.0.3 a relay client.
``extra_toml`` is appended to every node's configuration (another helper's
section, e.g. ``[counters]``), ``limits_toml`` to its ``[limits]`` table;
``cache_ttl`` is the directory's.

The fixture ``two_nodes`` (tests/conftest.py) gives two of them and stops
them after the test.  :meth:`Node.mta` runs the ``mta`` command against a
node's configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import shared_ca

DOMAIN = "example.org"
ROOT = Path(__file__).resolve().parent.parent
OUTSIDER = "127.0.0.2"  # not in relay_networks
RELAY_CLIENT = "127.0.0.3"  # in relay_networks


def mta_command() -> list[str]:
    return [sys.executable, "-m", "mta.admin.cli"]


@dataclass
class Node:
    name: str
    root: Path
    config: Path
    ports: dict[str, int]
    daemon: Daemon
    dsn: str
    env: dict[str, str] = field(default_factory=dict)

    def mta(self, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``mta ARGS --config <this node's>``, as an admin on this node runs it."""
        return subprocess.run([*mta_command(), *args, "--config", str(self.config)],
                              input=stdin, capture_output=True, text=True, cwd=self.root,
                              env=self.env, timeout=timeout)

    def log(self) -> str:
        return self.daemon.read_log()


def node_config(root: Path, ports: dict[str, int], dsn: str, cache_ttl: float,
                extra_toml: str = "", limits_toml: str = "") -> str:
    cert = shared_ca().issue_cert("mx.example.org", "localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(root / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    return f"""
hostname = "{root.name}.example.org"
local_domains = []
data_dir = "var"
domains_dir = "domains"
relay_networks = ["{RELAY_CLIENT}/32"]

[listeners.mx]
endpoint = "tcp:{ports['mx']}:interface=127.0.0.1"
kind = "mx"

[listeners.submission]
endpoint = "tcp:{ports['submission']}:interface=127.0.0.1"
kind = "submission"

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[limits]
auth_failure_delay = 0.05
{limits_toml}
[directory]
backend = "postgresql"
dsn = {json.dumps(dsn)}
pool_size = 2
cache_ttl = {cache_ttl}
timeout = 2
""" + QUIET_TAIL.format(dead_port=free_port()) + extra_toml


def start_nodes(base: Path, postgres: Any, count: int = 2, cache_ttl: float = 1.0,
                extra_toml: str = "", limits_toml: str = "") -> list[Node]:
    dsn = postgres.dsn(postgres.create_database("nodes"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    nodes: list[Node] = []
    for i in range(count):
        name = "node" + "abcdefgh"[i]
        root = base / name
        root.mkdir(parents=True)
        ports = {"mx": free_port(), "submission": free_port()}
        config = root / "mta.toml"
        config.write_text(node_config(root, ports, dsn, cache_ttl, extra_toml, limits_toml))
        nodes.append(Node(name, root, config, ports, Daemon(root, config, ports["mx"]), dsn, env))
    first = nodes[0]
    for args in (("directory", "migrate"), ("domain", "add", DOMAIN)):
        result = first.mta(*args)
        if result.returncode != 0:
            raise RuntimeError(f"mta {' '.join(args)}: {result.stdout}{result.stderr}")
    try:
        for node in nodes:
            node.daemon.start()
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        node.daemon.kill()
