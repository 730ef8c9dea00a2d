#!/usr/bin/env python3
"""Drive load at one SMTP target and print ONE JSON line per run (plus a summary line).

Modes (--mode, several comma-separated; one smtp-sink serves them all)
  throughput  smtp-source -s SESSIONS -m MESSAGES -l SIZE -> TARGET, while smtp-sink
              (started here, on --sink) counts what the MTA relays to it. Per run:
                accept_*  : smtp-source start .. smtp-source exit (every message got 250)
                e2e_*     : smtp-source start .. the sink has counted all MESSAGES
              --size may list several sizes (4096,102400): each gets its own runs.
  latency     SAMPLES single messages one after another (Python smtplib, one
              connection each); per sample: accept = connect .. 250 after DATA,
              e2e = connect .. the sink counts the message. Per run: min/median/p90/max.
              A sample whose message is not counted within --sample-timeout is
              "lost"; one during which a different message arrived is "ambiguous".

Floor (no MTA): give the same address as --target and --sink; smtp-sink is then
the target itself.

CPU: --state WORKDIR (from start_mta.py) gives the MTA's cgroup, so each run reports
the CPU seconds all MTA processes used; the whole machine's busy % and the CPU of
smtp-source / smtp-sink are reported too.

Memory (added to the reference harness): during each throughput run a thread
samples the MTA cgroup's processes every --mem-interval seconds; the record
gets the peak of the summed VmRSS and of the summed Pss over the samples, and
the largest single-process VmHWM at the end of the run (the true peak RSS of
a one-process MTA such as ours).

Every wait is bounded (--timeout per run); the sink is stopped at the end.
Examples
  run_load.py --label postfix --state /tmp/bench-postfix-XXXX --size 4096,102400 --mode throughput,latency
  run_load.py --label floor --target 127.0.0.1:32526 --sink 127.0.0.1:32526
  run_load.py --label mine --target 127.0.0.1:32525 --sink 127.0.0.1:32526 --mode latency
"""
import argparse
import datetime
import json
import os
import re
import resource
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # leave no __pycache__ beside the scripts
import benchlib  # noqa: E402

MESG_RE = re.compile(rb"mesg=(\d+)")
TLS_LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tls_load.py")


