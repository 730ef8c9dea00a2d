"""The features built apart, under ``workers = 2`` (a real twistd with a worker
process): the hold queue, and TLS reporting, each seen across both processes."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from mta.admin.control import call
from mta.delivery.mtasts import MTASTS, PolicyCache, STSPolicy
from mta.delivery.tlsrpt import ForwardedCounts, ReportSettings, TLSReporter, record_line
from mta.delivery.wiring import build_couriers
from tests.daemon import Daemon, free_port
from tests.dnsserver import LoopbackDNS
from tests.harness import PASSWORD, in_thread, write_domain
from tests.sink import start_sink
from tests.stsserver import policy_text, start_policy_server
from tests.test_cli import sock_dir  # noqa: F401 (fixture)
from tests.test_hold import HOLD_CHECKS
from tests.test_metrics import scrape, value
from tests.test_mtasts_delivery import CA, MX_CERT, POLICY_CERT, dns, setup, zone  # noqa: F401
from tests.test_workers import CONFIG, children_of

pytestmark = pytest.mark.timeout(120)


def start_two(tmp_path: Path, top: str = "", tail: str = "") -> Daemon:
    """twistd with ``workers = 2``, alice@example.test local, once its worker
    adopted the socket; ``top``: more top-level settings, ``tail``: more tables."""
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    config = tmp_path / "mta.toml"
    text = CONFIG.replace("workers = 2\n", "workers = 2\n" + top).format(
        port=port, dead_port=free_port())
    config.write_text(text + tail)
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
            not children_of(daemon.proc.pid)
            or "SMTPFactory starting" not in daemon.read_log().split("started worker 1", 1)[-1]):
        time.sleep(0.1)
    assert children_of(daemon.proc.pid), daemon.read_log()[-2000:]
    return daemon


def send(port: int, subject: str, rcpt: str = "alice@example.test") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("friend@remote.test")
        s.rcpt(rcpt)
        code, text = s.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_message_a_worker_quarantined_is_held_counted_and_released_by_the_main_process(
        tmp_path, sock_dir):  # noqa: F811
    metrics = free_port()
    sock = sock_dir / "control.sock"
    daemon = start_two(tmp_path, f'control_socket = "{sock}"\n'
                       f'metrics = "tcp:{metrics}:interface=127.0.0.1"\n', HOLD_CHECKS)
    new = tmp_path / "var" / "mail" / "example.test" / "alice" / "new"
    try:
        kept: list[str] = []
        by_worker: set[str] = set()
        for i in range(40):  # until the worker has taken a few (the kernel spreads accepts)
            kept.append(send(daemon.port, f"[quarantine] {i}"))
            by_worker = set(re.findall(r"\[worker1 mta\.smtp\.server#info\] queued (\w+)",
                                       daemon.read_log())) & set(kept)
            if len(by_worker) >= 2 and len(by_worker) < len(kept):
                break
        assert by_worker and by_worker != set(kept), daemon.read_log()[-3000:]
        plain = send(daemon.port, "lunch")
        wait(lambda: new.exists() and len(list(new.iterdir())) == 1)
        time.sleep(0.5)  # a first pass that would deliver a held one has had time
        assert [b"Subject: lunch" in p.read_bytes() for p in new.iterdir()] == [True]
        # Every held message is counted by the main process, whichever took it.
        wait(lambda: value(scrape(metrics)[1], "mta_queue_held_messages") == len(kept))
        assert call(sock, "status")["held"] == len(kept)
        assert plain not in kept
        for queue_id in sorted(by_worker):
            call(sock, "release", id=queue_id)
        wait(lambda: len(list(new.iterdir())) == 1 + len(by_worker))
        wait(lambda: value(scrape(metrics)[1], "mta_queue_held_messages")
             == len(kept) - len(by_worker))
        subjects = sorted(p.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0]
                          for p in new.iterdir())
        assert subjects == sorted([b"lunch"] + [b"[quarantine] %d" % kept.index(q)
                                                for q in by_worker])
        assert daemon.terminate() in (0, -signal.SIGTERM)
        log = daemon.read_log()
        assert "Unhandled error" not in log and "Traceback" not in log, log[-2000:]
    finally:
        daemon.kill()


TLS_CONFIG = """
hostname = "out.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
workers = 2
workers_deliver = true
relay_networks = ["127.0.0.0/8"]

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
connection_rate_per_ip = 0

