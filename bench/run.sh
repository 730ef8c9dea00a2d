#!/bin/bash
# The benchmark of our MTA against Postfix, in one command (`make bench`):
#
#   floor (smtp-source straight into smtp-sink), then Postfix, then our MTA:
#   throughput at each size (smtp-source, a new connection per message),
#   single-message latency, the fsync check (strace), CPU ms per message and
#   peak memory of the MTA's processes; then, for our MTA, a py-spy profile of
#   one more 4 KB throughput run and the idle sessions test on a fresh instance.
#   Writes results.jsonl (one JSON line per run), fsync.jsonl, health.jsonl,
#   idle.jsonl, profile-ours-4k.folded, profile.md, the MTAs' logs, and
#   summary.md under $OUT, and prints summary.md.
#
# Settings (environment variables, all optional):
#   MODE=smarthost | mx   smarthost: both MTAs relay to smtp-sink as a fixed
#                         smarthost; mx: both look up "MX bench.test" in
#                         dns_stub.py (-> sink.bench.test -> the sink address)
#        | tls            TLS on both hops (issue 19 point 1): the smarthost
#                         setup, with bench/tls_load.py as load (STARTTLS on
#                         every connection, pipelining) and as sink (offers
#                         STARTTLS); both MTAs get one new P-256 certificate
#                         (OUT/tls), offer STARTTLS and require it to the sink
#                         (Postfix: smtpd_tls_security_level = may,
#                         smtp_tls_security_level = encrypt, tlsmgr session
#                         cache; ours: [tls], smarthost_tls = "require", TLS
#                         session resumption); OpenSSL's default ciphers on all
#                         sides; throughput only (no latency runs)
#   MTAS="postfix ours ours-fsync"  targets after the floor (also: chasquid
#                         opensmtpd). ours: CONFIG as is (queue_sync = "syncfs":
#                         one syncfs(2) per group-commit batch); ours-fsync: the
#                         same with queue_sync = "fsync" (the product default:
#                         fsync of each file and of the directory)
#   FLOOR=1               0 skips the floor
#   SIZES="4096 102400"  MESSAGES=2000  SESSIONS=20
#   ROUNDS=3  RUNS=1      the targets take turns: ROUNDS rounds, in each every
#                         target runs RUNS times on a fresh instance (the order
#                         reversed every other round), so the drift of a noisy
#                         machine hits all alike; the tables take the median
#                         over all ROUNDS x RUNS runs of a target
#   LAT_SAMPLES=20  LAT_SIZE=4096
#   CHECK_FSYNC=1         strace the MTA while it takes 50 messages
#   PROFILE=1             py-spy on our MTA during one extra 4 KB run
#   PROFILE_MESSAGES=$MESSAGES  PROFILE_SIZE=4096 (the message size of that run)
#   IDLE_SESSIONS=10000   0 skips the idle sessions test
#   LISTEN=127.0.0.1:32525  SINK=127.0.0.1:32526 (mx: 127.0.0.2:32526)
#   FLOOR_SINK=127.0.0.1:32527  RUN_TIMEOUT=600  KEEP=0  OUT=/tmp/bench-results-<time>
#   TWISTD=...            default: ../.venv/bin/twistd if present, else twistd on PATH
#   CONFIG=bench/mta-bench.toml  (copied to OUT with data_dir = OUT/mta-data)
# A quick check: ROUNDS=1 MESSAGES=500 IDLE_SESSIONS=1000 PROFILE=0 bash bench/run.sh
#
# MODE=backlog (issue 19 point 3; bench/backlog.py): for each of MTAS, ROUNDS
#   times: BACKLOG_MESSAGES (100000) x BACKLOG_SIZE (4096) B sent while the
#   smarthost accepts and closes every connection (it is down), then memory
#   per queued message, CPU and connections while deferred (BACKLOG_IDLE=30 s),
#   a restart's time to its first 220, and the drain after a flush once
#   smtp-sink listens there (Postfix: postqueue -f; ours: mta queue flush).
#   Writes backlog.jsonl and summary.md; the other settings do not apply.
#
# Needs root (cgroups, mount namespaces, smtp-sink -u), Postfix's smtp-source
# and smtp-sink, strace and py-spy. All traffic stays on loopback; every run and
# every MTA has a time limit; each MTA is stopped by its pid, also on Ctrl-C.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
cd "$BENCH"