class Sink:
    """smtp-sink -c on ADDR; a reader thread keeps the running message count."""

    def __init__(self, host, port, backlog=1024, tls=None):
        binary = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
        if tls is not None:  # (cert, key): tls_load.py's sink, which speaks STARTTLS
            argv = [sys.executable, TLS_LOAD, "sink", "--listen", benchlib.fmt_hostport(host, port),
                    "--cert", tls[0], "--key", tls[1], "--print-counts", "--lifetime", "7200"]
        elif not binary:
            raise SystemExit("smtp-sink not found (Debian package postfix)")
        else:
            argv = [binary, "-c"]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]
            argv += [benchlib.fmt_hostport(host, port), str(backlog)]
        self.count = 0
        self.changed_at = time.monotonic()
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tail = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        if not benchlib.wait_banner(host, port, 10):
            self.stop()
            raise SystemExit("smtp-sink did not start on %s:%d: %r" % (host, port, self.tail[-500:]))
        # wait_banner's probe session does not count a message

    def _read(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            now = time.monotonic()
            self.tail = (self.tail + data)[-2000:]
            vals = MESG_RE.findall(data)
            if vals:
                n = max(int(v) for v in vals)
                with self.cond:
                    if n > self.count:
                        self.count = n
                        self.changed_at = now
                        self.cond.notify_all()

    def wait_for(self, target, deadline):
        """Block until count >= target or deadline; returns (count, time count last rose)."""
        with self.cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
            return self.count, self.changed_at

    def wait_quiet(self, quiet=0.5, limit=5.0):
        """Wait until the count has not changed for QUIET seconds (bounded by LIMIT)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            with self.cond:
                if time.monotonic() - self.changed_at >= quiet:
                    return self.count
            time.sleep(0.05)
        return self.count

    def cpu(self):
        return benchlib.proc_cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class MemSampler:
    """Samples the MTA cgroup's memory in a thread; keeps the peaks (KiB)."""

    def __init__(self, cg, interval):
        self.cg, self.interval = cg, interval
        self.rss_peak = self.pss_peak = 0
        self.stopped = threading.Event()
        self.thread = None
        if cg and interval > 0:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _sample(self):
        m = benchlib.cgroup_memory(self.cg, pss=True)
        self.rss_peak = max(self.rss_peak, m["rss_kb"])
        self.pss_peak = max(self.pss_peak, m.get("pss_kb", 0))
        return m

    def _run(self):
        while not self.stopped.wait(self.interval):
            self._sample()

    def stop(self):
        """Stop sampling; returns the record fields (empty without a cgroup)."""
        if not self.cg:
            return {}
        self.stopped.set()
        if self.thread:
            self.thread.join(5)
        last = self._sample()
        return dict(mta_rss_peak_kb=self.rss_peak, mta_pss_peak_kb=self.pss_peak,
                    mta_hwm_max_kb=last["hwm_kb_max"], mta_rss_end_kb=last["rss_kb"],
                    mta_procs=last["procs"])


def stats(values):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    p90 = vals[min(len(vals) - 1, int(round(0.9 * (len(vals) - 1))))]
    return dict(min=round(vals[0], 3), median=round(statistics.median(vals), 3),
                p90=round(p90, 3), max=round(vals[-1], 3), n=len(vals))


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def throughput_run(a, sink, cg, n, run_no):
    smtp_source = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
    argv = [smtp_source, "-c", "-s", str(a.sessions), "-m", str(n), "-l", str(a.size),
            "-M", a.helo, "-f", a.sender, "-t", a.recipient]
    if a.reuse:
        argv.append("-d")
    argv.append(a.target)
    if a.tls:  # tls_load.py: STARTTLS (and AUTH PLAIN with --auth) on every connection
        argv = [sys.executable, TLS_LOAD, "send", "--target", a.target, "--messages", str(n),
                "--sessions", str(a.sessions), "--size", str(a.size), "--starttls",
                "--sender", a.sender, "--recipient", a.recipient, "--timeout", str(a.timeout)]
        if a.auth:
            argv += ["--auth", a.auth]
    base = sink.count
    mta0 = benchlib.cgroup_cpu_seconds(cg)
    sys0 = benchlib.system_cpu_snapshot()
    sink0 = sink.cpu()
    ch0 = children_cpu()
    mem = MemSampler(cg, a.mem_interval)
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    src = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    try:
        out, err = src.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        src.kill()
        out, err = src.communicate()
    t_acc = time.monotonic()
    mta_acc = benchlib.cgroup_cpu_seconds(cg)
    sys_acc = benchlib.system_cpu_snapshot()
    if a.tls:
        try:
            accepted = int(json.loads(out.decode().strip().splitlines()[-1])["accepted"])
        except (ValueError, IndexError, KeyError):
            accepted = 0
    else:
        counts = re.findall(rb"(\d+)\r", out)
        accepted = int(counts[-1]) if counts else 0
    got, t_last = sink.wait_for(base + n, deadline)
    t_e2e = t_last if got >= base + n else None
    t_end = time.monotonic()
    mta_e2e = benchlib.cgroup_cpu_seconds(cg)
    sys_e2e = benchlib.system_cpu_snapshot()
    sink1 = sink.cpu()
    # let stragglers (duplicates!) arrive before the next run
    delivered = sink.wait_quiet(quiet=a.quiet, limit=max(a.quiet * 4, 3.0)) - base
    memory = mem.stop()
    acc_s = t_acc - t0
    e2e_s = (t_e2e - t0) if t_e2e else None
    mta_cpu = (mta_e2e - mta0) if mta0 is not None and mta_e2e is not None else None
    rec = dict(
        type="throughput", label=a.label, run=run_no, ts=now_iso(), target=a.target, sink=a.sink,
        messages=n, size=a.size, sessions=a.sessions, reuse=a.reuse,
        source_rc=src.returncode, accepted=accepted,
        accept_wall_s=round(acc_s, 4),
        accept_msgs_per_s=round(accepted / acc_s, 1) if acc_s > 0 else None,
        delivered=delivered, complete=bool(t_e2e) and accepted == n,
        e2e_wall_s=round(e2e_s, 4) if e2e_s else None,
        e2e_msgs_per_s=round(n / e2e_s, 1) if e2e_s else None,
        mta_cpu_s=round(mta_cpu, 3) if mta_cpu is not None else None,
        mta_cpu_s_accept=round(mta_acc - mta0, 3) if mta0 is not None else None,
        mta_cpu_ms_per_msg=round(1000 * mta_cpu / n, 3) if mta_cpu is not None else None,
        mta_cpu_pct_one_core=round(100 * mta_cpu / (t_end - t0), 1) if mta_cpu is not None else None,
        sys_busy_pct_accept=benchlib.system_busy_pct(sys0, sys_acc),
        sys_busy_pct_e2e=benchlib.system_busy_pct(sys0, sys_e2e),
        source_cpu_s=round(children_cpu() - ch0, 3),
        sink_cpu_s=round(sink1 - sink0, 3) if sink0 is not None and sink1 is not None else None,
        loadavg_1m=round(os.getloadavg()[0], 2),  # others' work on the machine shows here
        **memory,
    )
    if src.returncode != 0 or accepted != n:
        rec["source_error"] = (err + out).decode("utf-8", "replace")[-400:]
    if a.tls:
        rec["tls"] = True
        rec["auth"] = bool(a.auth)
    if delivered > n:
        rec["duplicates"] = delivered - n
    return rec


def make_message(a, seq):
    hdr = ("From: <{f}>\r\nTo: <{t}>\r\nSubject: bench latency {i}\r\n"
           "Message-Id: <lat.{p}.{i}.{ts}@{h}>\r\nDate: {d}\r\n\r\n").format(
        f=a.sender, t=a.recipient, i=seq, p=os.getpid(), ts=int(time.time() * 1000), h=a.helo,
        d=datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000"))
    line = "X" * 78 + "\r\n"
    body = (line * (a.size // len(line) + 1))[:a.size]
    if not body.endswith("\r\n"):
        body = body[:-2] + "\r\n"
    return (hdr + body).encode()


def latency_run(a, sink, cg, run_no):
    host, port = benchlib.split_hostport(a.target)
    acc, e2e = [], []
    lost = errors = ambiguous = 0
    mta0 = benchlib.cgroup_cpu_seconds(cg)
    t_start = time.monotonic()
    for i in range(a.samples):
        if time.monotonic() - t_start > a.timeout:
            break
        base = sink.count
        msg = make_message(a, i)
        t0 = time.monotonic()
        try:
            with smtplib.SMTP(host, port, local_hostname=a.helo, timeout=30) as s:
                s.sendmail(a.sender, [a.recipient], msg)
                t_acc = time.monotonic()
        except (smtplib.SMTPException, OSError) as e:
            errors += 1
            sys.stderr.write("latency sample %d: %r\n" % (i, e))
            continue
        got, t_sink = sink.wait_for(base + 1, time.monotonic() + a.sample_timeout)
        time.sleep(a.gap)
        if got < base + 1:
            lost += 1
            sink.wait_quiet(quiet=a.quiet, limit=a.sample_timeout)
        elif sink.count != base + 1:
            # another (late or duplicate) message reached the sink meanwhile:
            # the count cannot tell which one was ours, so drop this sample
            ambiguous += 1
        else:
            acc.append(1000 * (t_acc - t0))
            e2e.append(1000 * (t_sink - t0))
    sink.wait_quiet(quiet=a.quiet, limit=3.0)
    mta1 = benchlib.cgroup_cpu_seconds(cg)
    return dict(type="latency", label=a.label, run=run_no, ts=now_iso(), target=a.target,
                sink=a.sink, size=a.size, samples=a.samples, ok=len(e2e), lost=lost,
                errors=errors, ambiguous=ambiguous, e2e_ms=stats(e2e), accept_ms=stats(acc),
                mta_cpu_s=round(mta1 - mta0, 3) if mta0 is not None else None)


def summarize(a, mode, size, recs):
    s = dict(type="summary", label=a.label, mode=mode, runs=len(recs), size=size,
             target=a.target, ts=now_iso())
    if mode == "throughput":
        s.update(messages=a.messages, sessions=a.sessions, reuse=a.reuse,
                 all_complete=all(r["complete"] for r in recs))
        for key in ("accept_msgs_per_s", "e2e_msgs_per_s", "mta_cpu_ms_per_msg",
                    "mta_cpu_pct_one_core", "sys_busy_pct_e2e", "mta_rss_peak_kb",
                    "mta_pss_peak_kb", "mta_hwm_max_kb"):
            st = stats([r.get(key) for r in recs])
            s[key] = st and {k: st[k] for k in ("min", "median", "max")}
    else:
        s["samples"] = a.samples
        for key in ("e2e_ms", "accept_ms"):
            st = stats([r[key]["median"] for r in recs if r.get(key)])
            s[key + "_run_medians"] = st and {k: st[k] for k in ("min", "median", "max")}
    return s


def emit(rec, out):
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="name for the results (postfix, floor, mine...)")
    ap.add_argument("--state", help="start_mta.py WORKDIR: target, sink, recipient and cgroup from it")
    ap.add_argument("--target", help="host:port the load is sent to")
    ap.add_argument("--sink", help="host:port where smtp-sink listens (the MTA relays there)")
    ap.add_argument("--cgroup", help="cgroup dir of the MTA, for CPU figures")
    ap.add_argument("--mode", default="throughput",
                    help="throughput, latency, or both: throughput,latency (one sink for all)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="unreported warm-up runs (throughput: 1/10 size)")
    ap.add_argument("--messages", "-m", type=int, default=2000)
    ap.add_argument("--sessions", "-s", type=int, default=20)
    ap.add_argument("--size", "-l", default="4096",
                    help="body bytes (smtp-source -l); several: 4096,102400")
    ap.add_argument("--latency-size", type=int, help="latency: body bytes (default: first --size)")
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d: many messages per connection")
    ap.add_argument("--samples", type=int, default=20, help="latency: messages per run")
    ap.add_argument("--gap", type=float, default=0.05, help="latency: pause between samples, s")
    ap.add_argument("--sample-timeout", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on one run, s")
    ap.add_argument("--pause", type=float, default=1.0, help="pause between runs, s")
    ap.add_argument("--quiet", type=float, default=0.5, help="sink idle time that ends a run, s")
    ap.add_argument("--sender", default="bench@src.test")
    ap.add_argument("--recipient", default=None, help="default bench@bench.test")
    ap.add_argument("--helo", default="src.test")
    ap.add_argument("--mem-interval", type=float, default=0.5,
                    help="throughput: seconds between memory samples of the MTA cgroup (0: off)")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--tls", help="CERT,KEY: STARTTLS on both hops: the load from tls_load.py send "
                                  "--starttls, the sink tls_load.py sink with this certificate "
                                  "(throughput mode only)")
    ap.add_argument("--auth", help="with --tls: USER:PASSWORD for AUTH PLAIN on every connection")
    a = ap.parse_args()
    if a.tls and "latency" in a.mode:
        ap.error("--tls: throughput mode only")

    cg = a.cgroup
    if a.state:
        st = benchlib.load_state(a.state)
        a.target = a.target or st["listen"]
        a.sink = a.sink or st["sink"]
        a.recipient = a.recipient or st.get("recipient")
        cg = cg or st.get("cgroup")
    a.recipient = a.recipient or "bench@bench.test"
    if not a.target or not a.sink:
        ap.error("--target and --sink (or --state) are required")
    th, tp = benchlib.split_hostport(a.target)
    sh_, sp = benchlib.split_hostport(a.sink)
    benchlib.require_loopback(th, "target")
    benchlib.require_loopback(sh_, "sink")
    a.target = benchlib.fmt_hostport(th, tp)
    a.sink = benchlib.fmt_hostport(sh_, sp)

    modes = [m.strip() for m in a.mode.split(",") if m.strip()]
    sizes = [int(x) for x in str(a.size).split(",") if x.strip()]
    for m in modes:
        if m not in ("throughput", "latency"):
            ap.error("unknown mode %r" % m)

    # One sink for the whole invocation: an MTA may keep its connection to the
    # sink open between runs, and a restarted sink would make it fail and retry.
    sink = Sink(sh_, sp, tls=tuple(a.tls.split(",", 1)) if a.tls else None)
    try:
        for mode in modes:
            for size in (sizes if mode == "throughput" else [a.latency_size or sizes[0]]):
                a.size = size
                for w in range(a.warmup):
                    if mode == "throughput":
                        r = throughput_run(a, sink, cg, max(20, a.messages // 10), 0)
                    else:
                        r = latency_run(a, sink, cg, 0)
                    sys.stderr.write("warm-up: %s\n" % json.dumps(r))
                    time.sleep(a.pause)
                recs = []
                for i in range(1, a.runs + 1):
                    if mode == "throughput":
                        r = throughput_run(a, sink, cg, a.messages, i)
                    else:
                        r = latency_run(a, sink, cg, i)
                    emit(r, a.out)
                    recs.append(r)
                    time.sleep(a.pause)
                emit(summarize(a, mode, size, recs), a.out)
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