[spf]
enabled = false

[dkim]
verify = false

[dmarc]
enabled = false

[dns]
servers = ["{dns_host}:{dns_port}"]
timeout = 1

[delivery]
mx_port = {mx_port}
retry_schedule = [3600]
connection_cache_time = 0

[delivery.mta_sts]
enabled = true
https_port = {https_port}
ca_file = "sts-ca.pem"

[tls_reports]
enabled = true
"""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_tls_counts_of_both_processes_reach_the_one_state_file(tmp_path) -> None:
    """Both processes deliver under an MTA-STS policy (enforce, over verified
    TLS); every session is counted once in data_dir/tlsrpt/state.json, which
    only the main process writes (before: each process wrote its own counts
    over the other's, the last writer's won)."""
    names = LoopbackDNS(ttl=0)
    await names.start()
    names.load(zone("dst.test"))
    policies = await start_policy_server(POLICY_CERT)
    policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"]))
    sink = await start_sink(tls=MX_CERT)
    CA.cert_pem.write_to_path(str(tmp_path / "sts-ca.pem"))
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD})
    port = free_port()
    host, dns_port = names.address
    config = tmp_path / "mta.toml"
    config.write_text(TLS_CONFIG.format(port=port, dns_host=host, dns_port=dns_port,
                                        mx_port=sink.port, https_port=policies.port))
    daemon = Daemon(tmp_path, config, port)
    delivered = re.compile(r"^\S+ \[(worker1 )?mta\.queue\.runner#info\] delivery \w+ to "
                           r"bob@dst\.test via \S+: delivered", re.M)
    try:
        await in_thread(daemon.start)

        def worker_ready() -> bool:
            log = daemon.read_log()
            return bool(children_of(daemon.proc.pid)) and \
                "SMTPFactory starting" in log.split("started worker 1", 1)[-1]

        await wait_async(worker_ready)
        sent = 0
        for i in range(40):  # until both processes have delivered some
            await in_thread(send, daemon.port, f"sts {i}", "bob@dst.test")
            sent += 1
            await wait_async(lambda n=sent: len(sink.messages) == n)
            by = {m.group(1) or "main" for m in delivered.finditer(daemon.read_log())}
            if by == {"worker1 ", "main"} and sent >= 6:
                break
        assert by == {"worker1 ", "main"}, daemon.read_log()[-3000:]
        assert all(m.tls for m in sink.messages)
        assert await in_thread(daemon.terminate) in (0, -signal.SIGTERM)
    finally:
        await in_thread(daemon.kill)
        await sink.stop()
        await policies.stop()
        await names.stop()
    log = daemon.read_log()
    assert "Unhandled error" not in log and "Traceback" not in log, log[-2000:]
    state = json.loads((tmp_path / "var" / "tlsrpt" / "state.json").read_text())
    [entry] = [day["dst.test sts"] for day in state.values()]
    assert entry["success"] == sent and entry["failures"] == {}
    assert entry["mx"] == ["mx.dst.test"]
    assert sorted((tmp_path / "var" / "tlsrpt").iterdir()) == [
        tmp_path / "var" / "tlsrpt" / "state.json"]


async def wait_async(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


def test_a_forwarded_tls_count_is_the_same_count_and_garbage_is_refused(tmp_path) -> None:
    """The worker's side (ForwardedCounts) and the main process's (record_line)
    of the ``tlsrpt`` line: what arrives is counted as if recorded there; a
    line that is not one is a ValueError (logged by the pool), never a count."""
    lines: list[bytes] = []
    ForwardedCounts(lines.append).record(
        "dst.test", "sts", "certificate-expired", "mx.dst.test",
        {"receiving-ip": "127.0.0.1", "failure-reason-code": "expired"},
        policy_string=["version: STSv1", "mode: enforce"], mx_patterns=["mx.dst.test"])
    settings = ReportSettings(submitter="out.test", organization="o", contact="c@out.test",
                              from_address="r@out.test")
    reporter = TLSReporter(None, None, Clock(), tmp_path, settings)
    direct = TLSReporter(None, None, Clock(), tmp_path / "direct", settings)
    record_line(reporter, lines[0])
    direct.record("dst.test", "sts", "certificate-expired", "mx.dst.test",
                  {"receiving-ip": "127.0.0.1", "failure-reason-code": "expired"},
                  policy_string=["version: STSv1", "mode: enforce"], mx_patterns=["mx.dst.test"])
    assert reporter.days == direct.days and reporter.days
    for bad in (b"garbage", b"[1, 2]", b'["d", "sts", "no-such-result", "", null, [], []]',
                b'["d", "sts", "success", "", {"a": 1}, [], []]', b"[" * 20000):
        with pytest.raises(ValueError):
            record_line(reporter, bad)
    with pytest.raises(ValueError):
        ForwardedCounts(lines.append).record("d", "nonsense", "success")
    assert reporter.days == direct.days


# --- the MTA-STS cache shared by the processes ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_processes_share_the_mta_sts_cache_and_only_the_main_one_refreshes(
        setup, dns, tmp_path) -> None:  # noqa: F811 (fixtures)
    """Two processes' MTASTS over one data_dir/mta-sts (the main process's, with
    the refresh timer; a worker's, without): a policy one fetched is read from
    the file by the other (no second fetch), the main one's proactive refresh
    reaches the worker through the file, and the worker's copy expiring never
    removes the refreshed file nor fetches again."""
    dns.load(zone("dst.test"))
    courier = await setup.start()
    setup.policies.serve("dst.test", policy_text("enforce", ["mx.dst.test"], max_age=1000))
    start = time.time()
    main_clock, worker_clock = Clock(), Clock()
    main_clock.advance(start)
    worker_clock.advance(start)
    cache_dir = tmp_path / "mta-sts"
    main = MTASTS(courier.sts.txt_resolver, courier.sts.fetcher, PolicyCache(cache_dir),
                  main_clock, refresh_interval=60)
    worker = MTASTS(courier.sts.txt_resolver, courier.sts.fetcher, PolicyCache(cache_dir),
                    worker_clock, refresh_interval=0)
    main.start()
    worker.start()
    assert (await main.policy("dst.test")).mx == ("mx.dst.test",)
    assert (await worker.policy("dst.test")).mx == ("mx.dst.test",)
    assert setup.policies.hits["dst.test"] == 1  # the worker read the main one's file
    setup.policies.serve("dst.test", policy_text("enforce", ["*.dst.test"], max_age=2000))
    for clock in (main_clock, worker_clock):
        clock.advance(540)  # past half of max_age: the main process's timer refreshes
    await wait_async(lambda: main.policies["dst.test"].max_age == 2000)
    assert setup.policies.hits["dst.test"] == 2 and main.fetches == 2 and worker.fetches == 0
    for clock in (main_clock, worker_clock):
        clock.advance(600)  # the worker's first copy has expired; the file's has not
    assert (await worker.policy("dst.test")).mx == ("*.dst.test",)
    assert worker.fetches == 0 and setup.policies.hits["dst.test"] == 2
    assert json.loads((cache_dir / "dst.test.json").read_text())["max_age"] == 2000
    main.stop()
    worker.stop()
    # As the daemon wires a worker: no refresh timer, counts forwarded.
    built = build_couriers(setup.config, reactor, store=setup.store, tls_forward=print,
                           sts_refresh=False)["remote"]
    setup.couriers.append(built)
    assert built.sts._timer is None and isinstance(built.tlsrpt, ForwardedCounts)
    assert courier.sts._timer is not None and isinstance(courier.tlsrpt, TLSReporter)


def test_a_cache_write_does_not_take_another_writers_temporary_file(tmp_path) -> None:
    """Each write has a temporary file of its own (then fsync, rename): a second
    process saving the same domain meanwhile neither truncates nor renames the
    first one's half-written file."""
    cache = PolicyCache(tmp_path)
    policy = STSPolicy(domain="dst.test", id="1", mode="enforce", mx=("mx.dst.test",),
                       max_age=1000, fetched_at=time.time(),
                       text="version: STSv1\nmode: enforce\nmx: mx.dst.test\nmax_age: 1000\n")
    for name in ("dst.test.tmp", ".dst.test.json.tmp"):
        (tmp_path / name).write_text("another process, half way through")
    cache.save(policy)
    assert (tmp_path / "dst.test.tmp").read_text() == "another process, half way through"
    assert (tmp_path / ".dst.test.json.tmp").read_text() == "another process, half way through"
    assert PolicyCache(tmp_path).load_all()["dst.test"] == policy
