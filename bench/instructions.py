#!/usr/bin/env python3
"""User-space instructions per message of our MTA, counted by callgrind.

  python3 bench/instructions.py [REV ...] [--messages 200] [--workers 1]

For each REV (a git revision of this repository, checked out in a temporary
worktree; "WORKTREE", the default, means the files as they are now) this
starts ``twistd -n mta`` under ``valgrind --tool=callgrind`` with
bench/mta-bench.toml (workers = 1 unless --workers says otherwise: one
process does everything), relaying to smtp-sink; sends 100 messages of 4 KB
to warm it up, zeroes the counters (callgrind_control -z), sends --messages
more with smtp-source (5 sessions), dumps the counters (callgrind_control -d)
and prints the instructions per message.

Unlike times, which drift by 10-20 % on these machines (see ab.py), the count
repeats to within about half a percent from run to run, so a change of a few
percent in the Python work per message shows at once.  What it does not see:
the kernel's work (system calls, the TCP stack, the file system) and waiting;
``perf stat -e 'syscalls:sys_enter_*'`` counts the system calls, and ab.py
measures the whole.  Under valgrind the MTA runs some 50 times slower: about a
minute per revision.  Needs root (start_mta.py), valgrind, smtp-source and
smtp-sink; loopback only, every wait bounded.
"""
import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True
import ab  # noqa: E402
import run_load  # noqa: E402

PORT = 32555 + ab.PORT_OFFSET  # and ab.SINK_PORT: both moved by BENCH_PORT_OFFSET


def count(code: str, workdir: str, messages: int, workers: int, python: str) -> float:
    """Instructions per message of the MTA in ``code``."""
    config = ab.instance_config(os.path.join(BENCH, "mta-bench.toml"),
                                os.path.join(workdir, "data"), "fsync")
    with open(config) as f:
        text = f.read().replace("workers = 2", f"workers = {workers}")
    with open(config, "w") as f:
        f.write(text)
    twistd = os.path.join(os.path.dirname(python), "twistd")
    out = os.path.join(workdir, "callgrind.%p")
    cmd = (f"PYTHONPATH={shlex.quote(code)} valgrind --tool=callgrind --trace-children=yes "
           f"--callgrind-out-file={out} {python} {twistd} -n --pidfile= mta "
           f"--config {shlex.quote(config)} --listen mx=tcp:{{listen_port}}:interface={{listen_host}} "
           f"--queue {{workdir}}/queue --smarthost {{sink_host}}:{{sink_port}}")
    state = json.loads(subprocess.run(
        [sys.executable, os.path.join(BENCH, "start_mta.py"), "start", "custom", "--cmd", cmd,
         "--cwd", code, "--listen", f"127.0.0.1:{PORT}", "--sink", f"127.0.0.1:{ab.SINK_PORT}",
         "--lifetime", "1200"], check=True, capture_output=True, text=True).stdout)
    sink = run_load.Sink("127.0.0.1", ab.SINK_PORT)
    try:
        ab.send_messages(state, sink, 100, sessions=5, timeout=900, wait=300, settle=2)
        subprocess.run(["callgrind_control", "-z"], capture_output=True, timeout=60)
        ab.send_messages(state, sink, messages, sessions=5, timeout=900, wait=300, settle=2)
        subprocess.run(["callgrind_control", "-d"], capture_output=True, timeout=60)
        time.sleep(2)
    finally:
        sink.stop()
        ab.stop(state)
    total = 0
    for path in glob.glob(os.path.join(workdir, "callgrind.*.1")):  # the dump of each process
        with open(path) as f:
            for line in f:
                if line.startswith("summary:"):
                    total += int(line.split()[1])
    if not total:
        raise SystemExit("instructions.py: callgrind wrote no counts")
    return total / messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="*", default=["WORKTREE"])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("instructions.py: needs root (start_mta.py uses cgroups and a mount namespace)")
    for tool in ("valgrind", "callgrind_control", "smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"instructions.py: {tool} is not installed")
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    tmp = tempfile.mkdtemp(prefix="bench-instructions-")
    worktrees: list[str] = []
    try:
        for i, rev in enumerate(a.revs):
            code = ab.checkout(rev, os.path.join(tmp, f"code-{i}"), worktrees)
            workdir = os.path.join(tmp, f"run-{i}")
            os.makedirs(workdir)
            per_message = count(code, workdir, a.messages, a.workers, python)
            print(f"{rev}: {per_message / 1e6:.3f} M instructions per message "
                  f"({a.messages} messages, workers = {a.workers})", flush=True)
    finally:
        ab.remove_worktrees(worktrees)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
