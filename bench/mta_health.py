#!/usr/bin/env python3
"""After a benchmark: did the MTA lose, defer or break anything? One JSON line.

  mta_health.py --state WORKDIR --label ours [--log FILE] [--out FILE]

Reads the MTA's log (start_mta.py's ``mta.log``; Postfix's ``maillog``) and
counts what matters: messages queued, delivered, deferred and bounced;
warnings, errors and tracebacks (for our MTA: twisted.logger levels
``#warn``/``#error``/``#critical`` and ``Traceback`` lines; for Postfix:
``warning:``/``error:``/``fatal:``/``panic:``). Also counts the messages
still in the queue. The first lines of each problem kind are kept, so a report
can quote them. Prints one JSON line (type ``health``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # leave no __pycache__ beside the scripts
import benchlib  # noqa: E402

OURS = {
    "queued": re.compile(r"\] queued \w+ "),
    "delivered": re.compile(r" delivered in [\d.]+s"),
    "deferred": re.compile(r" deferred in [\d.]+s"),
    "failed": re.compile(r" failed in [\d.]+s"),
    "removed": re.compile(r" done and removed from the queue"),
    "warnings": re.compile(r"#warn\]"),
    "errors": re.compile(r"#(error|critical)\]"),
    "tracebacks": re.compile(r"Traceback \(most recent call last\)"),
}
POSTFIX = {
    "queued": re.compile(r"postfix/qmgr\[\d+\]: \w+: from=<"),
    "delivered": re.compile(r"status=sent"),
    "deferred": re.compile(r"status=deferred"),
    "failed": re.compile(r"status=bounced"),
    "removed": re.compile(r"postfix/qmgr\[\d+\]: \w+: removed"),
    "warnings": re.compile(r"warning: "),
    "errors": re.compile(r"(error|fatal|panic): "),
    "tracebacks": re.compile(r"$^"),
}
PROBLEMS = ("deferred", "failed", "warnings", "errors", "tracebacks")


def scan(log: Path, patterns: dict[str, re.Pattern[str]], keep: int = 5) -> dict[str, Any]:
    counts = dict.fromkeys(patterns, 0)
    examples: dict[str, list[str]] = {}
    lines = 0
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            lines += 1
            for key, rx in patterns.items():
                if rx.search(line):
                    counts[key] += 1
                    if key in PROBLEMS and len(examples.setdefault(key, [])) < keep:
                        examples[key].append(line.rstrip()[:400])
    return {"log_lines": lines, **counts, "examples": examples}


def queue_left(state: dict[str, Any]) -> int | None:
    q = state.get("queue_dir")
    if state["kind"] == "postfix" and q:
        return sum(len(files) for sub in ("incoming", "active", "deferred", "hold", "maildrop")
                   for _root, _dirs, files in os.walk(os.path.join(q, sub)))
    q = q or os.path.join(state["workdir"], "queue")
    msg = os.path.join(q, "msg")
    if os.path.isdir(msg):
        return sum(1 for n in os.listdir(msg) if n.endswith(".json"))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="start_mta.py WORKDIR")
    ap.add_argument("--label", required=True)
    ap.add_argument("--log", help="default: the log named in state.json")
    ap.add_argument("--out", help="also append the JSON line to this file")
    a = ap.parse_args()
    st = benchlib.load_state(a.state)
    log = Path(a.log or st.get("log") or os.path.join(st["workdir"], "mta.log"))
    patterns = POSTFIX if st["kind"] == "postfix" else OURS
    rec: dict[str, Any] = {"type": "health", "label": a.label, "kind": st["kind"], "log": str(log)}
    if log.exists():
        rec.update(scan(log, patterns))
    else:
        rec["log_missing"] = True
    rec["queue_left"] = queue_left(st)
    line = json.dumps(rec)
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
