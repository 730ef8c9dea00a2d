"""The queue runner: decides what is due, hands it to couriers, records every result.

One *pass* over a message loads its envelope from disk (the single source of
truth), fails what has outlived ``max_queue_lifetime``, sends the recipients
that are due to their couriers (grouped by :class:`Router`, each group waiting
for a destination slot and a global slot), and then:

1. after each courier's results, rewrites the envelope atomically and fsyncs
   it *before anything else happens*, so a crash never re-delivers a recipient
   recorded as delivered and never forgets one (a crash *during* a delivery
   means the delivery is repeated: at-least-once, as for every MTA);
2. queues one bounce (DSN) for all recipients that failed in this pass, then
   marks them ``dsn_sent`` and saves again.  The order is deliberate: a crash
   between the two gives a duplicate bounce on restart, never a lost one;
3. queues a delay warning once, if configured;
4. removes the message when every recipient is final and no bounce is owed,
   or sets a timer for the next retry.

Only one pass per message runs at a time; a trigger that arrives during a
pass (new commit, flush, timer) runs another pass right after it.

DSN (RFC 3461 §5.2, RFC 3464), only for a message whose client gave DSN
parameters (``Envelope.dsn``; mail without them takes none of these paths):

* a recipient whose NOTIFY has SUCCESS gets a success notice once delivered:
  ``Action: delivered`` for a local mailbox, a pipe or an LMTP server (final
  delivery on this host), ``relayed`` for a next hop without DSN; none when
  the next hop took the parameters (the courier says ``dsn_passed``), which
  then owns the notices.  The success notice is its own message, apart from
  a bounce in the same pass (subject and text say which it is);
* NOTIFY=NEVER, or a NOTIFY without FAILURE, settles the failure without a
  bounce (logged, ``dsn_sent`` set);
* a delay warning names the deferred recipients whose NOTIFY has DELAY, and
  those without NOTIFY when ``delivery.delay_warning`` is configured (as for
  all mail); it is due ``delay_warning`` after arrival, or, for NOTIFY=DELAY
  with no delay_warning configured, ``DSN_DELAY_AFTER`` (4 hours).

Every notice follows the bounce's order: queued durably, then marked
``dsn_sent`` and saved (a crash in between duplicates it, never loses it).

Expired recipients are recorded as failed with a reply starting ``4.4.7``
(RFC 3463 X.4.7, delivery time expired), and the bounce says
``Action: failed`` / ``Status: 4.4.7`` as Postfix does.  For the null sender
no bounce is ever built (RFC 5321 §4.5.5, RFC 3461 §6.2): its failures are
logged and marked ``dsn_sent`` (meaning "the bounce question is settled").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import DeliveryConfig
from mta.mail.address import AddressError, normalize_domain
from mta.queue.courier import Courier, DeliveryResult, Outcome
from mta.queue.destinations import DeadDestinations
from mta.queue.dsn import FailedRecipient, build_dsn, enhanced_status
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.intake import Intake
from mta.queue.store import QueueError, QueueStore

log = Logger()

# Timers and float sums may land a hair before next_attempt; treat that as due.
_DUE_SLACK = 1e-3

# NOTIFY=DELAY without delivery.delay_warning configured: warn after this long.
DSN_DELAY_AFTER = 4 * 3600.0

# Envelopes read per reactor turn when the queue is loaded at start: the first
# slice at once, the rest in the background so that the listeners answer meanwhile.
LOAD_SLICE = 200

# The recorded reply, and the bounce's Status, for ``mta queue bounce`` (RFC 3463 X.0.0).
ADMIN_BOUNCE_REPLY = "5.0.0 delivery cancelled by the mail administrator"


class MessageBusy(Exception):
    """A message cannot be changed by the administrator while a pass for it runs."""


# --- routing -------------------------------------------------------------------------


class NotHeld(ValueError):
    """``release`` of a message that is not in the hold queue."""


@dataclass(frozen=True)
class Route:
    """Recipients of one message that go to one courier in one ``deliver`` call.

    ``key`` names the destination; concurrency slots are counted per key.
    """

    key: str
    courier: Courier
    recipients: list[Recipient]


class _NoCourier:
    """Stands in when no courier is configured for a kind: keeps the mail queued."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        reply = f"451 4.3.5 no courier configured for {self.kind} recipients"
        return succeed([DeliveryResult(r, Outcome.DEFERRED, reply, status="4.3.5")
                        for r in recipients])