MODE=${MODE:-smarthost}
MTAS=${MTAS-"postfix ours ours-fsync"}
FLOOR=${FLOOR:-1}
SIZES=${SIZES:-"4096 102400"}
MESSAGES=${MESSAGES:-2000}
SESSIONS=${SESSIONS:-20}
RUNS=${RUNS:-1}
ROUNDS=${ROUNDS:-3}
LAT_SAMPLES=${LAT_SAMPLES:-20}
LAT_SIZE=${LAT_SIZE:-4096}
CHECK_FSYNC=${CHECK_FSYNC:-1}
PROFILE=${PROFILE:-1}
PROFILE_MESSAGES=${PROFILE_MESSAGES:-$MESSAGES}
PROFILE_SIZE=${PROFILE_SIZE:-4096}
IDLE_SESSIONS=${IDLE_SESSIONS:-10000}
LISTEN=${LISTEN:-127.0.0.1:32525}
FLOOR_SINK=${FLOOR_SINK:-127.0.0.1:32527}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
KEEP=${KEEP:-0}
CONFIG=${CONFIG:-$BENCH/mta-bench.toml}
OUT=${OUT:-/tmp/bench-results-$(date +%Y%m%d-%H%M%S)}
case $MODE in
    smarthost) SINK=${SINK:-127.0.0.1:32526}; START_ARGS=() ;;
    # Postfix refuses an MX on one of its own addresses: the sink gets another one.
    mx) SINK=${SINK:-127.0.0.2:32526}; START_ARGS=(--mx-domain bench.test) ;;
    tls) SINK=${SINK:-127.0.0.1:32526}; START_ARGS=() ;;
    backlog) SINK=${SINK:-127.0.0.1:32526}; START_ARGS=() ;;
    *) echo "run.sh: MODE must be smarthost, mx, tls or backlog" >&2; exit 2 ;;
esac
LOAD_MODE=throughput,latency
LOAD_ARGS=()

if [ "$(id -u)" != 0 ]; then echo "run.sh: needs root (cgroups, namespaces, smtp-sink -u)" >&2; exit 1; fi
PATH=$PATH:/usr/sbin:/sbin
for tool in smtp-source smtp-sink; do
    command -v $tool >/dev/null || { echo "run.sh: $tool missing (apt-get install postfix)" >&2; exit 1; }
done
if [ -z "${TWISTD:-}" ]; then
    if [ -x "$ROOT/.venv/bin/twistd" ]; then TWISTD=$ROOT/.venv/bin/twistd; else TWISTD=$(command -v twistd); fi
fi
if [ "$PROFILE" = 1 ] && ! command -v py-spy >/dev/null; then
    echo "run.sh: py-spy not found; profile skipped" >&2; PROFILE=0
fi
# 10,000 idle sessions need as many descriptors in the MTA (inherited from here).
# Without CAP_SYS_RESOURCE the hard limit cannot be raised: then take all of it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt "$((IDLE_SESSIONS + 200))" ]; then
    echo "run.sh: ulimit -n is $(ulimit -n), too low for IDLE_SESSIONS=$IDLE_SESSIONS" >&2; exit 1
fi

mkdir -p "$OUT"
RES=$OUT/results.jsonl
echo "results in $OUT" >&2

# Our MTA's configuration, copied into OUT with its own data_dir (control
# socket, SRS secret), so that two benchmarks never share one.
OURS_CONFIG=$OUT/mta-bench.toml
mkdir -p "$OUT/mta-data/domains"
sed -e "s|^data_dir = .*|data_dir = \"$OUT/mta-data\"|" \
    -e "s|^domains_dir = .*|domains_dir = \"$OUT/mta-data/domains\"|" "$CONFIG" > "$OURS_CONFIG"
