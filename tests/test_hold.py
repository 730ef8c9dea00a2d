"""The quarantine (hold) queue (issue 17), end to end in process: a check added by
configuration quarantines a message; it is committed (250) with its hold in the
envelope on disk, never delivered, listed by ``mta queue list --held``, counted in
the metrics, and delivered to the Maildir only once ``mta queue release`` has
gone through the control socket; ``mta queue delete`` removes a held one."""

from __future__ import annotations

import base64
import json
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from mta.admin.control import call
from mta.config import CHECKS, load_config
from mta.daemon.service import MTAService, build_control, build_metrics
from mta.mail.checks import ACCEPT, Stage, Verdict
from mta.queue.envelope import Envelope, Recipient, RecipientKind
from tests.harness import in_thread
from tests.test_cli import run_cli, sock_dir, until, write_setup  # noqa: F401 (fixture)
from tests.test_metrics import scrape_until, value
from tests.test_pipeline import capture, stop_capture

pytestmark = pytest.mark.timeout(60)


class QuarantineTagged:
    """MESSAGE: holds a message whose Subject says [quarantine] (as a milter's
    SMFIR_QUARANTINE would)."""

    name = "quarantine"
    stages = frozenset({Stage.MESSAGE})

    def __init__(self, ctx: Any) -> None:
        pass

    def check(self, stage: Stage, state: Any) -> Verdict:
        if any(b"[quarantine]" in line for line in state.header_lines):
            return Verdict(quarantine="tagged by the test check")
        return ACCEPT


HOLD_CHECKS = f"""
[checks]
order = {json.dumps([*CHECKS, "quarantine"])}

[checks.quarantine]
factory = "tests.test_hold:QuarantineTagged"
"""


class Held:
    """The in-process daemon with the quarantining check, its control socket and metrics."""

    def __init__(self, root: Path, sock: Path) -> None:
        self.root = root
        self.sock = sock
        self.config_path = write_setup(root, sock)
        with self.config_path.open("a") as f:
            f.write(HOLD_CHECKS)
        self.service: Any = None
        self.metrics: Any = None

    async def start(self) -> None:
        self.service = MTAService(load_config(self.config_path), reactor=reactor,
                                  config_path=self.config_path)
        if "control" not in self.service.namedServices:
            self.service.addService(build_control(self.service))
        self.service.startService()
        await self.service.listening
        self.metrics = build_metrics(self.service, "tcp:0:interface=127.0.0.1")
        self.metrics.startService()
        await self.metrics.listening

    async def stop(self) -> None:
        await self.metrics.stopService()
        await self.service.stopService()

    @property
    def port(self) -> int:
        return self.service.ports[0].getHost().port

    @property
    def store(self) -> Any:
        return self.service.context.store

    async def scrape(self) -> dict:
        _, samples = await scrape_until(self.metrics.port.getHost().port, lambda s: True)
        return samples

    def maildir(self) -> list[bytes]:
        new = self.root / "var" / "mail" / "example.test" / "alice" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def held(tmp_path, sock_dir):  # noqa: F811
    h = Held(tmp_path, sock_dir / "control.sock")
    pytest_twisted.blockon(Deferred.fromCoroutine(h.start()))
    yield h
    pytest_twisted.blockon(Deferred.fromCoroutine(h.stop()))


def send(port: int, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("friend@remote.test")
        s.rcpt("alice@example.test")
        code, text = s.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]  # "250 2.0.0 Ok: queued as ID"