class Router:
    """Groups a message's due recipients by courier and destination.

    ``couriers`` maps ``"local"``, ``"pipe"`` and ``"remote"`` to couriers.
    Remote recipients are grouped by domain (one ``deliver`` call, and one
    destination key ``remote:<domain>``, per domain), or all together under
    ``remote:smarthost`` when ``smarthost`` is true.  Local recipients go
    together (key ``local``); each pipe recipient is its own call (key ``pipe``).
    """

    def __init__(self, couriers: Mapping[str, Courier], smarthost: bool = False) -> None:
        self.couriers = dict(couriers)
        self.smarthost = smarthost

    def _courier(self, kind: str) -> Courier:
        return self.couriers.get(kind) or _NoCourier(kind)

    def route(self, envelope: Envelope, recipients: Sequence[Recipient]) -> list[Route]:
        groups: dict[str, list[Recipient]] = {}
        routes: list[Route] = []
        for r in recipients:
            if r.kind is RecipientKind.PIPE:
                routes.append(Route("pipe", self._courier("pipe"), [r]))
            elif r.kind is RecipientKind.LOCAL:
                groups.setdefault("local", []).append(r)
            else:
                domain = r.address.rpartition("@")[2].lower()
                key = "remote:smarthost" if self.smarthost else f"remote:{domain}"
                groups.setdefault(key, []).append(r)
        for key, rcpts in groups.items():
            kind = "local" if key == "local" else "remote"
            routes.append(Route(key, self._courier(kind), rcpts))
        return routes


# --- small pure helpers -----------------------------------------------------------------


