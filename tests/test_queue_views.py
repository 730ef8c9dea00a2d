"""``mta queue list`` filters and summary on a real queue, and ``mta queue trace``
across the main process and a worker of the real daemon."""

from __future__ import annotations

import json
import re
import smtplib
import time
from pathlib import Path

import pytest

from mta.admin import cli
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.store import QueueStore
from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, write_domain
from tests.test_workers import children_of

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
log_json = "var/mta.json"
{extra}

[listeners.mx]
endpoint = "127.0.0.1:{port}"
kind = "mx"

[limits]
connection_rate_per_ip = 0
""" + QUIET_TAIL

MINUTE = 60.0


def write_config(root: Path, extra: str = "", port: int = 0) -> Path:
    # far@example.test is forwarded to a remote address: parked at the dead smarthost.
    write_domain(root / "domains", "example.test", {"alice": PASSWORD}, "far: far@remote.test\n")
    path = root / "mta.toml"
    path.write_text(CONFIG.format(extra=extra, port=port or free_port(), dead_port=free_port()))
    return path


def enqueue(store: QueueStore, sender: str, rcpts: list[tuple[str, RecipientKind]],
            age: float, deferred: bool = False) -> str:
    writer = store.new_message()
    writer.write(b"Subject: q\r\n\r\nbody\r\n")
    recipients = []
    for address, kind in rcpts:
        r = Recipient(address, kind, address, mailbox=address if kind is RecipientKind.LOCAL else "")
        if deferred:
            r.state, r.attempts, r.last_reply = RecipientState.DEFERRED, 1, "451 4.4.1 no answer"
        recipients.append(r)
    writer.commit(Envelope(writer.id, sender, recipients, time.time() - age))
    return writer.id


@pytest.fixture
def queue(tmp_path):
    config = write_config(tmp_path)
    store = QueueStore(tmp_path / "var" / "queue", fsync=False)
    R, L = RecipientKind.REMOTE, RecipientKind.LOCAL
    ids = {
        "fresh": enqueue(store, "a@src.test", [("x@gmail.test", R), ("y@gmail.test", R)], 1 * MINUTE),
        "old": enqueue(store, "b@src.test", [("z@gmail.test", R), ("w@yahoo.test", R)], 30 * MINUTE,
                       deferred=True),
        "ancient": enqueue(store, "", [("v@yahoo.test", R)], 3 * 86400, deferred=True),
        "local": enqueue(store, "c@other.test", [("alice@example.test", L)], 7 * MINUTE),
    }
    return config, ids


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_summary_is_a_qshape_table(queue, capsys) -> None:
    config, _ids = queue
    code, out = run(capsys, "queue", "list", "--summary", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DESTINATION", "T", "5", "10", "20", "40", "80", "160", "320",
                                "640", "1280", "1280+"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-2]}
    assert rows["TOTAL"] == ["4", "1", "1", "0", "1", "0", "0", "0", "0", "0", "1"]
    assert rows["gmail.test"] == ["2", "1", "0", "0", "1", "0", "0", "0", "0", "0", "0"]
    assert rows["yahoo.test"] == ["2", "0", "0", "0", "1", "0", "0", "0", "0", "0", "1"]
    assert rows["local"] == ["1", "0", "1", "0", "0", "0", "0", "0", "0", "0", "0"]
    assert [line.split()[0] for line in lines[1:-2]][0] == "TOTAL"
    assert lines[-1] == "-- by state: active 2, deferred 2, held 0"

    code, out = run(capsys, "queue", "list", "--summary", "--json", "--config", str(config))
    data = json.loads(out)
    assert data["buckets_minutes"][-1] == "1280+"
    by_dest = {d["destination"]: d for d in data["destinations"]}
    assert by_dest["gmail.test"]["total"] == 2 and by_dest["gmail.test"]["counts"][3] == 1
    assert data["states"] == {"active": 2, "deferred": 2, "held": 0}


@pytest.mark.parametrize(("filters", "expected"), [
    (["--sender", "a@src.test"], {"fresh"}),
    (["--sender", "src.test"], {"fresh", "old"}),
    (["--sender", "<>"], {"ancient"}),
    (["--recipient", "ALICE@example.test"], {"local"}),
    (["--recipient", "@yahoo.test"], {"old", "ancient"}),
    (["--destination", "gmail.test"], {"fresh", "old"}),
    (["--destination", "local"], {"local"}),
    (["--state", "deferred"], {"old", "ancient"}),
    (["--state", "active"], {"fresh", "local"}),
    (["--state", "deferred", "--destination", "gmail.test"], {"old"}),
    (["--sender", "nobody@nowhere.test"], set()),
])
def test_filters(queue, capsys, filters, expected) -> None:
    config, ids = queue
    code, out = run(capsys, "queue", "list", "--json", *filters, "--config", str(config))
    assert code == 0
    assert {e["id"] for e in json.loads(out)} == {ids[name] for name in expected}
    code, out = run(capsys, "queue", "list", *filters, "--config", str(config))
    for name, queue_id in ids.items():
        assert (queue_id in out) == (name in expected)
    if expected:
        code, out = run(capsys, "queue", "list", "--summary", *filters, "--config", str(config))
        assert out.splitlines()[1].split()[:2] == ["TOTAL", str(len(expected))]
    else:
        assert out == "no message matches (of 4 queued)\n"


def hold(config: Path, queue_id: str, reason: str) -> None:
    """Put a queued message in the hold queue, as a quarantining check does (issue 17)."""
    store = QueueStore(config.parent / "var" / "queue", fsync=False)
    env = store.load(queue_id)
    env.hold = reason
    store.save(env)


def test_held_state_filter_and_summary(queue, capsys) -> None:
    config, ids = queue
    hold(config, ids["old"], "spam score 14.2")  # a deferred message, then quarantined
    code, out = run(capsys, "queue", "list", "--json", "--state", "held", "--config", str(config))
    assert code == 0 and [e["id"] for e in json.loads(out)] == [ids["old"]]
    code, out = run(capsys, "queue", "list", "--state", "held", "--config", str(config))
    assert ids["old"] in out and ids["fresh"] not in out
    assert f"{ids['old']} held: spam score 14.2" in out
    # Held is a state of its own: no longer listed as deferred.
    code, out = run(capsys, "queue", "list", "--json", "--state", "deferred", "--config", str(config))
    assert {e["id"] for e in json.loads(out)} == {ids["ancient"]}
    code, out = run(capsys, "queue", "list", "--summary", "--config", str(config))
    assert out.splitlines()[-1] == "-- by state: active 2, deferred 1, held 1"
    code, out = run(capsys, "queue", "list", "--summary", "--state", "held", "--config", str(config))
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:-2]}
    assert rows == {"TOTAL": ["1", "0"], "gmail.test": ["1", "0"], "yahoo.test": ["1", "0"]}
    assert out.splitlines()[-1] == "-- by state: active 0, deferred 0, held 1"
    code, out = run(capsys, "queue", "list", "--summary", "--json", "--config", str(config))
    assert json.loads(out)["states"] == {"active": 2, "deferred": 1, "held": 1}


def test_bad_state_is_refused(queue, capsys) -> None:
    config, _ = queue
    with pytest.raises(SystemExit) as info:
        cli.main(["queue", "list", "--state", "frozen", "--config", str(config)])
    assert info.value.code == 2
    assert "invalid choice: 'frozen'" in capsys.readouterr().err


def test_trace_needs_the_json_log(tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    write_config(tmp_path)
    config.write_text((tmp_path / "mta.toml").read_text().replace('log_json = "var/mta.json"', ""))
    assert cli.main(["queue", "trace", "alice@example.test", "--config", str(config)]) == 1
    assert "set log_json" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_trace_gathers_the_main_process_and_the_worker(tmp_path, capsys) -> None:
    port = free_port()
    config = write_config(tmp_path, extra="workers = 2\nworkers_deliver = true", port=port)
    daemon = Daemon(tmp_path, config, port)
    daemon.start()
    try:
        deadline = time.monotonic() + 15
        while not children_of(daemon.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker_log = tmp_path / "var" / "mta.json.worker1"
        main_log = tmp_path / "var" / "mta.json"
        # The worker (it imports the delivery side too) has started once its log is there.
        while not worker_log.exists() and time.monotonic() < deadline + 15:
            time.sleep(0.1)
        # The kernel spreads connections over both processes: send (a bounded
        # number of messages) until the worker has taken one.
        sent_by = {}
        for i in range(60):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail(f"s{i}@remote.test")
                assert s.rcpt("alice@example.test")[0] == 250
                assert s.rcpt("far@example.test")[0] == 250
                code, reply = s.data(f"Subject: {i}\r\n\r\nn{i}\r\n".encode())
                assert code == 250
                sent_by[reply.decode().split()[-1]] = f"s{i}@remote.test"
            if worker_log.exists() and '"event":"queued"' in worker_log.read_text():
                break
        worker_ids = re.findall(r'"event":"queued".*?"queue_id":"(\w+)"', worker_log.read_text())
        assert worker_ids, "the worker took no connection"
        queue_id = worker_ids[0]
        sender = sent_by[queue_id]
        # Wait for the worker's first pass over that message (alice: delivered,
        # far@example.test, forwarded: deferred at the dead smarthost), and for
        # the main process to take it over (its retries are the main process's).
        def deliveries_logged() -> int:
            return sum(1 for line in worker_log.read_text().splitlines()
                       if '"event":"delivery"' in line and f'"queue_id":"{queue_id}"' in line)

        def handed_over() -> bool:
            return any('"event":"handed_over"' in line and f'"queue_id":"{queue_id}"' in line
                       for line in main_log.read_text().splitlines())

        deadline = time.monotonic() + 20
        while (deliveries_logged() < 2 or not handed_over()) and time.monotonic() < deadline:
            time.sleep(0.1)

        code, out = run(capsys, "queue", "trace", queue_id, "--json", "--config", str(config))
        assert code == 0
        events = json.loads(out)
        assert [(e["event"], e["process"]) for e in events[:1]] == [("queued", "worker1")]
        deliveries = {e["recipient"]: e for e in events if e["event"] == "delivery"}
        assert deliveries["alice@example.test"]["outcome"] == "delivered"
        assert deliveries["alice@example.test"]["process"] == "worker1"  # both cores deliver
        assert deliveries["far@example.test"]["outcome"] == "deferred"
        assert [e["process"] for e in events if e["event"] == "handed_over"] == ["main"]
        assert deliveries["far@example.test"]["destination"] == "remote:smarthost"
        assert [e["time"] for e in events] == sorted(e["time"] for e in events)
        assert all(e.get("queue_id") == queue_id for e in events)

        code, out = run(capsys, "queue", "trace", queue_id, "--config", str(config))
        lines = out.splitlines()
        assert re.match(rf"\S+Z  worker1   queued      queued {queue_id} from={sender}",
                        lines[0]), lines[0]
        assert any(re.match(rf"\S+Z  worker1   delivery    delivery {queue_id} to "
                            r"alice@example\.test via local: delivered", line) for line in lines)

        # By address: the sender's one message, from both processes.
        code, out = run(capsys, "queue", "trace", sender, "--json", "--config", str(config))
        events = json.loads(out)
        assert {e["queue_id"] for e in events} == {queue_id}
        assert {e["process"] for e in events} == {"worker1", "main"}

        code, out = run(capsys, "queue", "trace", "nobody@nowhere.test", "--config", str(config))
        assert code == 1 and "no log events for nobody@nowhere.test" in out
    finally:
        daemon.kill()
