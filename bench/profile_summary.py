#!/usr/bin/env python3
"""Summarise a py-spy profile (``py-spy record --format raw``) as Markdown tables.

  profile_summary.py PROFILE.folded [--top 25] [--seconds S --rate 100]

The input has one line per distinct stack: ``frame;frame;...;leaf COUNT`` where
each frame is ``function (file:line)``. Line numbers are dropped, so a function
counts once however many of its lines were sampled. Printed:

* self time: the sampled leaf functions (where the CPU actually was);
* inclusive time: every function on the stack (a function counted once per
  sample even when recursive);
* self time by source line, with the line's text (--src: where ``mta/...``
  paths are found; other paths are looked up on sys.path), which separates
  e.g. the ``os.fsync`` line from the ``os.write`` line of one function;
* areas: each sample is charged to one area, so the shares add to 100 %:
  "fsync" when the sampled line calls fsync; else "logging" when any frame is
  in the logging code; else the innermost frame that falls in one of the other
  named areas (queue store, our SMTP server, delivery client, Twisted TCP, ...),
  generic helpers taking their caller's area (a socket send() through
  twisted.python.util.untilConcludes counts as Twisted TCP).

run.sh records with ``py-spy record --threads`` and without ``--idle``: py-spy
then leaves out the samples where a thread waits (the reactor in epoll_wait, a
worker thread on its queue) but keeps those where a thread is blocked in a
system call such as fsync. The percentages are of these busy samples. With
``--threads`` each stack starts with ``thread (TID): NAME`` (after
``process PID:...`` frames with ``--subprocesses``: threads are then named
"main ..." or "worker ..."); the first table
gives each thread's share, and with --seconds (how long py-spy recorded) and
--rate, how busy each thread was (100 % = it never waited). Samples recorded
with ``--idle`` that are waits are recognised and counted apart.
"""

from __future__ import annotations

import argparse
import linecache
import os
import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (area, predicate on (function, file)); the first match from the leaf outwards wins.
IDLE = "idle (reactor waiting in epoll_wait, worker threads waiting for work)"
FSYNC = "fsync (os.fsync of files and of the queue directory)"
LOGGING = "logging (twisted.logger: formatting, time stamps, file writes)"


def is_logging(func: str, path: str) -> bool:
    return "twisted/logger/" in path or "mta/logs.py" in path or (
        path.endswith("twisted/python/log.py") and func not in ("callWithLogger", "callWithContext"))


AREAS: list[tuple[str, object]] = [
    ("queue store (mta/queue/store.py, envelope JSON)",
     lambda f, p: "mta/queue/store.py" in p or "mta/queue/envelope.py" in p or p.startswith("json/")),
    ("queue runner (mta/queue/runner.py)", lambda f, p: "mta/queue/runner.py" in p),
    ("delivery client (mta/delivery/)", lambda f, p: "mta/delivery/" in p),
    ("SMTP server session and DATA (mta/smtp/)", lambda f, p: "mta/smtp/" in p),
    ("policy (mta/policy/)", lambda f, p: "mta/policy/" in p),
    ("Deferreds (twisted/internet/defer.py)", lambda f, p: "twisted/internet/defer.py" in p),
    ("Twisted TCP / reactor / endpoints",
     lambda f, p: "twisted/internet/" in p),
    ("other Twisted", lambda f, p: "twisted/" in p),
    ("stdlib / other", lambda f, p: True),
]


Frame = tuple[str, str, int]  # function, file, line (0: unknown)


def parse(path: str) -> list[tuple[list[Frame], int]]:
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            frames = []
            parts = stack.split(";")
            # py-spy --subprocesses: "process PID:\"CMDLINE\"" frames first, the
            # innermost one being the process sampled (our worker: "-m mta.daemon.worker").
            process = ""
            while parts and parts[0].startswith("process "):
                process = "worker " if "mta.daemon.worker" in parts.pop(0) else "main "
            if parts and parts[0].startswith("thread ("):
                thread = process + (parts.pop(0).partition(": ")[2] or parts[0])
            else:
                thread = process + "all threads"
            frames.append((thread, "<thread>", 0))
            for raw in parts:
                m = FRAME.match(raw)
                if m:
                    frames.append((m.group("func"), m.group("file"), int(m.group("line") or 0)))
                else:
                    frames.append((raw, "", 0))
            stacks.append((frames, n))
    return stacks


def short(frame: Frame) -> str:
    func, path, _line = frame
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})" if path else func


class Source:
    """The text of a sampled line, from the project (mta/...) or sys.path."""

    def __init__(self, root: str) -> None:
        self.roots = [root] + [p for p in sys.path if p and os.path.isdir(p)]
        self.cache: dict[str, str | None] = {}

    def line(self, path: str, lineno: int) -> str:
        if not lineno or not path:
            return ""
        if path not in self.cache:
            self.cache[path] = next((os.path.join(r, path) for r in self.roots
                                     if os.path.isfile(os.path.join(r, path))), None)
        full = self.cache[path]
        return linecache.getline(full, lineno).strip() if full else ""