def retry_delay(attempts: int, schedule: Sequence[float], jitter: float,
                rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th attempt (1-based); the last value repeats.

    ``jitter`` is a fraction: the delay is scaled by a factor in [1 - jitter, 1 + jitter],
    so that messages deferred together do not all come back at the same instant.
    """
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    if jitter <= 0:
        return base
    return base * (1.0 + rng.uniform(-jitter, jitter))


def dsn_status(rcpt: Recipient) -> str:
    """The RFC 3463 status a bounce reports for a failed recipient."""
    status = enhanced_status(rcpt.last_reply, "5.0.0")
    return status if status[0] in "45" else "5.0.0"


def success_owed(r: Recipient) -> bool:
    """A delivered recipient whose NOTIFY asks for a success notice not yet sent."""
    return r.state is RecipientState.DELIVERED and not r.dsn_sent and "SUCCESS" in r.notify


def success_action(r: Recipient) -> str:
    """RFC 3461 §5.2.2/§5.2.3: ``relayed`` to a next hop, ``delivered`` on this host."""
    return "relayed" if r.kind is RecipientKind.REMOTE else "delivered"


def _age_text(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{int(seconds)} seconds"


def expired_reply(previous: str, age: float) -> str:
    text = f"4.4.7 message expired after {_age_text(age)} in the queue"
    return f"{text}; last reply: {previous}" if previous else text


# --- the runner ----------------------------------------------------------------------


class QueueRunner:
    """Schedules and records deliveries for every message in ``store``.

    ``router`` has ``route(envelope, recipients) -> list[Route]`` (see
    :class:`Router`).  ``is_local(domain)`` says whether a bounce to the
    sender is delivered locally (kind LOCAL, mailbox = sender) or remotely.
    """

    def __init__(self, store: QueueStore, router: Any, clock: IReactorTime,
                 config: DeliveryConfig, hostname: str, rng: random.Random | None = None,
                 is_local: Callable[[str], bool] = lambda domain: False,
                 stop_timeout: float = 30.0) -> None:
        self.store = store
        self.router = router
        self.clock = clock
        self.config = config
        self.hostname = hostname
        self.rng = rng if rng is not None else random.Random()
        self.is_local = is_local
        self.stop_timeout = stop_timeout
        self._global = DeferredSemaphore(config.max_connections)
        self._slots: dict[str, DeferredSemaphore] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._in_flight: dict[str, Deferred[None] | None] = {}
        self._again: set[str] = set()
        self._forced: set[str] = set()
        # Envelopes just committed, handed to their first pass without a re-read.
        self._fresh: dict[str, Envelope] = {}
        self._running = False
        self._subscribed = False
        # A worker process's runner (mta.daemon.worker): each of its messages
        # gets its first pass here, and one still queued after it is handed to
        # the main process (``hand_over(envelope)``), whose runner keeps the
        # retries, warnings and expiry; None: this runner keeps everything.
        self.hand_over: Callable[[Envelope], None] | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._stop_timer: IDelayedCall | None = None
        # Issue 17: the ids of the messages held (Envelope.hold): never delivered
        # until released (release()); counted by the metrics (held_count).
        self.held: set[str] = set()
        # Dead-destination feedback (mta.queue.destinations): the destinations
        # down, one timer each for the next probe, and per pass the recipients
        # suspended because their destination is down.
        self._dead = DeadDestinations(config.retry_schedule)
        self._dead_timers: dict[str, IDelayedCall] = {}
        self._suspended: dict[str, set[int]] = {}
        # Ids still to be read at start (None once the whole queue is scheduled).
        self._loading: list[str] | None = None
        self._loaded = 0
        self._load_timer: IDelayedCall | None = None

    # --- life cycle ---------------------------------------------------------------

    def start(self, recover: bool = True) -> None:
        """Recover the store and schedule every queued message per its envelope.
        ``recover=False`` (a worker process: the main process owns what is on
        disk): only the messages committed from now on.

        The first :data:`LOAD_SLICE` envelopes are read at once, the others
        ``LOAD_SLICE`` per reactor turn afterwards, so that a large queue does
        not hold the reactor (the listeners answer while it loads); the event
        ``queue_loaded`` says when every message is scheduled.  New mail and
        ``flush`` work meanwhile."""
        self._running = True
        if not self._subscribed:
            self.store.subscribe(self._on_commit)
            self._subscribed = True
        if not recover:
            return
        self._loading = self.store.recover()
        self._loaded = 0
        log.info("queue runner started with {count} queued messages", count=len(self._loading))
        self._load_slice()

    @property
    def loading(self) -> bool:
        """True while queued messages found at start are still being read."""
        return self._loading is not None

    def _load_slice(self) -> None:
        self._load_timer = None
        ids = self._loading
        if ids is None or not self._running:
            return
        now = self._now()
        start = self._loaded
        for queue_id in ids[start:start + LOAD_SLICE]:
            if queue_id in self._timers or queue_id in self._in_flight:
                continue  # committed or flushed meanwhile: scheduled already
            try:
                env = self.store.load(queue_id)
            except FileNotFoundError:
                continue  # removed meanwhile
            except (OSError, ValueError, KeyError) as e:
                log.error("cannot read envelope {id}: {err}", id=queue_id, err=e)
                continue
            if env.hold:
                self.held.add(env.id)
                continue
            self._schedule_envelope(env, now)
        self._loaded = start + LOAD_SLICE
        if self._loaded < len(ids):
            self._load_timer = self.clock.callLater(0, self._load_slice)
            return
        self._loading = None
        log.info("queue loaded: {count} queued messages scheduled ({held} held)",
                 count=len(ids) - len(self.held), held=len(self.held), event="queue_loaded")

    def adopt_unknown(self) -> int:
        """Schedule every queued message the runner was never told of: one that a
        worker process committed (and answered 250 for) but died before it could
        announce.  Returns how many (a message being announced just now is
        scheduled twice at worst: its passes never overlap)."""
        if not self._running or self._loading is not None:
            return 0  # the loader at start schedules them
        suspended = {qid for key in self._dead_timers if (dead := self._dead.get(key))
                     for qid in dead.parked}
        now = self._now()
        count = 0
        for env in self.store.envelopes():
            if env.id in suspended:
                continue
            if env.hold:
                self.held.add(env.id)
            elif env.id not in self._timers and env.id not in self._in_flight:
                self._schedule_envelope(env, now)
                count += 1
        if count:
            log.warn("{count} queued messages found that no process had announced; scheduled",
                     count=count)
        return count

    def _schedule_envelope(self, env: Envelope, now: float) -> None:
        wake = self._next_wake(env, now)
        warning = self._warning_due(env)
        if wake is None or self._bounce_owed(env) or (warning is not None and warning <= now):
            wake = now  # nothing left but removal, or a notice still owed
        self._schedule_at(env.id, wake)

    def stop(self) -> Deferred[None]:
        """Cancel timers, start nothing new, and wait (at most ``stop_timeout``) for
        the deliveries in flight to be recorded."""
        self._running = False
        self._fresh.clear()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for timer in (*self._dead_timers.values(), self._load_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._dead_timers.clear()
        self._load_timer = None
        if not self._in_flight:
            return self._close_couriers()
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self._stop_timer is None:
            self._stop_timer = self.clock.callLater(self.stop_timeout, self._stop_timed_out)
        d.addCallback(lambda _: self._close_couriers())
        return d

    def _close_couriers(self) -> Deferred[None]:
        """Let couriers that keep connections open (the remote one's cache) close them."""
        closing = [c.close() for c in getattr(self.router, "couriers", {}).values()
                   if callable(getattr(c, "close", None))]
        return DeferredList(closing).addCallback(lambda _: None)

    def flush(self, queue_id: str | None = None) -> int:
        """Make deferred recipients due now (all messages, or one); returns how many messages.

        Flushing all also forgets every destination known to be down (as
        Postfix's ``postqueue -f``): the next attempts find out afresh."""
        if queue_id is None:
            self._dead.reset()
            for timer in self._dead_timers.values():
                if timer.active():
                    timer.cancel()
            self._dead_timers.clear()
        ids = [queue_id] if queue_id is not None else self.store.ids()
        count = 0
        for qid in ids:
            if not self.store.exists(qid):
                continue
            self._forced.add(qid)
            self._schedule_at(qid, self._now())
            count += 1
        return count

    @property
    def in_flight(self) -> int:
        """Messages with a pass running (for metrics and tests)."""
        return len(self._in_flight)

    # --- administration (``mta queue delete|bounce`` via the control channel) ------------

    def busy(self, queue_id: str) -> bool:
        """True while a pass for ``queue_id`` runs (delivering, or waiting for a slot)."""
        return queue_id in self._in_flight

    def delete(self, queue_id: str) -> None:
        """Remove a message without delivering or bouncing it, and forget its timer.

        MessageBusy while a pass for it runs (the pass would write its results
        back into the deleted envelope); FileNotFoundError if it is not queued.
        """
        self._refuse_busy(queue_id)
        if not self.store.exists(queue_id):
            raise FileNotFoundError(f"no message {queue_id} in the queue")
        self._forget(queue_id)
        self.store.remove(queue_id)
        self.held.discard(queue_id)
        log.info("message {queue_id} deleted by the administrator", queue_id=queue_id,
                 event="deleted")

    @property
    def held_count(self) -> int:
        """Messages in the hold queue (for the metrics)."""
        return len(self.held)

    def release(self, queue_id: str) -> None:
        """Take a held message out of the hold queue and deliver it now.

        The envelope is saved without its hold first (atomically, as every
        envelope change), then the message is scheduled at once.  NotHeld if it
        is not held, FileNotFoundError if it is not queued.  Its queue lifetime
        (delivery.max_queue_lifetime) still counts from its arrival.
        """
        self._refuse_busy(queue_id)
        env = self.store.load(queue_id)
        if not env.hold:
            raise NotHeld(f"message {queue_id} is not held")
        reason, env.hold = env.hold, ""
        self.store.save(env)
        self.held.discard(queue_id)
        log.info("message {queue_id} released from the hold queue (held for: {reason})",
                 queue_id=queue_id, reason=reason, event="released")
        self._schedule_at(queue_id, self._now())

    def bounce(self, queue_id: str, reason: str = ADMIN_BOUNCE_REPLY) -> Deferred[int]:
        """Fail every recipient not yet final with ``reason`` and bounce them now.

        The failures are saved at once; the bounce (DSN) is queued (a group
        commit) and the message removed when nothing is left, and then the
        Deferred fires with how many recipients were failed.  Until then the
        message counts as in a pass (:meth:`busy`; a trigger meanwhile runs a
        pass after it).  Raises MessageBusy while a pass for it runs,
        FileNotFoundError if it is not queued.
        """
        self._refuse_busy(queue_id)
        env = self.store.load(queue_id)
        now = self._now()
        failed = [r for r in env.recipients if not r.state.final]
        for r in failed:
            r.state, r.last_reply, r.next_attempt, r.updated = RecipientState.FAILED, reason, 0.0, now
            log.info("message {queue_id} to {recipient} failed by the administrator",
                     queue_id=queue_id, recipient=r.original, event="admin_bounce")
        self.store.save(env)
        self._in_flight[queue_id] = None  # as for a pass (see _kick)
        d = Deferred.fromCoroutine(self._bounce_now(env, now))
        self._in_flight[queue_id] = d
        d.addBoth(self._pass_done, queue_id)
        return d.addCallback(lambda _: len(failed))

    async def _bounce_now(self, env: Envelope, now: float) -> None:
        await self._send_bounce(env, self.store.data_path(env.id))
        if self._finished(env):
            self._forget(env.id)
            self.store.remove(env.id)
        else:  # the bounce could not be queued: a later pass tries again
            wake = self._next_wake(env, now)
            if wake is not None:
                self._schedule_at(env.id, wake)

    def _refuse_busy(self, queue_id: str) -> None:
        # An administrator is about to change the message on disk: from now on
        # its passes read the file, never the object kept from the commit.
        self._fresh.pop(queue_id, None)
        if queue_id in self._in_flight:
            raise MessageBusy(f"message {queue_id} is being delivered right now; "
                              "try again when this attempt has ended")

    def _forget(self, queue_id: str) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._forced.discard(queue_id)
        self._again.discard(queue_id)
        self.held.discard(queue_id)
        self._dead.forget(queue_id)

    # --- scheduling ---------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.seconds()

    def committed(self, envelope: Envelope) -> None:
        """Another process (a worker) committed this message, and says what its
        envelope is: deliver it as one of ours, without reading it back."""
        self._on_commit(envelope)

    def _on_commit(self, envelope: Envelope) -> None:
        # A new message: try it at once.  The store tells us on the reactor turn
        # after the commit became durable (for the SMTP server: after its 250
        # has gone out), never from inside one of our passes, so a notice the
        # runner queued itself is not nested in the pass that queued it.
        if not self._running or envelope.id in self._in_flight:
            return  # a pass has it already (start() found it on disk): the file is newer
        if envelope.hold:  # quarantined: kept, not delivered (release() brings it back)
            if self.hand_over is not None:
                # A worker's: the main process keeps the hold queue (its
                # metrics, ``mta queue release``), as for any message left queued.
                self.hand_over(envelope)
                return
            self.held.add(envelope.id)
            return
        if envelope.id in self._timers:
            self._schedule_at(envelope.id, self._now())  # known from disk: read it from there
            return
        # The committed object is exactly what is on disk: the first pass uses
        # it instead of reading the file back.
        self._fresh[envelope.id] = envelope
        self._kick(envelope.id)

    def _schedule_at(self, queue_id: str, when: float) -> None:
        """Make sure a pass for ``queue_id`` runs no later than ``when``."""
        if not self._running:
            return
        now = self._now()
        delay = max(0.0, when - now)
        timer = self._timers.get(queue_id)
        if timer is not None and timer.active():
            if timer.getTime() <= now + delay:
                return
            timer.cancel()
        self._timers[queue_id] = self.clock.callLater(delay, self._kick, queue_id)

    def _kick(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        if not self._running:
            return
        if queue_id in self._in_flight:
            self._again.add(queue_id)
            return
        self._in_flight[queue_id] = None  # before the coroutine runs: it may finish at once
        d = Deferred.fromCoroutine(self._pass(queue_id))
        self._in_flight[queue_id] = d
        d.addBoth(self._pass_done, queue_id)

    def _pass_done(self, result: object, queue_id: str) -> None:
        if isinstance(result, Failure):
            log.failure("queue pass for {queue_id} failed", result, queue_id=queue_id)
        self._in_flight.pop(queue_id, None)
        self._suspended.pop(queue_id, None)
        if self._dead_timers:
            self._probe_unresolved(queue_id)
        if queue_id in self._again:
            self._again.discard(queue_id)
            self._schedule_at(queue_id, self._now())
        if not self._in_flight and self._stop_waiters:
            self._fire_stop_waiters()

    def _stop_timed_out(self) -> None:
        self._stop_timer = None
        log.warn("queue runner stopped with {n} messages still in delivery",
                 n=len(self._in_flight))
        self._fire_stop_waiters()

    def _fire_stop_waiters(self) -> None:
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    def _expiry(self, env: Envelope) -> float:
        return env.created + self.config.max_queue_lifetime

    def _warning_due(self, env: Envelope) -> float | None:
        """When a delay warning is owed for ``env``, or None."""
        if env.dsn:
            return self._dsn_warning_due(env)
        if (self.config.delay_warning is None or env.delay_warned or env.sender == ""
                or not any(r.state is RecipientState.DEFERRED for r in env.recipients)):
            return None
        return env.created + self.config.delay_warning

    def _wants_delay_notice(self, r: Recipient) -> bool:
        """RFC 3461 §4.1: NOTIFY with DELAY asks for one, any other NOTIFY declines;
        without NOTIFY the configured delay_warning decides, as for all mail."""
        return "DELAY" in r.notify if r.notify else self.config.delay_warning is not None

    def _dsn_warning_due(self, env: Envelope) -> float | None:
        if env.delay_warned or env.sender == "" or not any(
                r.state is RecipientState.DEFERRED and self._wants_delay_notice(r)
                for r in env.recipients):
            return None
        after = self.config.delay_warning
        return env.created + (DSN_DELAY_AFTER if after is None else after)

    def _next_wake(self, env: Envelope, now: float, suspended: set[int] | None = None
                   ) -> float | None:
        """When the next pass for ``env`` is needed; None when nothing is left to do.
        ``suspended``: ids of recipients whose destination is down (they wait for
        its probe, not for a timer of their own)."""
        times = [r.next_attempt for r in env.recipients
                 if not r.state.final and (suspended is None or id(r) not in suspended)]
        retry_later = now + self.config.retry_schedule[0]
        if self._bounce_owed(env):
            times.append(retry_later)  # queueing the bounce failed: try again later
        warning = self._warning_due(env)
        if warning is not None:
            times.append(warning if warning > now else retry_later)
        return min(times) if times else None

    @staticmethod
    def _bounce_owed(env: Envelope) -> bool:
        """A bounce, or (DSN) a success notice, is still to be queued."""
        return any(r.state is RecipientState.FAILED and not r.dsn_sent for r in env.recipients) or (
            env.dsn and any(success_owed(r) for r in env.recipients))

    def _finished(self, env: Envelope) -> bool:
        return all(r.state.final for r in env.recipients) and not self._bounce_owed(env)

    # --- one pass over one message ------------------------------------------------------

    async def _pass(self, queue_id: str) -> None:
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        try:
            env = self._fresh.pop(queue_id, None) or self.store.load(queue_id)
        except FileNotFoundError:
            return  # removed meanwhile
        except (OSError, ValueError, KeyError) as e:
            log.error("cannot read envelope {queue_id}: {err}", queue_id=queue_id, err=e)
            return
        if env.hold:  # held (a flush, or a timer from before the hold): not delivered
            self.held.add(queue_id)
            return
        data_path = self.store.data_path(queue_id)
        try:
            self._expire(env, self._now())
            now = self._now()
            due = [r for r in env.recipients
                   if not r.state.final and (forced or r.next_attempt <= now + _DUE_SLACK)]
            if due and self._running:
                await self._deliver(env, due, data_path)
            await self._send_bounce(env, data_path)
            if env.dsn:
                await self._send_success_notice(env, data_path)
            await self._send_delay_warning(env, data_path)
        except Exception:
            # Typically the envelope could not be saved (disk full): the state on
            # disk is the last good one; try the whole pass again later.
            log.failure("queue pass for {queue_id} stopped; retrying later", queue_id=queue_id)
            self._schedule_at(queue_id, self._now() + self.config.retry_schedule[0])
            return
        if self._finished(env):
            # Removing the files is the durable record that every recipient is done.
            try:
                await self.store.remove_async(queue_id)
            except Exception:
                log.failure("cannot remove finished message {queue_id}; saving its state",
                            queue_id=queue_id)
                await self.store.save_async(env)
                return
            log.info("message {queue_id} done and removed from the queue", queue_id=queue_id,
                     event="removed")
            return
        if self.hand_over is not None:
            if self._suspended.pop(queue_id, None) is not None:
                self._dead.forget(queue_id)  # the main process's runner keeps it from now on
            self.hand_over(env)  # saved by the pass: on disk as it is here
            return
        wake = self._next_wake(env, self._now(), self._suspended.pop(queue_id, None))
        if wake is not None:
            self._schedule_at(queue_id, wake)

    def _expire(self, env: Envelope, now: float) -> None:
        if now < self._expiry(env):
            return
        expired = [r for r in env.recipients if not r.state.final]
        for r in expired:
            self._mark_expired(env, r, now)
        if expired:
            self.store.save(env)

    def _mark_expired(self, env: Envelope, r: Recipient, now: float) -> None:
        r.state = RecipientState.FAILED
        r.last_reply = expired_reply(r.last_reply, now - env.created)
        r.next_attempt = 0.0
        r.updated = now
        log.info("message {queue_id} to {recipient} expired: {reply}", queue_id=env.id,
                 recipient=r.original, reply=r.last_reply, event="expired")

    async def _deliver(self, env: Envelope, due: list[Recipient], data_path: Path) -> None:
        routes = self.router.route(env, due)
        if len(routes) == 1:  # most mail: one route, awaited here without a DeferredList
            await self._deliver_route(env, routes[0], data_path)
            return
        attempts = [Deferred.fromCoroutine(self._deliver_route(env, route, data_path))
                    for route in routes]
        outcomes = await DeferredList(attempts, consumeErrors=True)
        for ok, value in outcomes:
            if not ok:
                value.raiseException()

    def _slot(self, key: str) -> DeferredSemaphore:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = DeferredSemaphore(self.config.max_connections_per_destination)
        return slot

    def _release_slot(self, key: str, slot: DeferredSemaphore) -> None:
        slot.release()
        if slot.tokens == slot.limit and not slot.waiting and self._slots.get(key) is slot:
            del self._slots[key]  # idle: keep the table as small as the traffic

    async def _deliver_route(self, env: Envelope, route: Route, data_path: Path) -> None:
        # The destination slot first: work for a busy destination waits without
        # holding one of the global slots other destinations could use.
        if self._dead_timers and not self._dead.admit(route.key, env.id):
            self._suspend(env, route)
            return
        slot = self._slot(route.key)
        try:
            await slot.acquire()
        except CancelledError:  # the destination went down meanwhile (_destination_down)
            if not self._dead.admit(route.key, env.id):
                self._suspend(env, route)
                return
            raise
        try:
            await self._global.acquire()
            try:
                if self._dead_timers and not self._dead.admit(route.key, env.id):
                    self._suspend(env, route)  # went down while this one waited
                elif self._running:
                    await self._attempt(env, route, data_path)
            finally:
                self._global.release()
        finally:
            self._release_slot(route.key, slot)

    async def _attempt(self, env: Envelope, route: Route, data_path: Path) -> None:
        start = self._now()
        if not env.first_attempt:
            env.first_attempt = start
        for r in route.recipients:
            r.attempts += 1
        try:
            results = await route.courier.deliver(env, list(route.recipients), data_path)
        except Exception:  # a courier must not errback; if one does, nothing is lost
            log.failure("courier for {key} raised", key=route.key)
            results = []
        if results and results[0].destination_down:
            self._destination_down(route.key, results[0].reply, env.id)
        elif route.key in self._dead_timers:
            self._destination_up(route.key)
        await self._record(env, route, results, start)

    # --- dead destinations (mta.queue.destinations) -----------------------------------

    def _suspend(self, env: Envelope, route: Route) -> None:
        """Defer ``route`` without an attempt and without rewriting the envelope:
        the message waits, as an id, for the destination's probe."""
        suspended = self._suspended.setdefault(env.id, set())
        suspended.update(id(r) for r in route.recipients)
        self._dead.park(route.key, env.id, self._expiry(env))
        reply = self._dead.suspended_reply(route.key)
        for r in route.recipients:
            log.info("delivery {queue_id} to {recipient} via {destination}: {outcome} "
                     "in {duration:.3f}s: {reply}", event="delivery", queue_id=env.id,
                     recipient=r.original, destination=route.key, outcome="deferred",
                     state=str(r.state), reply=reply, attempt=r.attempts, duration=0.0,
                     remote_mta="", tls="", age=self._now() - env.created)

    def _destination_down(self, key: str, reason: str, queue_id: str) -> None:
        until = self._dead.failed(key, reason, self._now(), queue_id)
        if until is None:
            return
        dead = self._dead.get(key)
        log.warn("destination {destination} is down ({reason}); its deliveries are suspended "
                 "for {delay:.0f}s, then one message probes", event="destination_down",
                 destination=key, reason=reason, delay=until - self._now(),
                 probes=dead.probes if dead else 0)
        old = self._dead_timers.get(key)
        if old is not None and old.active():
            old.cancel()
        self._dead_timers[key] = self.clock.callLater(max(0.0, until - self._now()),
                                                      self._probe, key)
        # The passes waiting for one of its slots are suspended now, each in turn
        # (not in a chain of slot releases, one inside the other).
        slot = self._slots.get(key)
        if slot is not None:
            for waiter in list(slot.waiting):
                waiter.cancel()

    def _destination_up(self, key: str) -> None:
        timer = self._dead_timers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        ids = self._dead.up(key)
        log.info("destination {destination} is up again; {count} suspended messages released",
                 event="destination_up", destination=key, count=len(ids))
        now = self._now()
        for queue_id in ids:
            self._schedule_at(queue_id, now)

    def _probe(self, key: str) -> None:
        """The wait for ``key`` is over: messages past their own deadline get their
        pass, and one suspended message is let through to try the destination."""
        self._dead_timers.pop(key, None)
        now = self._now()
        for queue_id in self._dead.due(key, now):
            self._schedule_at(queue_id, now)
        probe = self._dead.take_probe(key)
        if probe is None:
            return  # nothing waits: the next message for it finds out
        self._dead_timers[key] = self.clock.callLater(
            self.config.retry_schedule[-1], self._probe, key)  # if the probe never ends
        log.info("destination {destination}: message {queue_id} probes it",
                 event="destination_probe", destination=key, queue_id=probe)
        self._schedule_at(probe, now)

    def _probe_unresolved(self, queue_id: str) -> None:
        """A probe's pass ended without trying its destination (expired, deleted):
        let another suspended message probe at once."""
        for key in list(self._dead_timers):
            dead = self._dead.get(key)
            if dead is not None and dead.probe == queue_id:
                dead.probe = None
                timer = self._dead_timers.pop(key)
                if timer.active():
                    timer.cancel()
                self._dead_timers[key] = self.clock.callLater(0, self._probe, key)

    async def _record(self, env: Envelope, route: Route, results: list[DeliveryResult],
                      start: float) -> None:
        """Apply one courier call's results and make them durable before anything else.

        When every recipient is now final and no bounce is owed, the pass removes
        the message next, and that removal is the durable record: the envelope
        is not rewritten just to be deleted (the window between a server's 250
        and our durable record is one group commit either way)."""
        now = self._now()
        by_identity = {id(res.recipient): res for res in results}
        by_address = {(res.recipient.address, res.recipient.original): res for res in results}
        applied: list[tuple[Recipient, DeliveryResult, str]] = []
        for r in route.recipients:
            res = by_identity.get(id(r)) or by_address.get((r.address, r.original))
            if res is None:
                res = DeliveryResult(r, Outcome.DEFERRED, "451 4.3.0 courier gave no result",
                                     status="4.3.0")
            applied.append((r, res, self._apply(env, r, res, now)))
        if not self._finished(env):  # finished: this was the last route; the pass removes it
            await self.store.save_async(env)
        for r, res, reply in applied:
            log.info("delivery {queue_id} to {recipient} via {destination}: {outcome} "
                     "in {duration:.3f}s: {reply}", event="delivery", queue_id=env.id,
                     recipient=r.original, destination=route.key, outcome=str(res.outcome),
                     state=str(r.state), reply=reply, attempt=r.attempts,
                     duration=now - start, remote_mta=r.remote_mta, tls=res.tls,
                     tls_verified=res.tls_verified, age=now - env.created)

    def _apply(self, env: Envelope, r: Recipient, res: DeliveryResult, now: float) -> str:
        reply = res.reply.strip()
        if res.status and not enhanced_status(reply):
            # Keep the courier's status with the reply so a later bounce (even
            # after a restart) can report it.
            reply = f"{res.status} {reply}"
        r.last_reply = reply
        r.updated = now
        if res.remote_mta:
            r.remote_mta = res.remote_mta
        if res.outcome is Outcome.DELIVERED:
            r.state, r.next_attempt = RecipientState.DELIVERED, 0.0
            if res.dsn_passed:  # the next hop took NOTIFY: its notices, not ours
                r.dsn_sent = True
        elif res.outcome is Outcome.FAILED:
            r.state, r.next_attempt = RecipientState.FAILED, 0.0
        elif now >= self._expiry(env):
            self._mark_expired(env, r, now)
        else:
            delay = retry_delay(r.attempts, self.config.retry_schedule,
                                self.config.retry_jitter, self.rng)
            r.state = RecipientState.DEFERRED
            # Never later than the expiry, so the message expires on time.
            r.next_attempt = min(now + delay, self._expiry(env))
        return reply

    # --- bounces and warnings ------------------------------------------------------------

    async def _send_bounce(self, env: Envelope, data_path: Path) -> None:
        owed = [r for r in env.recipients if r.state is RecipientState.FAILED and not r.dsn_sent]
        if not owed:
            return
        if env.sender == "":
            for r in owed:
                log.warn("message {queue_id} to {recipient} failed ({reply}); the sender is "
                         "null, so no bounce is sent", queue_id=env.id, recipient=r.original,
                         reply=r.last_reply, event="bounce_dropped")
                r.dsn_sent = True
            self.store.save(env)
            return
        if env.dsn:
            owed = self._drop_unwanted_bounces(env, owed)
            if not owed:
                return
        items: list[FailedRecipient] = [(r, dsn_status(r), r.last_reply, r.remote_mta)
                                        for r in owed]
        if not await self._enqueue_dsn(env, items, data_path, "failed"):
            return  # still owed: the next pass tries again
        # The DSN is durable before it is recorded as sent: a crash in between
        # gives a duplicate bounce, never a lost one.
        for r in owed:
            r.dsn_sent = True
        self.store.save(env)

    def _drop_unwanted_bounces(self, env: Envelope, owed: list[Recipient]) -> list[Recipient]:
        """RFC 3461 §4.1: no failure notice for a NOTIFY that is NEVER or lacks FAILURE.
        Those are settled (``dsn_sent``) and saved; the rest are returned."""
        wanted = [r for r in owed if not r.notify or "FAILURE" in r.notify]
        if len(wanted) == len(owed):
            return owed
        for r in owed:
            if r.notify and "FAILURE" not in r.notify:
                log.info("message {queue_id} to {recipient} failed ({reply}); its NOTIFY={notify} "
                         "asks for no bounce", queue_id=env.id, recipient=r.original,
                         reply=r.last_reply, notify=r.notify, event="bounce_not_requested")
                r.dsn_sent = True
        self.store.save(env)
        return wanted

    async def _send_success_notice(self, env: Envelope, data_path: Path) -> None:
        """RFC 3461 §5.2.2, §5.2.3: one success notice for the recipients that asked
        and were delivered here or relayed to a next hop without DSN."""
        owed = [r for r in env.recipients if success_owed(r)]
        if not owed:
            return
        if env.sender != "":
            items: list[FailedRecipient] = []
            for r in owed:
                status = enhanced_status(r.last_reply, "2.0.0")
                items.append((r, status if status[0] == "2" else "2.0.0", r.last_reply,
                              r.remote_mta))
            actions = [success_action(r) for r in owed]
            if not await self._enqueue_dsn(env, items, data_path, actions[0], actions=actions):
                return  # still owed: the next pass tries again
        else:  # never a notice to the null sender (RFC 5321 §4.5.5): settled without one
            log.info("message {queue_id} delivered to {recipients}; the sender is null, so no "
                     "success notice is sent", queue_id=env.id, event="dsn_dropped",
                     recipients=", ".join(r.original for r in owed))
        for r in owed:
            r.dsn_sent = True
        self.store.save(env)

    async def _send_delay_warning(self, env: Envelope, data_path: Path) -> None:
        due = self._warning_due(env)
        if due is None or self._now() < due:
            return
        waiting = [r for r in env.recipients if r.state is RecipientState.DEFERRED]
        if env.dsn:
            waiting = [r for r in waiting if self._wants_delay_notice(r)]
        items: list[FailedRecipient] = []
        for r in waiting:
            status = enhanced_status(r.last_reply, "4.0.0")
            items.append((r, status if status[0] == "4" else "4.0.0", r.last_reply, r.remote_mta))
        if await self._enqueue_dsn(env, items, data_path, "delayed",
                                   retry_until=self._expiry(env)):
            env.delay_warned = True
            self.store.save(env)

    def _bounce_recipient(self, sender: str) -> Recipient:
        local, _, domain = sender.rpartition("@")
        try:
            domain = normalize_domain(domain)
        except AddressError:
            domain = domain.lower()
        if self.is_local(domain):
            mailbox = f"{local}@{domain}"
            return Recipient(address=mailbox, kind=RecipientKind.LOCAL, original=sender,
                             mailbox=mailbox)
        return Recipient(address=sender, kind=RecipientKind.REMOTE, original=sender)

    async def _enqueue_dsn(self, env: Envelope, items: list[FailedRecipient], data_path: Path,
                           action: str, retry_until: float | None = None,
                           actions: list[str] | None = None) -> bool:
        """Queue one notice about ``env`` (an :class:`~mta.queue.intake.Intake` from
        the null sender, RFC 5321 §4.5.5, committed by the group commit); True
        once it is durable, False (logged) if it could not be queued.  Its first
        pass starts when the store tells us, on a later reactor turn."""
        now = self._now()
        txn = Intake(self.store, sender="")
        try:
            data = build_dsn(env, items, self.hostname, data_path, action, now,
                             retry_until=retry_until, actions=actions,
                             from_address=self.config.bounce_from)
            bounce_to = self._bounce_recipient(env.sender)
            txn.add_recipient(bounce_to.original, [bounce_to])
            txn.open(buffered=True)  # in memory already: one file, into a spare if there is one
            txn.write(data)
            dsn_env = txn.envelope(created=now, smtputf8=not env.sender.isascii(),
                                   body_8bit=not data.isascii(), extra={"dsn_for": env.id})
            await txn.commit(dsn_env)
        except BaseException as e:
            txn.abort()
            if not isinstance(e, (OSError, QueueError)):
                raise
            log.error("could not queue the {action} notice for {queue_id}: {err}",
                      action=action, queue_id=env.id, err=e)
            return False
        log.info("queued {action} notice {dsn_id} for {queue_id} to <{sender}> about "
                 "{recipients}", event="dsn", action=action, dsn_id=txn.id,
                 queue_id=env.id, sender=env.sender,
                 recipients=", ".join(r.original for r, *_ in items))
        return True
