"""The staged check pipeline the SMTP session asks at each stage.

:class:`Pipeline` runs the checks configured for a stage (``[checks] order``,
:class:`mta.config.ChecksConfig`) one after the other:

* the first verdict that is not an acceptance wins and the rest of the stage
  is not run; the headers, Authentication-Results entries, targets, facts and
  envelope annotations of the checks that accepted before it accumulate, in
  order, into the one verdict returned;
* a rewrite of the header lines (``Verdict.header_lines``, HEADERS) is handed
  to the next check of the stage through ``state.header_lines``, the one
  field of the state the pipeline writes;
* when every check answers synchronously the result is a plain
  :class:`~mta.mail.checks.Verdict` (no Deferred, no timer: the fast path of
  a plain message); only a check that returns a Deferred makes the result a
  Deferred, and only that check is timed (``timeout``, on the injected clock);
* an exception, a failed Deferred or a timeout is the check's failure: one log
  event (event ``check``, ``result`` ``error`` or ``timeout``), then its
  ``on_error`` action: ``tempfail`` (451 4.3.0; 421 4.3.0 and close at
  CONNECT) or ``accept``.  Never a traceback to the client;
* every verdict of every check is counted by check and result
  (:meth:`Pipeline.verdict_counts`, read by the metrics at scrape time:
  ``mta_check_verdicts_total``); a verdict that is not a plain acceptance
  (``reject``, ``tempfail``, ``disconnect``, ``quarantine``) is also one log
  event (event ``check``, with ``check``, ``stage``, ``result``, ``reason``,
  ``code``, ``enhanced``, ``ip``), unless the check logged it itself
  (``quiet``).  An acceptance is only counted (one dictionary increment, no
  event: it is the hot path of every message).

Not every check has something to say about every client (SPF not for a
trusted or authenticated one, the submission fixes only for an authenticated
one): a check may say so with ``applies`` (:class:`~mta.mail.checks.Check`),
and :meth:`Pipeline.plan` gives a session, for its class of client
(:class:`~mta.mail.checks.Client`), each stage's checks that apply, made
once per class and kept.  The session asks again when its class changes
(AUTH, STARTTLS) and runs only those; a stage left without a check answers
the shared ACCEPT at once.

HEADERS runs inside the DATA reader, as the header section completes, so its
checks must answer synchronously (:meth:`Pipeline.run_now`): a Deferred
there is a failure.

:func:`build_pipeline` makes the pipeline from the configuration: the built-in
checks of :data:`mta.policy.checks.BUILTIN` by name, others from their
``factory`` ("package.module:name", called with the server context).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import CheckSettings, Config, ConfigError
from mta.mail import replies as R
from mta.mail.checks import ACCEPT, EMPTY, Action, Check, CheckState, Client, Stage, Verdict

log = Logger()

# What a failed check with on_error = "accept" answers: an acceptance, but not
# the shared ACCEPT, so that it is not counted a second time (as "accept" after
# its "error" or "timeout").
_FAILED_ACCEPT = Verdict()
# What a failed check with on_error = "tempfail" answers, by (at CONNECT, timed out):
# made once, so that they are told from a check's own verdicts (counted and logged
# once, by _failed, not again as "tempfail").
_FAILURES = {
    (connect, timed_out): Verdict(Action.DISCONNECT if connect else Action.TEMPFAIL,
                                  R.CHECK_FAILED_CONNECT if connect else R.CHECK_FAILED,
                                  reason=f"check_{'timeout' if timed_out else 'error'}")
    for connect in (False, True) for timed_out in (False, True)}


def merge(acc: Verdict, v: Verdict) -> Verdict:
    """``v`` with what the accepting verdicts before it (``acc``) added."""
    if acc is ACCEPT:
        return v
    if v is ACCEPT:
        return acc
    return Verdict(
        v.action, v.reply,
        headers=acc.headers + v.headers,
        auth_results=acc.auth_results + v.auth_results,
        header_lines=v.header_lines if v.header_lines is not None else acc.header_lines,
        targets=acc.targets + v.targets,
        facts={**(acc.facts or EMPTY), **v.facts} if v.facts else acc.facts,
        envelope={**(acc.envelope or EMPTY), **v.envelope} if v.envelope else acc.envelope,
        reason=v.reason, quiet=v.quiet,
        quarantine=acc.quarantine or v.quarantine,
        edits=v.edits if v.edits is not None else acc.edits, discard=acc.discard or v.discard,
    )


# A session's checks: each stage's, in order, those that apply to its client.
Plan = Mapping[Stage, tuple[Check, ...]]


class Pipeline:
    """The checks of each stage, in order, with their settings."""

    def __init__(self, checks: Sequence[tuple[Check, CheckSettings]], clock: Any,
                 counts: Mapping[tuple[str, str], int] | None = None) -> None:
        self.clock = clock
        # Verdicts by (check, result): acceptances by id(check) (the hot path: one
        # increment), the rest by name; ``counts`` carries a previous pipeline's
        # totals over a reload.
        self._accepts: dict[int, int] = {id(c): 0 for c, _ in checks}
        self._names: dict[int, str] = {id(c): c.name for c, _ in checks}
        self._counts: dict[tuple[str, str], int] = dict(counts or {})
        self._stages: dict[Stage, tuple[Check, ...]] = {
            stage: tuple(c for c, _ in checks if stage in c.stages) for stage in Stage}
        # Looked up only when a check fails or waits (by id: a check need not be hashable).
        self._settings: dict[int, CheckSettings] = {id(c): s for c, s in checks}
        # Each class of client's plan, made when first asked for; bounded: the
        # keys are (trusted, authenticated, listener kind, listener name), at most
        # 2 x 2 x the configured listeners.
        self._plans: dict[tuple[bool, bool, str, str], Plan] = {}
        # The checks that keep per-session state (a milter's connection) and want
        # to hear when the session ends: those with a close(state) method.
        self._closing = tuple(c for c, _ in checks if callable(getattr(c, "close", None)))

    def close(self, state: CheckState) -> None:
        """The session has ended: the checks that keep per-session state end it
        (``check.close(state)``; state.check_data is None when none kept any)."""
        if getattr(state, "check_data", None) is None:
            return
        for check in self._closing:
            try:
                check.close(state)
            except Exception:
                log.failure("check {check}: close() failed", check=check.name, event="check",
                            result="error")

    def names(self, stage: Stage, plan: Plan | None = None) -> list[str]:
        return [c.name for c in (self._stages if plan is None else plan)[stage]]

    def plan(self, trusted: bool, authenticated: bool, listener_kind: str, listener: str = "") -> Plan:
        """Each stage's checks that apply to this class of client (:class:`Client`),
        in the configured order; one dictionary lookup but the first time."""
        key = (trusted, authenticated, listener_kind, listener)
        plan = self._plans.get(key)
        if plan is None:
            client = Client(trusted, authenticated, listener_kind, listener)
            plan = self._plans[key] = {
                stage: tuple(c for c in checks if self._applies(c, client))
                for stage, checks in self._stages.items()}
        return plan

    @staticmethod
    def _applies(check: Check, client: Client) -> bool:
        applies = getattr(check, "applies", None)
        if applies is None:
            return True
        try:
            return bool(applies(client))
        except Exception:
            # A bug in applies() must not take a check away: it then runs, and decides.
            log.failure("check {check}: applies() failed for {client}; it runs for them",
                        check=check.name, client=client, event="check", result="error")
            return True

    def run(self, stage: Stage, state: CheckState, checks: tuple[Check, ...] | None = None,
            now: bool = False, start: int = 0, acc: Verdict = ACCEPT) -> Any:
        """The verdict of ``stage``: a Verdict, or a Deferred (firing with one) only
        when a check needed I/O.  ``checks``: the session's checks of the stage
        (its :meth:`plan`'s), all of the stage's when None; none: the shared
        ACCEPT at once.  ``now``: the stage cannot wait, a Deferred is a
        failure (:meth:`run_now`).  ``start`` and ``acc`` resume a stage after an
        asynchronous check: the next check's place, and the verdict so far."""
        if checks is None:
            checks = self._stages[stage]
        accepts = self._accepts  # every verdict is counted: one increment per check
        for check in checks[start:] if start else checks:  # bounded: one step per check
            try:
                v = check.check(stage, state)
            except Exception:
                v = self._failed(Failure(), check, stage, state)
            if v is ACCEPT:  # the common answer: nothing to add
                accepts[id(check)] += 1
                continue
            # (isinstance on Verdict, a plain class, is cheap; on Deferred, an ABC, it is not.)
            if not isinstance(v, Verdict):
                if not isinstance(v, Deferred):
                    v = self._failed(Failure(TypeError(f"a check answered {v!r}, not a Verdict")),
                                     check, stage, state)
                elif now:
                    v.addErrback(lambda _: None)
                    v.cancel()
                    v = self._failed(Failure(RuntimeError(
                        f"{stage.value} checks must answer synchronously")), check, stage, state)
                else:
                    v.addTimeout(self._settings[id(check)].timeout, self.clock)
                    v.addCallback(_checked).addErrback(self._failed, check, stage, state)
                    after = checks.index(check) + 1
                    return v.addCallback(self._resume, stage, state, checks, after, acc, check)
            if v is _FAILED_ACCEPT:  # counted by _failed
                continue
            if v.action is Action.ACCEPT and not v.quarantine:  # (inlined from _record)
                accepts[id(check)] += 1
            else:
                self._record(check, stage, state, v)
            acc = v if acc is ACCEPT and v.header_lines is None else self._step(acc, v, state)
            if acc.action is not Action.ACCEPT:
                return acc
        return acc

    def run_now(self, stage: Stage, state: CheckState,
                checks: tuple[Check, ...] | None = None) -> Verdict:
        """As :meth:`run`, for a stage that cannot wait: a Deferred is a failure."""
        return self.run(stage, state, checks, True)

    def _resume(self, v: Verdict, stage: Stage, state: CheckState, checks: tuple[Check, ...],
                start: int, acc: Verdict, check: Check) -> Any:
        if v is _FAILED_ACCEPT:
            v = ACCEPT
        else:
            self._record(check, stage, state, v)
        acc = self._step(acc, v, state)
        if acc.action is not Action.ACCEPT:
            return acc
        return self.run(stage, state, checks, False, start, acc)

    def _record(self, check: Check, stage: Stage, state: CheckState, v: Verdict) -> None:
        """Count a check's verdict; log it unless it is a plain acceptance or quiet
        (a failure was counted and logged by :meth:`_failed`)."""
        if v.action is Action.ACCEPT and not v.quarantine:
            self._accepts[id(check)] += 1
            return
        if any(v is f for f in _FAILURES.values()):
            return
        result = v.action.value if v.action is not Action.ACCEPT else "quarantine"
        self._count(check.name, result)
        if v.quiet:
            return
        reply = v.reply
        log.info("check {check} at {stage} for {ip}: {result} {reply}", check=check.name,
                 stage=stage.value, ip=state.client_ip, result=result,
                 reply=str(reply) if reply is not None else v.quarantine,
                 code=reply.code if reply is not None else 250,
                 enhanced=reply.enhanced if reply is not None else "",
                 reason=v.reason or v.quarantine, event="check")

    def _count(self, name: str, result: str) -> None:
        key = (name, result)
        self._counts[key] = self._counts.get(key, 0) + 1

    def verdict_counts(self) -> dict[tuple[str, str], int]:
        """Every check's verdicts so far, by (check name, result): ``accept``,
        ``reject``, ``tempfail``, ``disconnect``, ``quarantine``, ``error``, ``timeout``."""
        counts = dict(self._counts)
        for key, n in self._accepts.items():
            if n:
                k = (self._names[key], "accept")
                counts[k] = counts.get(k, 0) + n
        return counts

    @staticmethod
    def _step(acc: Verdict, v: Verdict, state: CheckState) -> Verdict:
        if v is ACCEPT:
            return acc
        if v.header_lines is not None:
            state.header_lines = v.header_lines  # the next check sees the rewrite
        return merge(acc, v)

    def _failed(self, failure: Failure, check: Check, stage: Stage, state: CheckState) -> Verdict:
        settings = self._settings[id(check)]
        timed_out = failure.check(TimeoutError) is not None
        self._count(check.name, "timeout" if timed_out else "error")
        fields = dict(check=check.name, stage=stage.value, on_error=settings.on_error,
                      ip=state.client_ip, event="check")
        if timed_out:
            log.warn("check {check} timed out at {stage} for {ip} after {timeout}s: {on_error}",
                     timeout=settings.timeout, result="timeout", **fields)
        else:
            log.failure("check {check} failed at {stage} for {ip}: {on_error}", failure,
                        result="error", **fields)
        if settings.on_error == "accept":
            return _FAILED_ACCEPT
        return _FAILURES[stage is Stage.CONNECT, timed_out]


def _checked(v: Any) -> Verdict:
    if not isinstance(v, Verdict):
        raise TypeError(f"a check answered {v!r}, not a Verdict")
    return v


def load_check(name: str, settings: CheckSettings, ctx: Any) -> Check:
    """The check ``name`` of the configuration, made with the server context."""
    from mta.policy.checks import BUILTIN

    if settings.factory is None:
        return BUILTIN[name](ctx)  # mta.config checked the name
    module_name, _, attr = settings.factory.partition(":")
    key = f"checks.{name}.factory"
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, f"cannot load {settings.factory}: {e}") from None
    check = factory(ctx)
    if not getattr(check, "stages", None) or not callable(getattr(check, "check", None)):
        raise ConfigError(key, f"{settings.factory} made no check (stages and check())")
    if not callable(getattr(check, "applies", callable)):
        raise ConfigError(key, f"{settings.factory} made a check whose applies is not callable")
    return check


def build_pipeline(config: Config, ctx: Any, clock: Any) -> Pipeline:
    """The pipeline of ``config.checks``; ConfigError when a check cannot be made."""
    entries = []
    for name in config.checks.order:
        settings = config.checks.settings_for(name)
        entries.append((load_check(name, settings, ctx), settings))
    previous = getattr(ctx, "pipeline", None)  # a reload: its counts carry over
    counts = previous.verdict_counts() if isinstance(previous, Pipeline) else None
    return Pipeline(entries, clock, counts)
