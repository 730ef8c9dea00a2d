"""Tests for the queue runner with a fake clock, scripted couriers and a real store on disk."""

from __future__ import annotations

import email
import email.policy
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mta.config import DeliveryConfig
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.layout import QueuedMessage, new_queue_id
from mta.queue.runner import QueueRunner, Router, retry_delay
from mta.queue.store import QueueStore
from mta.queue.writer import MessageWriter

T0 = 1_700_000_000.0
HOST = "mx.example.com"
SENDER = "alice@example.org"
DATA = b"Received: by mx.example.com\r\nSubject: test\r\nFrom: alice@example.org\r\n\r\nbody\r\n"

Decide = Callable[[Envelope, Recipient], tuple[Outcome, str]]


@dataclass
class Call:
    queue_id: str
    sender: str
    addresses: list[str]
    data: bytes
    deferred: Deferred[list[DeliveryResult]] | None = None
    recipients: list[Recipient] = field(default_factory=list)


def read_message(data_path: Path) -> bytes:
    with QueuedMessage(data_path).open() as f:
        return f.read()


class FakeCourier:
    """Answers from ``decide`` at once, or (``manual``) hands back Deferreds the test fires."""

    def __init__(self, decide: Decide | None = None, manual: bool = False,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self.decide = decide or (lambda env, r: (Outcome.DELIVERED, "250 2.0.0 ok"))
        self.manual = manual
        self.alive = alive
        self.calls: list[Call] = []
        self.successes: list[str] = []  # addresses delivered (by a living process)

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        if not self.alive():  # a dead process delivers nothing
            return succeed([DeliveryResult(r, Outcome.DEFERRED, "451 dead") for r in recipients])
        call = Call(envelope.id, envelope.sender, [r.address for r in recipients],
                    read_message(data_path), recipients=list(recipients))
        self.calls.append(call)
        if self.manual:
            call.deferred = Deferred()
            return call.deferred
        results = [DeliveryResult(r, *self.decide(envelope, r), remote_mta="mx.peer.example")
                   for r in recipients]
        self.successes += [r.recipient.address for r in results if r.outcome is Outcome.DELIVERED]
        return succeed(results)

    def answer(self, call: Call, outcome: Outcome = Outcome.DELIVERED,
               reply: str = "250 2.0.0 ok") -> None:
        assert call.deferred is not None
        if outcome is Outcome.DELIVERED:
            self.successes += [r.address for r in call.recipients]
        call.deferred.callback([DeliveryResult(r, outcome, reply) for r in call.recipients])

    def delivered_to(self, address: str, sender: str | None = SENDER) -> int:
        return sum(address in c.addresses for c in self.calls if sender is None or c.sender == sender)

    def dsns(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(c.data, policy=email.policy.default)
                for c in self.calls if c.sender == ""]


def remote(address: str) -> Recipient:
    return Recipient(address=address, kind=RecipientKind.REMOTE, original=address)


def local(address: str) -> Recipient:
    return Recipient(address=address, kind=RecipientKind.LOCAL, original=address, mailbox=address)


def next_turn(clock: Clock) -> None:
    """One turn of a reactor driven by ``clock``: the calls due when it starts, not
    those they add (a real reactor runs those on its next turn; Clock.advance
    would run them at once)."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def queue(store: QueueStore, *recipients: Recipient, sender: str = SENDER,
          created: float | None = None) -> str:
    """Commit a message, then let its reactor turn end: the store tells the
    runner on the next one (a store without a Clock tells nobody)."""
    writer = store.new_message()
    writer.write(DATA)
    writer.commit(Envelope(id=writer.id, sender=sender, recipients=list(recipients),
                           created=store.clock() if created is None else created))
    if isinstance(store.reactor, Clock):
        next_turn(store.reactor)
    return writer.id


def dsn_recipients(msg: email.message.EmailMessage) -> list[dict[str, str]]:
    report = [p for p in msg.iter_parts() if p.get_content_type() == "message/delivery-status"][0]
    return [dict(block.items()) for block in report.get_payload()[1:]]


class Env:
    """One test's world: clock, store, couriers, runner."""

    def __init__(self, root: Path, config: DeliveryConfig | None = None,
                 remote_courier: FakeCourier | None = None, seed: int = 1,
                 store: QueueStore | None = None, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        if clock is None:
            self.clock.advance(T0)
        self.config = config or DeliveryConfig(retry_schedule=(60.0, 300.0, 900.0),
                                               retry_jitter=0.1, max_queue_lifetime=86400.0)
        self.store = store or QueueStore(root / "queue", fsync=False, clock=self.clock.seconds, reactor=self.clock)
        self.remote = remote_courier or FakeCourier()
        self.local = FakeCourier()
        self.pipe = FakeCourier()
        self.router = Router({"remote": self.remote, "local": self.local, "pipe": self.pipe})
        self.runner = QueueRunner(self.store, self.router, self.clock, self.config, HOST,
                                  rng=random.Random(seed), is_local=lambda d: d == "example.com")

    def envelope(self, queue_id: str) -> Envelope:
        return QueueStore(self.store.root, fsync=False).load(queue_id)

    def state(self, queue_id: str) -> list[str]:
        return [str(r.state) for r in self.envelope(queue_id).recipients]

    def run_until_empty(self, step: float = 30.0, limit: int = 10_000) -> None:
        for _ in range(limit):
            self.clock.advance(0)
            if not self.store.ids():
                return
            self.clock.advance(step)
        raise AssertionError(f"queue not empty: {self.store.ids()}")

    def stop(self) -> None:
        d = self.runner.stop()
        self.clock.advance(self.runner.stop_timeout + 1)
        assert d.called


@pytest.fixture
def world(tmp_path: Path) -> Any:
    worlds: list[Env] = []

    def make(**kw: Any) -> Env:
        w = Env(tmp_path, **kw)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.stop()


# --- the pure helpers -------------------------------------------------------------------


def test_retry_delay_schedule_and_jitter_bounds() -> None:
    schedule = (60.0, 300.0, 900.0)
    rng = random.Random(7)
    for attempts, base in [(1, 60.0), (2, 300.0), (3, 900.0), (4, 900.0), (50, 900.0)]:
        values = [retry_delay(attempts, schedule, 0.1, rng) for _ in range(500)]
        assert all(base * 0.9 <= v <= base * 1.1 for v in values)
        assert max(values) - min(values) > base * 0.1  # the jitter is really there
    assert retry_delay(2, schedule, 0.0, rng) == 300.0


def test_router_groups_by_destination() -> None:
    a, b = FakeCourier(), FakeCourier()
    rcpts = [remote("x@one.example"), local("u@example.com"), remote("y@ONE.example"),
             remote("z@two.example"), Recipient("cmd1", RecipientKind.PIPE, "p@example.com"),
             Recipient("cmd2", RecipientKind.PIPE, "q@example.com"), local("v@example.com")]
    env = Envelope(id="q", sender=SENDER, recipients=rcpts, created=T0)
    routes = Router({"remote": a, "local": b, "pipe": b}).route(env, rcpts)
    got = sorted((r.key, [x.address for x in r.recipients]) for r in routes)
    assert got == [("local", ["u@example.com", "v@example.com"]), ("pipe", ["cmd1"]),
                   ("pipe", ["cmd2"]), ("remote:one.example", ["x@one.example", "y@ONE.example"]),
                   ("remote:two.example", ["z@two.example"])]
    smart = Router({"remote": a}, smarthost=True).route(env, rcpts[:4])
    assert sorted(r.key for r in smart) == ["local", "remote:smarthost"]


# --- scheduling ----------------------------------------------------------------------------


def test_new_message_is_attempted_at_once_and_removed(world: Any) -> None:
    w = world()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        w.runner.start()
        qid = queue(w.store, remote("bob@one.example"), remote("carol@two.example"),
                    remote("dave@one.example"), local("erin@example.com"))
        # At once, from inside the commit (the SMTP server tells the store only
        # once its 250 has gone out: tests/test_server_misc.py).
        assert w.remote.calls != []
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert sorted(c.addresses for c in w.remote.calls) == [
        ["bob@one.example", "dave@one.example"], ["carol@two.example"]]
    assert [c.addresses for c in w.local.calls] == [["erin@example.com"]]
    assert all(c.data == DATA for c in w.remote.calls + w.local.calls)
    assert w.store.ids() == []
    assert not w.store.data_path(qid).exists() and not w.store.envelope_path(qid).exists()
    deliveries = [e for e in events if e.get("event") == "delivery"]
    assert sorted(e["recipient"] for e in deliveries) == [
        "bob@one.example", "carol@two.example", "dave@one.example", "erin@example.com"]
    for e in deliveries:
        assert e["queue_id"] == qid and e["outcome"] == "delivered"
        assert e["reply"] == "250 2.0.0 ok" and e["duration"] == 0.0


def test_a_message_no_process_announced_is_adopted(world: Any) -> None:
    # A worker committed it (and gave its 250) but died before announcing it:
    # the runner never heard of it until it looks (WorkerPool.ended asks it to).
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        return (Outcome.DEFERRED, "451 4.3.0 later") if r.address == "bob@one.example" \
            else (Outcome.DELIVERED, "250 2.0.0 ok")

    w = world(remote_courier=FakeCourier(decide))
    w.runner.start()
    known = queue(w.store, remote("bob@one.example"))  # tried at once, deferred: has a timer
    w.remote.calls.clear()
    other_process = QueueStore(w.store.root, fsync=False, clock=w.clock.seconds, reactor=w.clock)
    orphan = queue(other_process, remote("carol@two.example"))
    assert w.remote.calls == [] and sorted(w.store.ids()) == sorted([known, orphan])
    assert w.runner.adopt_unknown() == 1  # the orphan only, not the deferred one
    w.clock.advance(0)
    assert [(c.queue_id, c.addresses) for c in w.remote.calls] == [(orphan, ["carol@two.example"])]
    assert w.store.ids() == [known]
    assert w.runner.adopt_unknown() == 0


def test_a_workers_runner_makes_the_first_pass_and_hands_over_what_is_left(world: Any) -> None:
    # A worker process's runner (hand_over set, started without recovery):
    # what it delivers it removes; what is still queued after its first pass
    # goes to the main process, with its state as saved, and is not retried here.
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        return (Outcome.DEFERRED, "451 4.3.0 later") if r.address == "bob@one.example" \
            else (Outcome.DELIVERED, "250 2.0.0 ok")

    w = world(remote_courier=FakeCourier(decide))
    on_disk = queue(w.store, remote("dave@one.example"))  # the main process's: not ours
    handed: list[Envelope] = []
    w.runner.hand_over = handed.append
    w.runner.start(recover=False)
    assert w.remote.calls == []  # nothing read from disk
    done = queue(w.store, remote("carol@two.example"))
    left = queue(w.store, remote("bob@one.example"))
    assert [(c.queue_id, c.addresses) for c in w.remote.calls] == [
        (done, ["carol@two.example"]), (left, ["bob@one.example"])]
    assert [e.id for e in handed] == [left]
    assert [str(r.state) for r in handed[0].recipients] == w.state(left) == ["deferred"]
    assert sorted(w.store.ids()) == sorted([on_disk, left])  # done is removed
    w.clock.advance(3600)  # past any retry: the main process retries, not us
    assert len(w.remote.calls) == 2


def test_deferred_recipient_is_retried_on_schedule(world: Any) -> None:
    replies = iter([(Outcome.DEFERRED, "451 4.7.1 greylisted"),
                    (Outcome.DEFERRED, "421 4.4.2 timeout"),
                    (Outcome.DELIVERED, "250 2.0.0 ok")])
    w = world(remote_courier=FakeCourier(lambda env, r: next(replies)))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"))
    w.clock.advance(0)
    env = w.envelope(qid)
    [r] = env.recipients
    assert r.state is RecipientState.DEFERRED and r.attempts == 1
    assert r.last_reply == "451 4.7.1 greylisted" and r.remote_mta == "mx.peer.example"
    assert env.first_attempt == T0
    assert T0 + 54 <= r.next_attempt <= T0 + 66
    first_retry = r.next_attempt

    w.clock.advance(first_retry - w.clock.seconds() - 0.5)
    assert len(w.remote.calls) == 1  # not before its time
    w.clock.advance(0.5)
    assert len(w.remote.calls) == 2
    [r] = w.envelope(qid).recipients
    assert r.attempts == 2 and r.state is RecipientState.DEFERRED
    assert first_retry + 270 <= r.next_attempt <= first_retry + 330
    assert w.envelope(qid).first_attempt == T0

    w.clock.advance(r.next_attempt - w.clock.seconds())
    assert len(w.remote.calls) == 3
    assert w.store.ids() == []


def test_restart_resumes_and_never_redelivers(tmp_path: Path, world: Any) -> None:
    w1 = world(remote_courier=FakeCourier(lambda env, r: (Outcome.DEFERRED, "451 4.3.0 later")))
    w1.runner.start()
    qid = queue(w1.store, local("erin@example.com"), remote("bob@one.example"))
    w1.clock.advance(0)
    assert w1.state(qid) == ["delivered", "deferred"]
    next_attempt = w1.envelope(qid).recipients[1].next_attempt
    w1.stop()

    # A new process: new store object, new runner, same directory and time line.
    store2 = QueueStore(tmp_path / "queue", fsync=False, clock=w1.clock.seconds, reactor=w1.clock)
    w2 = world(store=store2, clock=w1.clock)
    w2.runner.start()
    w2.clock.advance(0)
    assert w2.local.calls == [] and w2.remote.calls == []
    w2.clock.advance(next_attempt - w2.clock.seconds())
    assert [c.addresses for c in w2.remote.calls] == [["bob@one.example"]]
    assert w2.local.calls == []
    assert w2.store.ids() == []  # done: both recipients delivered exactly once


def test_restart_retry_counts_continue(tmp_path: Path, world: Any) -> None:
    always_defer = FakeCourier(lambda env, r: (Outcome.DEFERRED, "451 4.3.0 later"))
    w1 = world(remote_courier=always_defer)
    w1.runner.start()
    qid = queue(w1.store, remote("bob@one.example"))
    w1.clock.advance(0)
    w1.clock.advance(w1.envelope(qid).recipients[0].next_attempt - w1.clock.seconds())
    assert w1.envelope(qid).recipients[0].attempts == 2
    w1.stop()
    w2 = world(store=QueueStore(tmp_path / "queue", fsync=False, clock=w1.clock.seconds, reactor=w1.clock),
               clock=w1.clock, remote_courier=always_defer)
    w2.runner.start()
    w2.clock.advance(w2.envelope(qid).recipients[0].next_attempt - w2.clock.seconds())
    [r] = w2.envelope(qid).recipients
    assert r.attempts == 3
    assert 810 <= r.next_attempt - w2.clock.seconds() <= 990  # the third step, not the first


def test_flush_makes_deferred_recipients_due(world: Any) -> None:
    replies = iter([(Outcome.DEFERRED, "451 4.3.0 a"), (Outcome.DEFERRED, "451 4.3.0 b"),
                    (Outcome.DELIVERED, "250 ok"), (Outcome.DELIVERED, "250 ok")])
    w = world(remote_courier=FakeCourier(lambda env, r: next(replies)))
    w.runner.start()
    q1 = queue(w.store, remote("bob@one.example"))
    q2 = queue(w.store, remote("carol@two.example"))
    w.clock.advance(0)
    assert len(w.remote.calls) == 2
    assert w.runner.flush(q1) == 1
    assert w.runner.flush("0000nonexistent") == 0
    w.clock.advance(0)
    assert [c.queue_id for c in w.remote.calls[2:]] == [q1]
    assert w.store.ids() == [q2]
    assert w.runner.flush() == 1
    w.clock.advance(0)
    assert w.store.ids() == []


# --- bounces and expiry --------------------------------------------------------------------


def test_mixed_results_give_one_dsn_for_the_failed_only(world: Any) -> None:
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        if env.sender == "":
            return Outcome.DELIVERED, "250 ok"
        return {"ok@one.example": (Outcome.DELIVERED, "250 2.0.0 ok"),
                "nobody@one.example": (Outcome.FAILED, "550 5.1.1 no such user"),
                "gone@two.example": (Outcome.FAILED, "550 mailbox gone"),
                "later@three.example": (Outcome.DEFERRED, "451 4.3.0 try later")}[r.address]

    w = world(remote_courier=FakeCourier(decide))
    w.runner.start()
    qid = queue(w.store, remote("ok@one.example"), remote("nobody@one.example"),
                remote("gone@two.example"), remote("later@three.example"))
    env = w.envelope(qid)  # the first pass ran at once, when the message was committed
    assert [str(r.state) for r in env.recipients] == ["delivered", "failed", "failed", "deferred"]
    assert [r.dsn_sent for r in env.recipients] == [False, True, True, False]
    # The DSN is a message of its own: its pass starts from the next reactor
    # turn, not nested inside the pass that queued it.
    assert [c for c in w.remote.calls if c.sender == ""] == []
    w.clock.advance(0)
    [dsn] = w.remote.dsns()
    [call] = [c for c in w.remote.calls if c.sender == ""]
    assert call.addresses == [SENDER]
    blocks = dsn_recipients(dsn)
    assert [(b["Final-Recipient"], b["Status"], b["Action"]) for b in blocks] == [
        ("rfc822;nobody@one.example", "5.1.1", "failed"),
        ("rfc822;gone@two.example", "5.0.0", "failed")]
    assert blocks[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[0]["Remote-MTA"] == "dns; mx.peer.example"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert w.store.ids() == [qid]  # the deferred recipient keeps it queued


def test_a_dsn_queued_after_an_answer_gets_its_pass_from_the_next_turn(world: Any) -> None:
    # The failure arrives later (a real courier answers from the network): the
    # notice queued then is not delivered from inside that pass, nested.
    w = world(remote_courier=FakeCourier(manual=True))
    w.runner.start()
    queue(w.store, remote("nobody@one.example"))
    [call] = w.remote.calls
    w.remote.answer(call, Outcome.FAILED, "550 5.1.1 no such user")
    assert [c.sender for c in w.remote.calls] == [SENDER]
    w.clock.advance(0)
    assert [c.sender for c in w.remote.calls] == [SENDER, ""]


def test_expiry_fails_pending_recipients_with_one_dsn(world: Any) -> None:
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        if env.sender == "":
            return Outcome.DELIVERED, "250 ok"
        return Outcome.DEFERRED, "451 4.4.1 connection refused"

    config = DeliveryConfig(retry_schedule=(600.0,), retry_jitter=0.0, max_queue_lifetime=1000.0)
    w = world(config=config, remote_courier=FakeCourier(decide))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"), remote("carol@two.example"))
    w.clock.advance(0)
    w.clock.advance(600)
    assert len(w.remote.calls) == 4
    # The next retry would be at +1200, past the lifetime: it is capped at the expiry.
    assert [r.next_attempt for r in w.envelope(qid).recipients] == [T0 + 1000] * 2
    w.clock.advance(399)
    assert len(w.remote.calls) == 4 and w.store.ids() == [qid]
    w.clock.advance(1)
    # Expired without another attempt; the bounce (a message of its own) went out.
    assert len([c for c in w.remote.calls if c.sender == SENDER]) == 4
    assert qid not in w.store.ids()
    [dsn] = w.remote.dsns()
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = dsn_recipients(dsn)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822;bob@one.example",
                                                      "rfc822;carol@two.example"]
    for b in blocks:
        assert b["Action"] == "failed" and b["Status"] == "4.4.7"
        assert "connection refused" in b["Diagnostic-Code"]
    human = next(dsn.iter_parts()).get_content()
    assert "expired" in human
    assert w.store.ids() == []


def test_deferred_result_after_expiry_fails_at_once(world: Any) -> None:
    config = DeliveryConfig(retry_schedule=(60.0,), max_queue_lifetime=100.0)
    w = world(config=config, remote_courier=FakeCourier(manual=True))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"))
    w.clock.advance(0)
    [call] = w.remote.calls
    w.clock.advance(150)  # the attempt outlives the message's lifetime
    w.remote.answer(call, Outcome.DEFERRED, "451 4.4.2 timeout")
    assert qid not in w.store.ids()
    dsn_ids = w.store.ids()
    assert len(dsn_ids) == 1 and w.store.load(dsn_ids[0]).sender == ""


def test_null_sender_is_never_bounced(world: Any) -> None:
    w = world(remote_courier=FakeCourier(lambda env, r: (Outcome.FAILED, "550 5.1.1 unknown")))
    w.runner.start()
    queue(w.store, remote("bob@one.example"), sender="")
    w.clock.advance(0)
    w.clock.advance(0)
    assert len(w.remote.calls) == 1
    assert w.store.ids() == []  # dropped: logged, not bounced


def test_bounce_to_a_local_sender_goes_to_the_local_courier(world: Any) -> None:
    w = world(remote_courier=FakeCourier(lambda env, r: (Outcome.FAILED, "550 5.1.1 unknown")))
    w.runner.start()
    queue(w.store, remote("bob@one.example"), sender="Erin@EXAMPLE.com")
    w.clock.advance(0)
    w.clock.advance(0)
    [call] = w.local.calls
    assert call.sender == "" and call.addresses == ["Erin@example.com"]
    assert call.recipients[0].kind is RecipientKind.LOCAL
    assert call.recipients[0].mailbox == "Erin@example.com"
    assert w.store.ids() == []


def test_delay_warning_is_sent_once(world: Any) -> None:
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        if env.sender == "":
            return Outcome.DELIVERED, "250 ok"
        return Outcome.DEFERRED, "451 4.7.1 greylisted"

    config = DeliveryConfig(retry_schedule=(300.0,), retry_jitter=0.0, delay_warning=450.0,
                            max_queue_lifetime=3600.0)
    w = world(config=config, remote_courier=FakeCourier(decide))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"))
    w.clock.advance(0)
    w.clock.advance(300)
    assert w.remote.dsns() == []
    w.clock.advance(150)  # the warning time, between two retries
    w.clock.advance(0)
    [dsn] = w.remote.dsns()
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    [block] = dsn_recipients(dsn)
    assert block["Action"] == "delayed" and block["Status"] == "4.7.1"
    assert "Will-Retry-Until" in block
    assert w.envelope(qid).delay_warned
    for _ in range(4):
        w.clock.advance(300)
        w.clock.advance(0)
    assert len(w.remote.dsns()) == 1


# --- concurrency and stopping -----------------------------------------------------------


def test_destination_and_global_slots(world: Any) -> None:
    config = DeliveryConfig(max_connections=3, max_connections_per_destination=2)
    w = world(config=config, remote_courier=FakeCourier(manual=True))
    w.runner.start()
    for i in range(5):
        queue(w.store, remote(f"u{i}@one.example"))
        queue(w.store, remote(f"v{i}@two.example"))
    w.clock.advance(0)

    answered = 0
    peak_total, peak_per_domain = 0, 0
    for _ in range(100):
        open_calls = [c for c in w.remote.calls if not c.deferred.called]
        per_domain: dict[str, int] = {}
        for c in open_calls:
            domain = c.addresses[0].split("@")[1]
            per_domain[domain] = per_domain.get(domain, 0) + 1
        assert len(open_calls) <= 3 and all(n <= 2 for n in per_domain.values())
        peak_total = max(peak_total, len(open_calls))
        peak_per_domain = max([peak_per_domain, *per_domain.values()])
        if not open_calls:
            break
        w.remote.answer(open_calls[0])
        answered += 1
    assert answered == 10 and len(w.remote.calls) == 10  # nothing dropped, nothing repeated
    assert peak_total == 3 and peak_per_domain == 2
    assert w.store.ids() == []


def test_stop_waits_for_deliveries_in_flight(world: Any) -> None:
    w = world(remote_courier=FakeCourier(manual=True))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"))
    w.clock.advance(0)
    [call] = w.remote.calls
    d = w.runner.stop()
    assert not d.called
    queue(w.store, remote("late@one.example"))  # nothing new starts while stopping
    w.clock.advance(0)
    assert len(w.remote.calls) == 1
    w.remote.answer(call)
    assert d.called
    assert qid not in w.store.ids()


def test_stop_is_bounded(world: Any) -> None:
    w = world(remote_courier=FakeCourier(manual=True))
    w.runner.start()
    qid = queue(w.store, remote("bob@one.example"))
    w.clock.advance(0)
    d = w.runner.stop()
    w.clock.advance(w.runner.stop_timeout - 1)
    assert not d.called
    w.clock.advance(1)
    assert d.called
    assert w.state(qid) == ["pending"]  # unchanged: tried again after the restart


# --- crash safety ------------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashingStore(QueueStore):
    """A store whose process 'dies' just before its Nth durable effect.

    Effects are envelope saves, message commits and removals.  After the crash
    every later effect fails too, and couriers stop delivering: a dead process
    does nothing more.
    """

    def __init__(self, *args: Any, crash_at: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.crash_at = crash_at
        self.effects = 0
        self.dead = False

    def effect(self) -> None:
        if self.dead:
            raise Crash("dead")
        self.effects += 1
        if self.effects == self.crash_at:
            self.dead = True
            raise Crash(f"crash at effect {self.effects}")

    def save(self, envelope: Envelope) -> None:
        self.effect()
        super().save(envelope)

    def remove(self, queue_id: str) -> None:
        self.effect()
        super().remove(queue_id)

    def save_async(self, envelope: Envelope) -> Deferred[None]:
        self.effect()
        return super().save_async(envelope)

    def remove_async(self, queue_id: str) -> Deferred[None]:
        self.effect()
        return super().remove_async(queue_id)

    def new_message(self, buffered: bool = False) -> MessageWriter:
        store = self

        class Writer(MessageWriter):
            def commit(self, envelope: Envelope) -> None:
                store.effect()
                super().commit(envelope)

            def commit_async(self, envelope: Envelope) -> Deferred[None]:
                store.effect()
                return super().commit_async(envelope)

        return Writer(self, new_queue_id(self.clock()), buffered)


def _decide_crash_scenario(env: Envelope, r: Recipient, tries: dict[str, int]
                           ) -> tuple[Outcome, str]:
    if env.sender == "":
        return Outcome.DELIVERED, "250 ok"
    tries[r.address] = tries.get(r.address, 0) + 1
    if r.address == "bob@x.example":
        return Outcome.FAILED, "550 5.1.1 no such user"
    if r.address == "carol@y.example" and tries[r.address] == 1:
        return Outcome.DEFERRED, "451 4.3.0 later"
    return Outcome.DELIVERED, "250 ok"


@pytest.mark.parametrize("crash_at", range(1, 10))
def test_crash_at_any_point_gives_exactly_once(tmp_path: Path, crash_at: int) -> None:
    clock = Clock()
    clock.advance(T0)
    root = tmp_path / "queue"
    store1 = CrashingStore(root, fsync=False, clock=clock.seconds, reactor=clock, crash_at=0)
    tries: dict[str, int] = {}
    remote1 = FakeCourier(lambda e, r: _decide_crash_scenario(e, r, tries),
                          alive=lambda: not store1.dead)
    w1 = Env(tmp_path, store=store1, clock=clock, remote_courier=remote1)
    w1.local.alive = lambda: not store1.dead
    qid = queue(store1, local("erin@example.com"), remote("bob@x.example"),
                remote("carol@y.example"))
    store1.crash_at = store1.effects + crash_at  # count from here
    w1.runner.start()
    for _ in range(20):
        clock.advance(0)
        clock.advance(60)
    w1.stop()
    crashed = store1.dead

    # What the disk says at the moment of the crash.
    disk = QueueStore(root, fsync=False)
    on_disk = disk.load(qid) if qid in disk.ids() else None
    recorded = {r.address: r.state for r in on_disk.recipients} if on_disk else None
    bounce_marked = on_disk is None or on_disk.recipients[1].dsn_sent
    dsn_ids_at_crash = {c.queue_id for c in remote1.calls if c.sender == ""} | {
        i for i in disk.ids() if i != qid and disk.load(i).extra.get("dsn_for") == qid}
    dsn_recorded = {i: disk.load(i).recipients[0].state is RecipientState.DELIVERED
                    for i in disk.ids() if i != qid}

    # Restart: a new process on the same directory, running to the end.
    w2 = Env(tmp_path, store=QueueStore(root, fsync=False, clock=clock.seconds, reactor=clock), clock=clock,
             remote_courier=FakeCourier(lambda e, r: _decide_crash_scenario(e, r, tries)))
    w2.runner.start()
    w2.run_until_empty()
    w2.stop()

    for address, courier1, courier2 in [("erin@example.com", w1.local, w2.local),
                                        ("carol@y.example", remote1, w2.remote)]:
        before, after = courier1.successes.count(address), courier2.successes.count(address)
        was_recorded = recorded is None or recorded[address] is RecipientState.DELIVERED
        if was_recorded:
            assert after == 0, f"{address} re-delivered although recorded as delivered"
        assert before + after >= 1, f"{address} never delivered"
        # A second delivery only when the first was never recorded (at-least-once gap).
        assert before + after == 1 or (before == 1 and after == 1 and not was_recorded)

    # Bounces: one DSN message, or two when the crash fell between queueing the
    # first and recording that it was queued.  Each DSN message is itself
    # delivered exactly once unless its delivery was not recorded.
    dsn_calls = [c for c in remote1.calls + w2.remote.calls if c.sender == ""]
    dsn_ids = {c.queue_id for c in dsn_calls}
    assert len(dsn_ids) >= 1, "the bounce was lost"
    if len(dsn_ids) > 1:
        assert len(dsn_ids) == 2 and len(dsn_ids_at_crash) == 1 and not bounce_marked
    for dsn_id in dsn_ids:
        before = sum(c.queue_id == dsn_id for c in remote1.calls)
        after = sum(c.queue_id == dsn_id for c in w2.remote.calls)
        # dsn_recorded: on disk at the crash (True: recorded delivered); absent: removed.
        assert before + after == 1 or (
            before == 1 and after == 1 and dsn_recorded.get(dsn_id) is False)
    for dsn in remote1.dsns() + w2.remote.dsns():
        assert [b["Final-Recipient"] for b in dsn_recipients(dsn)] == ["rfc822;bob@x.example"]
    assert QueueStore(root, fsync=False).ids() == []
    # 7 durable effects: a message whose last recipient becomes final is removed
    # without first rewriting its envelope (the removal is the durable record).
    if crash_at <= 7:
        assert crashed  # the scenario really has this many effects


# --- DSN (RFC 3461 §5.2): success notices, NOTIFY and delays, with a fake clock ------------


def dsn_remote(address: str, notify: str) -> Recipient:
    return Recipient(address=address, kind=RecipientKind.REMOTE, original=address, notify=notify)


def queue_dsn(store: QueueStore, *recipients: Recipient, sender: str = SENDER) -> str:
    writer = store.new_message()
    writer.write(DATA)
    writer.commit(Envelope(id=writer.id, sender=sender, recipients=list(recipients),
                           created=store.clock(), dsn=True))
    return writer.id


def test_notify_delay_without_delay_warning_is_warned_after_four_hours(world: Any) -> None:
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        return (Outcome.DELIVERED, "250 ok") if env.sender == "" else (
            Outcome.DEFERRED, "451 4.7.1 greylisted")

    config = DeliveryConfig(retry_schedule=(3600.0,), retry_jitter=0.0, delay_warning=None,
                            max_queue_lifetime=86400.0)
    w = world(config=config, remote_courier=FakeCourier(decide))
    w.runner.start()
    qid = queue_dsn(w.store, dsn_remote("bob@one.example", "DELAY"),
                    dsn_remote("carol@one.example", ""),
                    dsn_remote("dave@one.example", "SUCCESS,FAILURE"))
    w.clock.advance(0)
    for _ in range(3):
        w.clock.advance(3600)
    w.clock.advance(3599)
    assert w.remote.dsns() == []
    w.clock.advance(1)  # four hours: DSN_DELAY_AFTER
    w.clock.advance(0)
    [dsn] = w.remote.dsns()
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    # Only the recipient that asked: no delay_warning configured for the others.
    assert [b["Final-Recipient"] for b in dsn_recipients(dsn)] == ["rfc822;bob@one.example"]
    assert w.envelope(qid).delay_warned


def test_null_sender_gets_no_success_notice(world: Any) -> None:
    w = world()
    w.runner.start()
    queue_dsn(w.store, dsn_remote("bob@one.example", "SUCCESS"), sender="")
    w.clock.advance(0)
    w.clock.advance(0)
    # One call: the message itself (its sender is null too), no notice after it.
    assert [c.addresses for c in w.remote.calls] == [["bob@one.example"]]
    assert w.local.calls == []
    assert w.store.ids() == []


def test_next_hop_with_dsn_owns_the_success_notice(world: Any) -> None:
    class DSNHop(FakeCourier):
        def deliver(self, envelope, recipients, data_path):
            self.calls.append(Call(envelope.id, envelope.sender, [r.address for r in recipients],
                                   data_path.read_bytes()))
            return succeed([DeliveryResult(r, Outcome.DELIVERED, "250 ok", dsn_passed=True)
                            for r in recipients])

    w = world(remote_courier=DSNHop())
    w.runner.start()
    queue_dsn(w.store, dsn_remote("bob@one.example", "SUCCESS"))
    w.clock.advance(0)
    w.clock.advance(0)
    assert w.remote.dsns() == [] and w.local.calls == []
    assert w.store.ids() == []


@pytest.mark.parametrize("crash_at", range(1, 6))
def test_success_notice_survives_a_crash_at_any_point(tmp_path: Path, crash_at: int) -> None:
    """Queued, then marked: a crash in between repeats the notice, never loses it."""
    clock = Clock()
    clock.advance(T0)
    root = tmp_path / "queue"
    store1 = CrashingStore(root, fsync=False, clock=clock.seconds, reactor=clock, crash_at=0)
    remote1 = FakeCourier(alive=lambda: not store1.dead)
    w1 = Env(tmp_path, store=store1, clock=clock, remote_courier=remote1)
    w1.local.alive = lambda: not store1.dead
    qid = queue_dsn(store1, dsn_remote("bob@x.example", "SUCCESS"))
    store1.crash_at = store1.effects + crash_at
    w1.runner.start()
    for _ in range(5):
        clock.advance(0)
        clock.advance(60)
    w1.stop()
    disk = QueueStore(root, fsync=False)
    marked = qid not in disk.ids() or disk.load(qid).recipients[0].dsn_sent
    queued_before = {i for i in disk.ids() if i != qid} | {
        c.queue_id for c in remote1.calls if c.sender == ""}

    w2 = Env(tmp_path, store=QueueStore(root, fsync=False, clock=clock.seconds, reactor=clock), clock=clock)
    w2.runner.start()
    w2.run_until_empty()
    w2.stop()
    notices = {c.queue_id for c in remote1.calls + w2.remote.calls if c.sender == ""}
    assert notices, "the success notice was lost"
    assert len(notices) == 1 or (len(notices) == 2 and len(queued_before) == 1 and not marked)
    assert remote1.delivered_to("bob@x.example") + w2.remote.delivered_to("bob@x.example") >= 1
    for dsn in remote1.dsns() + w2.remote.dsns():
        [block] = dsn_recipients(dsn)
        assert (block["Action"], block["Final-Recipient"]) == ("relayed", "rfc822;bob@x.example")


def test_bounce_is_heard_on_a_later_turn_never_inside_the_pass(world: Any) -> None:
    def decide(env: Envelope, r: Recipient) -> tuple[Outcome, str]:
        return (Outcome.DELIVERED, "250 ok") if env.sender == "" else (
            Outcome.FAILED, "550 5.1.1 no such user")

    w = world(remote_courier=FakeCourier(decide))
    heard: list[tuple[str, bool, bool, int]] = []  # (dsn_for, queued, a pass on the stack, in flight)

    def listener(env: Envelope) -> None:
        in_pass = any(frame.name == "_pass" for frame in traceback.extract_stack())
        heard.append((env.extra.get("dsn_for", ""), w.store.exists(env.id), in_pass,
                      w.runner.in_flight))

    w.store.subscribe(listener)
    w.runner.start()
    qid = queue(w.store, remote("nobody@one.example"))
    # The pass failed the recipient, queued the bounce and removed the message;
    # only the message's own commit has been told so far.
    assert w.store.ids() != [] and qid not in w.store.ids()
    assert heard == [("", True, False, 0)]
    w.clock.advance(0)
    assert heard[1:] == [(qid, True, False, 0)]  # on a later turn, durable, no pass running
    assert [c.addresses for c in w.remote.calls if c.sender == ""] == [[SENDER]]