def is_idle(frames: list[Frame], src: Source) -> bool:
    func, path, line = frames[-1]
    if path.endswith("epollreactor.py") and func.endswith("doPoll"):
        return ".poll(" in src.line(path, line) or not line
    text = src.line(path, line)
    return (path.endswith(("threading.py", "queue.py")) and func.rpartition(".")[2] in (
        "wait", "get", "_wait_for_tstate_lock", "acquire")) or bool(
        re.search(r"\.(get|wait|acquire)\((block=True)?\)", text))  # also a thread pool's wait


def area_of(frames: list[Frame], src: Source) -> str:
    func, path, line = frames[-1]
    if "fsync" in func or "fsync(" in src.line(path, line):
        return FSYNC
    if any(is_logging(f, p) for f, p, _ in frames):
        return LOGGING
    # The innermost frame in a named area wins; helpers that belong to no area
    # themselves (twisted.python.util.untilConcludes around a socket send, a
    # stdlib function) take the area of their caller.
    generic = ("other Twisted", "stdlib / other")
    fallback = None
    for func, path, _line in reversed(frames):
        for name, pred in AREAS:
            if pred(func, path):  # type: ignore[operator]
                if name not in generic:
                    return name
                fallback = fallback or name
                break
    return fallback or AREAS[-1][0]


def table(title: str, counter: Counter, total: int, top: int) -> None:
    print(f"#### {title}\n")
    print("| % of busy samples | samples | function |")
    print("|---:|---:|---|")
    for key, n in counter.most_common(top):
        print(f"| {100.0 * n / total:.1f} | {n} | `{key}` |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seconds", type=float, help="how long py-spy recorded (busy %% per thread)")
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy --rate")
    ap.add_argument("--src", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="project root, where mta/... source lines are read (default: ..)")
    a = ap.parse_args()
    src = Source(a.src)
    # (thread, frames without the thread pseudo-frame, count); empty stacks dropped
    stacks = [(f[0][0], f[1:], n) for f, n in parse(a.profile) if len(f) > 1]
    everything = sum(n for _t, _f, n in stacks)
    busy = [(t, f, n) for t, f, n in stacks if not is_idle(f, src)]
    total = sum(n for _t, _f, n in busy)
    if not total:
        raise SystemExit("no busy samples in " + a.profile)
    threads: Counter = Counter()
    own: Counter = Counter()
    incl: Counter = Counter()
    areas: dict[str, Counter] = {}
    lines: Counter = Counter()
    for thread, frames, n in busy:
        threads[thread] += n
        own[short(frames[-1])] += n
        func, path, line = frames[-1]
        text = src.line(path, line)
        lines[f"{short(frames[-1])[:-1]}:{line}) `{text[:70]}`" if line else short(frames[-1])] += n
        for key in {short(fr) for fr in frames}:
            incl[key] += n
        areas.setdefault(area_of(frames, src), Counter())[thread] += n
    idle = everything - total
    print(f"### Profile: {total} busy samples ({a.profile})\n")
    print("#### Threads\n")
    print("| thread | busy samples | % of busy samples | busy % of the recording |")
    print("|---|---:|---:|---:|")
    for name, n in threads.most_common():
        wall = f"{100.0 * n / (a.seconds * a.rate):.0f}" if a.seconds else "-"
        print(f"| {name} | {n} | {100.0 * n / total:.1f} | {wall} |")
    print()
    names = [t for t, _n in threads.most_common()]
    print("#### Where the busy time goes, by area (each sample counted once; see --help)\n")
    print("| % of busy samples | samples | area | " + " | ".join(names) + " |")
    print("|---:|---:|---|" + "---:|" * len(names))
    for name, per in sorted(areas.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(per.values())
        print(f"| {100.0 * n / total:.1f} | {n} | {name} | "
              + " | ".join(str(per.get(t, 0)) for t in names) + " |")
    if idle:
        print(f"| ({100.0 * idle / everything:.1f} % of all samples) | {idle} | {IDLE} |")
    print()
    table("Self time (leaf functions)", own, total, a.top)
    print("#### Self time by source line (a C call such as os.fsync shows as its Python line)\n")
    print("| % of busy samples | samples | line |")
    print("|---:|---:|---|")
    for key, n in lines.most_common(a.top):
        print(f"| {100.0 * n / total:.1f} | {n} | {key} |")
    print()
    # inclusive: skip the frames every sample has (twistd start-up, reactor loop)
    common = {k for k, n in incl.items() if n >= 0.9 * total}
    table("Inclusive time (function and what it calls; frames on >90 % of stacks left out)",
          Counter({k: n for k, n in incl.items() if k not in common}), total, a.top)


if __name__ == "__main__":
    main()