@pytest_twisted.ensureDeferred
async def test_a_quarantined_message_is_kept_and_delivered_only_once_released(held, capsys):
    events = capture()
    try:
        kept = await in_thread(send, held.port, "[quarantine] invoice")
        plain = await in_thread(send, held.port, "lunch")
        await until(lambda: len(held.maildir()) == 1)
        await deferLater(reactor, 0.3, lambda: None)  # a runner that would deliver it has had time
        # Committed, with its hold in the envelope on disk, and not delivered.
        data = held.store.data_path(kept).read_bytes()
        embedded = data[:data.index(b"Received: ")]  # the envelope written before the message
        assert embedded.startswith(b"mta-envelope ")
        assert b'"hold": "tagged by the test check"' in embedded
        assert held.store.load(kept).hold == "tagged by the test check"
        assert not held.store.exists(plain)  # delivered and removed
        assert [b"Subject: lunch" in m for m in held.maildir()] == [True]
        assert held.service.runner.held == {kept}
        samples = await held.scrape()
        assert value(samples, "mta_queue_held_messages") == 1
        assert value(samples, "mta_messages_held_total") == 1
        assert value(samples, "mta_check_verdicts_total", check="quarantine", result="quarantine") == 1
        assert value(samples, "mta_check_verdicts_total", check="quarantine", result="accept") == 1

        capsys.readouterr()
        assert await run_cli("queue", "list", "--held", "--config", str(held.config_path)) == 0
        out = capsys.readouterr().out
        assert kept in out and plain not in out
        assert f"{kept} held: tagged by the test check" in out
        assert "alice@example.test  held" in out

        # A flush does not deliver it either.
        assert await run_cli("queue", "flush", "--config", str(held.config_path)) == 0
        await deferLater(reactor, 0.2, lambda: None)
        assert len(held.maildir()) == 1

        assert await run_cli("queue", "release", kept, "--config", str(held.config_path)) == 0
        assert capsys.readouterr().out.endswith(f"released {kept}: delivery is being attempted now\n")
        await until(lambda: len(held.maildir()) == 2)
        await until(lambda: not held.store.exists(kept))
        samples = await held.scrape()
        assert value(samples, "mta_queue_held_messages") == 0
    finally:
        stop_capture(events)
    # Maildir names order by time only to the second: find the released one by content.
    mails = held.maildir()
    assert sorted(b"Subject: [quarantine] invoice" in m for m in mails) == [False, True]
    (hold,) = [e for e in events if e.get("event") == "held"]
    assert (hold["queue_id"], hold["reason"], hold["sender"]) == (
        kept, "tagged by the test check", "friend@remote.test")
    (verdict,) = [e for e in events if e.get("event") == "check" and e.get("check") == "quarantine"]
    assert (verdict["result"], verdict["stage"], verdict["reason"]) == (
        "quarantine", "message", "tagged by the test check")
    (released,) = [e for e in events if e.get("event") == "released"]
    assert released["queue_id"] == kept


@pytest_twisted.ensureDeferred
async def test_a_held_message_stays_held_over_a_restart_and_can_be_deleted(held, capsys):
    kept = await in_thread(send, held.port, "[quarantine] x")
    await until(lambda: held.service.runner.held == {kept})
    await held.stop()
    await held.start()  # a new daemon reads the queue from disk
    await deferLater(reactor, 0.3, lambda: None)
    assert held.service.runner.held == {kept}
    assert held.maildir() == []
    capsys.readouterr()
    assert await run_cli("queue", "release", "0123456789abcdef0123", "--config",
                         str(held.config_path)) == 1
    assert "no message 0123456789abcdef0123 in the queue" in capsys.readouterr().err
    assert await run_cli("queue", "delete", kept, "--config", str(held.config_path)) == 0
    assert not held.store.exists(kept)
    assert held.service.runner.held == set()
    assert held.maildir() == []


@pytest_twisted.ensureDeferred
async def test_releasing_a_message_that_is_not_held_is_refused(held, capsys):
    # Submitted for a remote recipient: deferred (no DNS), so it stays in the queue.
    answer = await in_thread(call, held.sock, "submit", sender="alice@example.test",
                             recipients=["friend@remote.test"],
                             message=base64.b64encode(b"Subject: t\r\n\r\nhi\r\n").decode())
    queue_id = answer["id"]
    runner = held.service.runner
    await until(lambda: not runner.busy(queue_id)
                and held.store.load(queue_id).recipients[0].attempts == 1, timeout=10)
    capsys.readouterr()
    assert await run_cli("queue", "release", queue_id, "--config", str(held.config_path)) == 1
    assert f"message {queue_id} is not held" in capsys.readouterr().err


def test_the_hold_is_in_the_envelope_only_when_set():
    env = Envelope("0123456789abcdef0123", "a@remote.test",
                   [Recipient("alice@example.test", RecipientKind.LOCAL, "alice@example.test")], created=time.time())
    assert b"hold" not in env.to_bytes()  # every other envelope stays as it was
    env.hold = "spam (milter)"
    again = Envelope.from_bytes(env.to_bytes())
    assert again.hold == "spam (milter)"
    assert Envelope.from_bytes(env.to_line()).hold == "spam (milter)"