if ! grep -q '^data_dir = ' "$OURS_CONFIG"; then
    sed -i "1i data_dir = \"$OUT/mta-data\"" "$OURS_CONFIG"
fi
if [ "$MODE" = tls ]; then
    # One certificate for both MTAs and the sink (P-256: the handshake's
    # signature is cheap, so the load generator and sink are not the limit).
    mkdir -p "$OUT/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-mta.test -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2>/dev/null
    TLS_PAIR=$OUT/tls/cert.pem,$OUT/tls/key.pem
    START_ARGS=(--tls "$TLS_PAIR")
    LOAD_MODE=throughput
    LOAD_ARGS=(--tls "$TLS_PAIR")
    sed -i 's/^smarthost_tls = .*/smarthost_tls = "require"/' "$OURS_CONFIG"
    printf '\n[tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$OUT/tls/cert.pem" "$OUT/tls/key.pem" >> "$OURS_CONFIG"
fi
# ours-fsync: the same configuration with the product's default queue_sync.
OURS_FSYNC_CONFIG=$OUT/mta-bench-fsync.toml
grep -v '^queue_sync = ' "$OURS_CONFIG" > "$OURS_FSYNC_CONFIG"
sed -i '1i queue_sync = "fsync"' "$OURS_FSYNC_CONFIG"
ours_cmd() {  # config file -> the twistd command line for start_mta.py
    local cmd="PYTHONPATH=$(printf %q "$ROOT") $(printf %q "$TWISTD") -n --pidfile= mta"
    cmd+=" --config $(printf %q "$1") --listen mx=tcp:{listen_port}:interface={listen_host}"
    cmd+=" --queue {workdir}/queue"
    if [ "$MODE" = mx ]; then
        cmd+=" --dns {dns_host}:{dns_port} --mx-port {sink_port}"
    else
        cmd+=" --smarthost {sink_host}:{sink_port}"
    fi
    printf '%s' "$cmd"
}
OURS_CMD=$(ours_cmd "$OURS_CONFIG")
OURS_FSYNC_CMD=$(ours_cmd "$OURS_FSYNC_CONFIG")

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) CPUs, $(uname -sr), $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
    echo "postfix: $(postconf -d -h mail_version 2>/dev/null || echo '?')"
    echo "ours: $("$TWISTD" --version 2>/dev/null | head -1); project $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    echo "uncommitted changes: $(git -C "$ROOT" diff HEAD --stat -- mta twisted 2>/dev/null | tail -1 || true)" \
         "(sha256 of the diff: $(git -C "$ROOT" diff HEAD -- mta twisted 2>/dev/null | sha256sum | cut -c1-12))"
    echo "mode=$MODE sizes=$SIZES messages=$MESSAGES sessions=$SESSIONS rounds=$ROUNDS runs=$RUNS latency=$LAT_SAMPLES x $LAT_SIZE B"
    echo "our command: $OURS_CMD"
    echo "ours-fsync: the same with $OURS_FSYNC_CONFIG (queue_sync = \"fsync\")"
} > "$OUT/env.txt"

