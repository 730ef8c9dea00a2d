#!/usr/bin/env python3
"""Compare two versions of our MTA side by side, in turns, on one machine.

  python3 bench/ab.py REV_A REV_B [--rounds 8] [--messages 2000] [--samples 60]
                      [--queue-sync fsync|syncfs] [--config bench/mta-bench.toml]

REV_A and REV_B are git revisions of this repository (each checked out in a
temporary worktree; "WORKTREE" means the files as they are now, uncommitted
changes included; a directory is used as it is).  Both versions run at once,
each as ``twistd -n mta`` started by start_mta.py on its own port, relaying
to one smtp-sink.  Then:

* throughput: ROUNDS rounds; in each, smtp-source sends MESSAGES messages of
  4 KB over 20 sessions to one version, then to the other (the order reversed
  every other round); end to end is from the first byte to the sink having
  counted every message, CPU is that of the version's processes (its cgroup);
* latency: SAMPLES single messages (smtplib, as bench/run_load.py), to each
  version in turn: time to the 250 (and QUIT) and end to end.

This machine's speed drifts by 10-20 % over minutes (run.sh's notes), more than
most changes are worth; taking turns on one sink, with both versions started,
warmed up and idle when not measured, lets that drift hit both alike.  The
medians and B/A ratios are printed at the end, the runs as they come.  Needs
root (start_mta.py: cgroups and a mount namespace), smtp-source and smtp-sink;
loopback only, every run bounded in time.  BENCH_PORT_OFFSET=N (environment)
moves its ports (and instructions.py's) by N, for a second benchmark running at
the same time on the machine.
"""
import argparse
import json
import os
import shlex
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True
import benchlib  # noqa: E402
import run_load  # noqa: E402

# BENCH_PORT_OFFSET=N moves every port by N: two benchmarks on one machine
# (say, from two worktrees) then do not share a sink or a listener.
PORT_OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "0"))
SINK_PORT = 32526 + PORT_OFFSET
PORTS = (32535 + PORT_OFFSET, 32545 + PORT_OFFSET)


def checkout(rev: str, where: str, made: list[str]) -> str:
    """The code of ``rev``: a new worktree at ``where`` (its path added to ``made``,
    for :func:`remove_worktrees`), this checkout itself for "WORKTREE", or
    ``rev`` itself when it is a directory (a tree prepared by hand, e.g. built)."""
    if rev == "WORKTREE":
        return ROOT
    if os.path.isdir(rev):
        return os.path.abspath(rev)
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--quiet", where, rev], check=True)
    made.append(where)
    return where


def remove_worktrees(paths: list[str]) -> None:
    for path in paths:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path],
                       capture_output=True)


def instance_config(config: str, data_dir: str, queue_sync: str) -> str:
    """The benchmark configuration with this instance's data_dir and queue_sync."""
    os.makedirs(os.path.join(data_dir, "domains"), exist_ok=True)
    lines = []
    with open(config) as f:
        for line in f:
            if line.startswith(("data_dir =", "domains_dir =", "queue_sync =")):
                continue
            lines.append(line)
    head = (f'data_dir = "{data_dir}"\ndomains_dir = "{data_dir}/domains"\n'
            f'queue_sync = "{queue_sync}"\n')
    path = os.path.join(data_dir, "mta.toml")
    with open(path, "w") as f:
        f.write(head + "".join(lines))
    return path


