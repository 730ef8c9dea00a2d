#!/usr/bin/env python3
"""The backlog benchmark (issue 19 point 3): N messages for a next hop that is down.

For one MTA started by start_mta.py (its --sink is the next hop), in order:

1. a listener on the sink address that accepts every connection and closes it
   at once (the next hop is down); it counts the connections;
2. smtp-source sends N messages: accept rate (msg/s);
3. after SETTLE seconds: the memory of the MTA's processes (RSS sum and PSS
   sum) against the same before the load: KiB per queued message;
4. CPU of the MTA's cgroup over IDLE seconds while everything is deferred,
   and the connections the next hop got meanwhile (all, and during IDLE);
5. restart: `start_mta.py stop --keep`, then `start --reuse`: seconds from
   the start to the first 220 with N queued;
6. the next hop comes back (smtp-sink on the sink address), the flush command
   (Postfix: postqueue -f; ours: mta queue flush) and the drain: seconds until
   the sink has counted N messages, and the drain rate.

Prints one JSON line (also appended to --out).  Everything stays on loopback;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
from run_load import Sink  # noqa: E402


class Closer:
    """Accepts and closes every connection on host:port, counting them."""

    def __init__(self, host: str, port: int) -> None:
        self.count = 0
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self.count += 1
            conn.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def memory(cg: str) -> dict:
    return benchlib.cgroup_memory(cg, pss=True)


def start_mta(argv: list[str]) -> tuple[dict, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, os.path.join(HERE, "start_mta.py")] + argv,
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1]), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--start", required=True,
                    help="start_mta.py start arguments (one string, shell words)")
    ap.add_argument("--flush", required=True, help="the flush command; {workdir} is filled in")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    start_args = shlex.split(a.start)
    sink_addr = start_args[start_args.index("--sink") + 1]
    listen = start_args[start_args.index("--listen") + 1]
    sink_host, sink_port = benchlib.split_hostport(sink_addr)
    benchlib.require_loopback(sink_host, "sink")
    closer = Closer(sink_host, sink_port)
    state, _ = start_mta(start_args)
    workdir, cg = state["workdir"], state["cgroup"]
    row: dict = {"label": a.label, "messages": a.messages, "size": a.size}
    sink = None
    try:
        time.sleep(1)
        mem0 = memory(cg)
        smtp_source = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
        argv = [smtp_source, "-c", "-s", str(a.sessions), "-m", str(a.messages), "-l",
                str(a.size), "-M", "client.bench.test", "-f", "bench@src.test", "-t",
                state.get("recipient", "bench@bench.test"), listen]
        t0 = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=a.timeout, check=False)
        row["accept_s"] = round(time.monotonic() - t0, 2)
        row["accept_rate"] = round(a.messages / row["accept_s"], 1)
        time.sleep(a.settle)
        mem1 = memory(cg)
        row["rss_kb_before"], row["rss_kb_after"] = mem0["rss_kb"], mem1["rss_kb"]
        row["kib_per_message_rss"] = round((mem1["rss_kb"] - mem0["rss_kb"]) / a.messages, 3)
        row["kib_per_message_pss"] = round((mem1["pss_kb"] - mem0["pss_kb"]) / a.messages, 3)
        row["connections_during_load"] = closer.count
        c0, n0 = benchlib.cgroup_cpu_seconds(cg), closer.count
        time.sleep(a.idle)
        row["idle_cpu_pct"] = round(100 * (benchlib.cgroup_cpu_seconds(cg) - c0) / a.idle, 2)
        row["connections_while_idle"] = closer.count - n0
        # Restart on the same queue.
        subprocess.run([sys.executable, os.path.join(HERE, "start_mta.py"), "stop", workdir,
                        "--keep"], check=True, timeout=120, capture_output=True)
        state, took = start_mta(start_args + ["--workdir", workdir, "--reuse"])
        row["restart_to_220_s"] = round(took, 2)
        cg = state["cgroup"]
        n1 = closer.count
        time.sleep(a.settle)
        row["connections_after_restart"] = closer.count - n1
        closer.stop()
        # The next hop comes back: flush and drain.
        sink = Sink(sink_host, sink_port)
        t1 = time.monotonic()
        subprocess.run(shlex.split(a.flush.format(workdir=workdir)), check=False, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got, last = sink.wait_for(a.messages, t1 + a.timeout)
        row["drained"] = got
        row["drain_s"] = round(last - t1, 2)
        row["drain_rate"] = round(got / max(last - t1, 1e-6), 1)
    finally:
        if closer.running:
            closer.stop()
        if sink is not None:
            sink.proc.terminate()
        subprocess.run([sys.executable, os.path.join(HERE, "start_mta.py"), "stop", workdir],
                       check=False, timeout=120, capture_output=True)
    line = json.dumps(row)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
