#!/usr/bin/env python3
"""The PostgreSQL directory against the files directory, side by side, in one run.

  python3 bench/directory_ab.py [--rounds 4] [--messages 2000] [--rcpts 5] [--samples 200]

Starts one PostgreSQL (tests/pgserver.py, loopback, a temporary directory),
one smtp-sink, and three ``twistd -n mta`` (tests/daemon.py) that differ only
in ``[directory]``: the files; PostgreSQL with the default cache
(``cache_ttl = 30``); PostgreSQL with ``cache_ttl = 0`` (every RCPT is a
query: the worst case, a node that never sees a recipient twice within the
TTL).  The local domain ``bench.example`` has aliases ``1user`` ... ``Nuser``
to mailboxes at the sink (the same rows in the files and in SQL), so every
recipient is a directory lookup and the mail is relayed to the sink.

* throughput: ROUNDS rounds, in each smtp-source sends MESSAGES 4 KB messages
  with RCPTS recipients each over 20 sessions to each MTA in turn (order
  rotated per round); the time until smtp-source is done (every message
  accepted: queued, fsynced) gives messages per second;
* RCPT latency: SAMPLES RCPTs on one session (smtplib), each to the next
  alias, timed from the command to its reply; median and 95th percentile,
  "cold" (aliases no RCPT named before: a query each) and "warm" (the same
  aliases again, within cache_ttl).

Loopback only; every wait bounded.  Needs smtp-source and smtp-sink
(Debian: postfix) and PostgreSQL 15 (tests/deps.sh installs them).
"""
from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.dont_write_bytecode = True

from tests.daemon import Daemon, free_port  # noqa: E402
from tests.pgserver import start_postgres  # noqa: E402

DOMAIN = "bench.example"
SBIN = "/usr/sbin"


def config_text(port: int, sink_port: int, directory: str) -> str:
    return f"""
hostname = "mx.{DOMAIN}"
local_domains = ["{DOMAIN}"]
data_dir = "var"
domains_dir = "domains"
relay_networks = []

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[spf]
enabled = false

[dkim]
verify = false

[dmarc]
enabled = false

[dns]
servers = ["127.0.0.1:9"]
timeout = 1

[limits]
max_connections_per_ip = 1000
connection_rate_per_ip = 1000000

[delivery]
smarthosts = ["127.0.0.1:{sink_port}"]
smarthost_tls = "none"

{directory}
"""


def write_files(root: Path, aliases: int) -> None:
    base = root / "domains" / DOMAIN
    base.mkdir(parents=True)
    # smtp-source -r N sends to user@, 1user@ ... (N-1)user@.
    (base / "aliases").write_text("user: box0@sink.example\n" + "".join(
        f"{i}user: box{i}@sink.example\n" for i in range(1, aliases + 1)))


def mta_cli(config: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "mta.admin.cli", *args, "--config", str(config)],
                   check=True, env=env, capture_output=True, timeout=600)


def smtp_source(port: int, messages: int, rcpts: int) -> float:
    start = time.monotonic()
    done = subprocess.run([f"{SBIN}/smtp-source", "-s", "20", "-m", str(messages), "-l", "4096",
                           "-r", str(rcpts), "-f", "sender@remote.example", "-t", f"user@{DOMAIN}",
                           f"127.0.0.1:{port}"], timeout=600, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"smtp-source: {done.stdout}{done.stderr}")
    return time.monotonic() - start


def rcpt_latency(port: int, samples: int, aliases: int, first: int) -> list[float]:
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("bench.client")
        s.mail("sender@remote.example")
        for i in range(samples):
            if i and i % 90 == 0:  # max_recipients is 100 per transaction
                s.rset()
                s.mail("sender@remote.example")
            start = time.perf_counter()
            code, _ = s.rcpt(f"{(first + i) % aliases + 1}user@{DOMAIN}")
            out.append(time.perf_counter() - start)
            assert code == 250, code
        s.rset()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rcpts", type=int, default=5)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--aliases", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mta-dirbench-"))
    pg = start_postgres()
    sink_port = free_port()
    sink = subprocess.Popen([f"{SBIN}/smtp-sink", "-c", f"127.0.0.1:{sink_port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemons: dict[str, Daemon] = {}
    try:
        dsn = pg.dsn(pg.create_database("bench"))
        kinds = {
            "files": "",
            "pg-cache30": f'[directory]\nbackend = "postgresql"\ndsn = "{dsn}"\ncache_ttl = 30\n',
            "pg-nocache": f'[directory]\nbackend = "postgresql"\ndsn = "{dsn}"\ncache_ttl = 0\n',
        }
        for name, directory in kinds.items():
            root = work / name
            root.mkdir()
            write_files(root, args.aliases)
            port = free_port()
            config = root / "mta.toml"
            config.write_text(config_text(port, sink_port, directory))
            daemons[name] = Daemon(root, config, port)
        first_sql = work / "pg-cache30" / "mta.toml"
        mta_cli(first_sql, "directory", "migrate")
        mta_cli(first_sql, "directory", "import")
        for d in daemons.values():
            d.start()
        for name, d in daemons.items():  # warm up: imports, pools, caches
            smtp_source(d.port, 200, args.rcpts)
        rates: dict[str, list[float]] = {n: [] for n in daemons}
        names = list(daemons)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                elapsed = smtp_source(daemons[name].port, args.messages, args.rcpts)
                rates[name].append(args.messages / elapsed)
                print(f"round {r + 1} {name:11s} {args.messages / elapsed:8.1f} msg/s", flush=True)
        # Cold: aliases no RCPT named yet (a query each); warm: the same again.
        cold = {name: rcpt_latency(d.port, args.samples, args.aliases, 100)
                for name, d in daemons.items()}
        warm = {name: rcpt_latency(d.port, args.samples, args.aliases, 100)
                for name, d in daemons.items()}
        print()
        print(f"{'directory':11s} {'msg/s (median)':>15s} {'vs files':>9s} "
              f"{'cold RCPT p50/p95 ms':>21s} {'warm RCPT p50/p95 ms':>21s}")
        base = statistics.median(rates["files"])

        def pct(samples: list[float]) -> str:
            lat = sorted(samples)
            return f"{statistics.median(lat) * 1000:.3f}/{lat[int(len(lat) * 0.95) - 1] * 1000:.3f}"

        for name in names:
            med = statistics.median(rates[name])
            print(f"{name:11s} {med:15.1f} {med / base:9.2f} {pct(cold[name]):>21s} "
                  f"{pct(warm[name]):>21s}")
        print(f"({args.messages} messages x {args.rcpts} recipients, 4 KB, 20 sessions; "
              f"{args.rounds} rounds; {args.samples} RCPT samples)")
    finally:
        for d in daemons.values():
            d.kill()
        sink.kill()
        sink.wait(10)
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