if [ "$MODE" = backlog ]; then
    BACKLOG_MESSAGES=${BACKLOG_MESSAGES:-100000}
    for round in $(seq 1 "$ROUNDS"); do
        for kind in $MTAS; do
            echo "== backlog: $kind, $BACKLOG_MESSAGES messages, round $round of $ROUNDS" >&2
            if [ "$kind" = postfix ]; then
                start_args="start postfix --listen $LISTEN --sink $SINK --lifetime 7200"
                flush="postqueue -c {workdir}/etc -f"
            else
                cfg=$OURS_CONFIG
                if [ "$kind" = ours-fsync ]; then cfg=$OURS_FSYNC_CONFIG; fi
                start_args="start custom --cmd $(printf %q "$(ours_cmd "$cfg")") --cwd $ROOT"
                start_args+=" --listen $LISTEN --sink $SINK --lifetime 7200"
                flush="$ROOT/.venv/bin/mta queue flush --config $cfg"
            fi
            python3 backlog.py --label "$kind" --start "$start_args" --flush "$flush" \
                --messages "$BACKLOG_MESSAGES" --size "${BACKLOG_SIZE:-4096}" \
                --idle "${BACKLOG_IDLE:-30}" --timeout "$RUN_TIMEOUT" --out "$OUT/backlog.jsonl" \
                || echo "backlog run of $kind FAILED" >&2
        done
    done
    {
        echo "## Backlog benchmark: our MTA vs Postfix"
        echo
        sed 's/^/    /' "$OUT/env.txt"
        echo
        python3 - "$OUT/backlog.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
cols = ["accept_rate", "kib_per_message_rss", "kib_per_message_pss", "idle_cpu_pct",
        "connections_during_load", "connections_while_idle", "restart_to_220_s",
        "connections_after_restart", "drain_rate", "drained"]
print("| MTA | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for label in dict.fromkeys(r["label"] for r in rows):
    mine = [r for r in rows if r["label"] == label]
    print(f"| {label} | " + " | ".join(
        str(statistics.median(r[c] for r in mine)) if all(c in r for r in mine) else "-"
        for c in cols) + " |")
PY
    } > "$OUT/summary.md"
    cat "$OUT/summary.md"
    exit 0
fi

CURRENT=
PYSPY=
stop_current() {
    if [ -n "$PYSPY" ]; then kill -INT "$PYSPY" 2>/dev/null || true; wait "$PYSPY" 2>/dev/null || true; PYSPY=; fi
    if [ -n "$CURRENT" ]; then
        if [ "$KEEP" = 1 ]; then keep=--keep; else keep=; fi
        python3 start_mta.py stop "$CURRENT" $keep >&2 || true
        CURRENT=
    fi
}
trap stop_current EXIT
trap 'stop_current; exit 130' INT TERM

load() {  # label, then extra run_load.py arguments; one smtp-sink for all its runs
    local label=$1; shift
    python3 run_load.py --label "$label" --mode "$LOAD_MODE" --size "${SIZES// /,}" \
        --messages "$MESSAGES" --sessions "$SESSIONS" --runs "$RUNS" \
        --latency-size "$LAT_SIZE" --samples "$LAT_SAMPLES" \
        --timeout "$RUN_TIMEOUT" --out "$RES" "${LOAD_ARGS[@]}" "$@"
}

start() {  # kind [label]: starts one MTA, sets CURRENT to its workdir
    local kind=$1 args=(start "$1" --listen "$LISTEN" --sink "$SINK" --lifetime 7200 "${START_ARGS[@]}")
    if [ "$kind" = ours ] || [ "$kind" = ours-fsync ]; then
        local cmd=$OURS_CMD
        if [ "$kind" = ours-fsync ]; then cmd=$OURS_FSYNC_CMD; fi
        args=(start custom --cmd "$cmd" --cwd "$ROOT" --listen "$LISTEN"
              --sink "$SINK" --lifetime 7200 "${START_ARGS[@]}")
    fi
    local state
    state=$(python3 start_mta.py "${args[@]}")
    CURRENT=$(printf '%s' "$state" | python3 -c 'import json,sys; print(json.load(sys.stdin)["workdir"])')
    echo "   workdir $CURRENT" >&2
}

mta_pid() {  # the MTA process itself (not its timeout wrapper) in CURRENT's cgroup
    python3 -c 'import sys; sys.path.insert(0, "."); sys.dont_write_bytecode = True
import benchlib
st = benchlib.load_state(sys.argv[1])
for p in benchlib.cgroup_pids(st["cgroup"]):
    m = benchlib.proc_memory_kb(p)
    if m and m.get("name") not in benchlib.WRAPPERS:
        print(p); break' "$CURRENT"
}

profile() {  # py-spy on our MTA during one extra throughput run (not in results.jsonl)
    local pid
    pid=$(mta_pid)
    echo "== profile: py-spy on pid $pid during $PROFILE_MESSAGES x $PROFILE_SIZE B" >&2
    # --subprocesses: the worker processes too; --threads: one table per thread;
    # no --idle: waits (epoll_wait, a worker's queue) are left out, time blocked
    # in fsync is kept.
    local t0 t1
    t0=$(date +%s.%N)
    timeout --signal=INT "$((RUN_TIMEOUT + 60))" py-spy record --pid "$pid" --subprocesses --rate 100 --threads \
        --format raw -o "$OUT/profile-ours-4k.folded" >"$OUT/py-spy.log" 2>&1 &
    PYSPY=$!
    sleep 1
    python3 run_load.py --label ours-profiled --state "$CURRENT" --mode throughput --size "$PROFILE_SIZE" \
        --messages "$PROFILE_MESSAGES" --sessions "$SESSIONS" --runs 1 --warmup 0 \
        --timeout "$RUN_TIMEOUT" --out "$OUT/profile-load.jsonl" "${LOAD_ARGS[@]}" >&2
    kill -INT "$PYSPY" 2>/dev/null || true
    t1=$(date +%s.%N)
    wait "$PYSPY" || true
    PYSPY=
    python3 profile_summary.py "$OUT/profile-ours-4k.folded" --rate 100 \
        --seconds "$(python3 -c "print(round($t1 - $t0, 2))")" > "$OUT/profile.md" \
        || echo "profile summary failed; see $OUT/py-spy.log" >&2
}

keep_logs() {  # label: copy the MTA's logs into OUT and count problems
    local label=$1
    for f in mta.log maillog; do
        if [ -f "$CURRENT/$f" ]; then cp "$CURRENT/$f" "$OUT/$label-$f"; fi
    done
    python3 mta_health.py --state "$CURRENT" --label "$label" --out "$OUT/health.jsonl" >&2 || true
}

if [ "$FLOOR" = 1 ]; then
    echo "== floor: smtp-source -> smtp-sink on $FLOOR_SINK" >&2
    load floor --target "$FLOOR_SINK" --sink "$FLOOR_SINK" --runs "$((RUNS * ROUNDS))"
fi

for round in $(seq 1 "$ROUNDS"); do
    kinds=$MTAS
    if [ $((round % 2)) = 0 ]; then kinds=$(printf '%s\n' $MTAS | tac | tr '\n' ' '); fi
    for kind in $kinds; do
        echo "== $kind ($MODE), round $round of $ROUNDS" >&2
        start "$kind"
        load "$kind" --state "$CURRENT"
        if [ "$round" = "$ROUNDS" ]; then  # the checks once, in the last round
            if [ "$CHECK_FSYNC" = 1 ] && command -v strace >/dev/null; then
                python3 check_fsync.py --state "$CURRENT" --label "$kind" | tee -a "$OUT/fsync.jsonl"
            fi
            if [ "$kind" = ours ] && [ "$PROFILE" = 1 ]; then profile; fi
        fi
        sleep 2  # let the last deliveries finish before counting what is left in the queue
        if [ "$ROUNDS" = 1 ]; then keep_logs "$kind"; else keep_logs "$kind-round$round"; fi
        stop_current
    done
done

if [ "$IDLE_SESSIONS" -gt 0 ] && [[ " $MTAS " == *" ours "* ]]; then
    echo "== ours: $IDLE_SESSIONS idle sessions (fresh instance)" >&2
    start ours
    python3 idle_sessions.py --state "$CURRENT" --sessions "$IDLE_SESSIONS" --label ours \
        --out "$OUT/idle.jsonl" || echo "idle sessions test FAILED (see idle.jsonl)" >&2
    keep_logs ours-idle
    stop_current
fi

files=("$RES")
for f in fsync.jsonl idle.jsonl health.jsonl; do
    if [ -f "$OUT/$f" ]; then files+=("$OUT/$f"); fi
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/env.txt"
{
    echo "## Benchmark: our MTA vs Postfix ($MODE mode)"
    echo
    sed 's/^/    /' "$OUT/env.txt"
    echo
    python3 summarize.py "${files[@]}"
    if [ -f "$OUT/profile.md" ]; then echo; cat "$OUT/profile.md"; fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