def start(code: str, config: str, port: int, twistd: str) -> dict:
    cmd = (f"PYTHONPATH={shlex.quote(code)} {shlex.quote(twistd)} -n --pidfile= mta "
           f"--config {shlex.quote(config)} --listen mx=tcp:{{listen_port}}:interface={{listen_host}} "
           f"--queue {{workdir}}/queue --smarthost {{sink_host}}:{{sink_port}}")
    out = subprocess.run([sys.executable, os.path.join(BENCH, "start_mta.py"), "start", "custom",
                          "--cmd", cmd, "--cwd", code, "--listen", f"127.0.0.1:{port}",
                          "--sink", f"127.0.0.1:{SINK_PORT}", "--lifetime", "7200"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def stop(state: dict) -> None:
    subprocess.run([sys.executable, os.path.join(BENCH, "start_mta.py"), "stop", state["workdir"]],
                   capture_output=True, timeout=60)


def cpu_seconds(state: dict) -> float:
    return benchlib.cgroup_cpu_seconds(state["cgroup"]) or 0.0


def send_messages(state: dict, sink: run_load.Sink, messages: int, sessions: int = 20,
                  timeout: float = 600, wait: float = 120, settle: float = 1.0) -> float:
    """Send ``messages`` of 4 KB with smtp-source over ``sessions`` sessions and wait
    (``wait`` seconds at most) until the sink has them all; returns when the last
    one arrived."""
    base = sink.count
    subprocess.run(["smtp-source", "-c", "-l", "4096", "-m", str(messages), "-s", str(sessions),
                    "-f", "bench@src.test", "-t", "bench@bench.test", state["listen"]],
                   stdout=subprocess.DEVNULL, check=True, timeout=timeout)
    got, t_end = sink.wait_for(base + messages, time.monotonic() + wait)
    if got < base + messages:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: only {got - base} of {messages} "
                         "messages reached the sink")
    time.sleep(settle)  # the removals after the last delivery count too
    return t_end


def throughput(state: dict, sink: run_load.Sink, messages: int) -> tuple[float, float]:
    """(end-to-end msgs/s, MTA CPU ms per message) of one smtp-source run."""
    c0, t0 = cpu_seconds(state), time.monotonic()
    t_end = send_messages(state, sink, messages)
    return messages / (t_end - t0), 1000 * (cpu_seconds(state) - c0) / messages


class Message:
    sender, recipient, helo, size = "bench@src.test", "bench@bench.test", "lat.test", 4096


def latency(state: dict, sink: run_load.Sink, seq: int) -> tuple[float, float] | None:
    """(ms to the 250 and QUIT, ms end to end) of one message, or None if unclear."""
    host, port = state["listen"].rsplit(":", 1)
    base, msg = sink.count, run_load.make_message(Message, seq)
    t0 = time.monotonic()
    with smtplib.SMTP(host, int(port), local_hostname=Message.helo, timeout=30) as s:
        s.sendmail(Message.sender, [Message.recipient], msg)
        t_acc = time.monotonic()
    got, t_sink = sink.wait_for(base + 1, time.monotonic() + 10)
    time.sleep(0.05)
    if got != base + 1 or sink.count != base + 1:
        return None
    return 1000 * (t_acc - t0), 1000 * (t_sink - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--queue-sync", default="fsync", choices=["fsync", "syncfs"])
    ap.add_argument("--config", default=os.path.join(BENCH, "mta-bench.toml"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("ab.py: needs root (start_mta.py uses cgroups and a mount namespace)")
    twistd = os.path.join(ROOT, ".venv", "bin", "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd") or "twistd"
    tmp = tempfile.mkdtemp(prefix="bench-ab-")
    names = {"A": a.rev_a, "B": a.rev_b}
    states: dict[str, dict] = {}
    worktrees: list[str] = []
    sink = None
    try:
        for (label, rev), port in zip(names.items(), PORTS, strict=True):
            code = checkout(rev, os.path.join(tmp, label), worktrees)
            config = instance_config(a.config, os.path.join(tmp, f"data-{label}"), a.queue_sync)
            states[label] = start(code, config, port, twistd)
        sink = run_load.Sink("127.0.0.1", SINK_PORT)
        for label in states:  # warm up: imports, spares, the outbound connection
            throughput(states[label], sink, 200)
        runs: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        for r in range(a.rounds):
            for label in ("A", "B") if r % 2 == 0 else ("B", "A"):
                runs[label].append(throughput(states[label], sink, a.messages))
                print(f"throughput {label} round {r + 1}: {runs[label][-1][0]:.0f} msg/s, "
                      f"{runs[label][-1][1]:.2f} CPU ms/msg", flush=True)
        lat: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        for i in range(a.samples):
            for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                sample = latency(states[label], sink, i)
                if sample is not None:
                    lat[label].append(sample)
        print(f"\nA = {a.rev_a}, B = {a.rev_b}; queue_sync = {a.queue_sync}; "
              f"{a.rounds} runs of {a.messages} x 4 KB each; {a.samples} latency samples each")
        print("| version | e2e msg/s | CPU ms/msg | to 250 + QUIT ms | e2e latency ms |")
        print("|---|---|---|---|---|")
        med: dict[str, list[float]] = {}
        for label in ("A", "B"):
            med[label] = [statistics.median(x[0] for x in runs[label]),
                          statistics.median(x[1] for x in runs[label]),
                          statistics.median(x[0] for x in lat[label]) if lat[label] else float("nan"),
                          statistics.median(x[1] for x in lat[label]) if lat[label] else float("nan")]
            m = med[label]
            print(f"| {label} | {m[0]:.0f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} |")
        ratio = [b / x if x else float("nan") for b, x in zip(med["B"], med["A"], strict=True)]
        print(f"| B/A | {ratio[0]:.3f} | {ratio[1]:.3f} | {ratio[2]:.3f} | {ratio[3]:.3f} |")
    finally:
        if sink is not None:
            sink.stop()
        for state in states.values():
            stop(state)
        remove_worktrees(worktrees)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
