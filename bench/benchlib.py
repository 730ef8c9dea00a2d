"""Helpers shared by start_mta.py and run_load.py (stdlib only).

Copied from the reference harness (/work/shared/bench); added here: the
memory figures of the processes in a cgroup (proc_memory_kb, cgroup_memory).
"""
import ipaddress
import json
import os
import socket
import time

CGROUP_V1 = "/sys/fs/cgroup/cpuacct"
CGROUP_V2 = "/sys/fs/cgroup"


def split_hostport(text, default_host="127.0.0.1"):
    """'127.0.0.1:25' / '[::1]:25' / '25' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    else:
        host, port = default_host, text
    return host, int(port)


def require_loopback(host, what):
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit("%s %s is not a loopback address; this benchmark only "
                         "sends traffic to 127.0.0.0/8 or ::1" % (what, host))


def fmt_hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def wait_banner(host, port, timeout):
    """Connect until a 220 greeting arrives (bounded by timeout). Returns True/False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                data = b""
                while b"\n" not in data and len(data) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def port_is_free(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------- CPU accounting
def cgroup_create(name):
    """Create a CPU-accounting cgroup; returns its directory or None."""
    for base, probe in ((CGROUP_V1, "cpuacct.usage"), (CGROUP_V2, "cgroup.controllers")):
        if os.path.exists(os.path.join(base, probe)):
            path = os.path.join(base, name)
            try:
                os.makedirs(path, exist_ok=True)
                return path
            except OSError:
                continue
    return None


def cgroup_join(path):
    """Move the calling process into cgroup PATH (use as preexec_fn)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def cgroup_cpu_seconds(path):
    """Total CPU (user+system) used by every process ever in the cgroup."""
    if not path:
        return None
    try:
        with open(os.path.join(path, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9
    except OSError:
        pass
    try:
        with open(os.path.join(path, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) / 1e6
    except OSError:
        pass
    return None


def cgroup_pids(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cgroup_remove(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


def proc_cpu_seconds(pid):
    """utime+stime (+ reaped children) of one process, in seconds."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(int(x) for x in fields[11:15]) / ticks
    except (OSError, IndexError, ValueError):
        return None


def system_cpu_snapshot():
    """(busy_jiffies, total_jiffies) over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def system_busy_pct(before, after):
    busy = after[0] - before[0]
    total = after[1] - before[1]
    return round(100.0 * busy / total, 1) if total > 0 else None


# ---------------------------------------------------------------- memory
# Wrappers start_mta.py puts around the MTA: not counted as the MTA's memory.
WRAPPERS = ("timeout", "unshare", "setpriv", "env")


def proc_memory_kb(pid, pss=False):
    """{'rss': VmRSS, 'hwm': VmHWM[, 'pss': Pss]} in KiB of one process, or None."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Name:"):
                    out["name"] = line.split(None, 1)[1].strip()
                elif line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm"] = int(line.split()[1])
        if pss:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        out["pss"] = int(line.split()[1])
                        break
    except (OSError, ValueError, IndexError):
        return None
    return out if "rss" in out else None  # kernel threads and zombies have no VmRSS


def cgroup_memory(path, pss=False):
    """Memory of the MTA's processes in cgroup PATH (wrappers excluded), KiB.

    rss_kb: sum of VmRSS (shared pages of several processes count several
    times); pss_kb: sum of Pss (shared pages split between the processes);
    hwm_kb_max: the largest VmHWM (peak RSS) of one process; procs: count.
    """
    tot = dict(rss_kb=0, hwm_kb_sum=0, hwm_kb_max=0, procs=0)
    if pss:
        tot["pss_kb"] = 0
    for pid in cgroup_pids(path) if path else []:
        m = proc_memory_kb(pid, pss)
        if not m or m.get("name") in WRAPPERS:
            continue
        tot["procs"] += 1
        tot["rss_kb"] += m["rss"]
        tot["hwm_kb_sum"] += m.get("hwm", 0)
        tot["hwm_kb_max"] = max(tot["hwm_kb_max"], m.get("hwm", 0))
        if pss:
            tot["pss_kb"] += m.get("pss", 0)
    return tot


def load_state(path):
    if os.path.isdir(path):
        path = os.path.join(path, "state.json")
    with open(path) as f:
        return json.load(f)
