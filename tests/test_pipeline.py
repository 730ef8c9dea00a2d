"""The staged check pipeline: checks added by configuration alone, over real SMTP;
the synchronous fast path; timeouts and failures with their configured action."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mta.config import CHECKS, OPTIONAL_CHECKS, CheckSettings, ConfigError
from mta.mail import replies as R
from mta.mail.checks import ACCEPT, EMPTY, Action, Stage, Verdict, reject
from mta.smtp.pipeline import Pipeline
from tests.harness import RawClient, in_thread, make_config, start_mta

# --- test-only checks, named in the configuration by their factory ------------------


class BlockSender:
    """Refuses one envelope sender at MAIL (a synchronous check)."""

    name = "block_sender"
    stages = frozenset({Stage.MAIL})

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def check(self, stage: Stage, state: Any) -> Verdict:
        if state.sender == "blocked@remote.test":
            return reject(R.Reply(550, "5.7.1", "Sender blocked by local policy"), reason="blocklist")
        return ACCEPT


class NeverAnswers:
    """An asynchronous check whose answer never comes (a hung DNS server, say)."""

    name = "never"
    stages = frozenset({Stage.RCPT})

    def __init__(self, ctx: Any) -> None:
        self.pending: list[Deferred] = []

    def check(self, stage: Stage, state: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class Explodes:
    """A check with a bug: it raises at the end of the message."""

    name = "explodes"
    stages = frozenset({Stage.MESSAGE})

    def __init__(self, ctx: Any) -> None:
        pass

    def check(self, stage: Stage, state: Any) -> Verdict:
        raise ZeroDivisionError("a bug in a check")


class TagHeaders:
    """HEADERS: adds a field on top and rewrites the header lines (upper-cases Subject)."""

    name = "tag"
    stages = frozenset({Stage.HEADERS})

    def __init__(self, ctx: Any) -> None:
        pass

    def check(self, stage: Stage, state: Any) -> Verdict:
        lines = [b"Subject: " + line[9:].upper() if line.startswith(b"Subject: ") else line
                 for line in state.header_lines]
        return Verdict(header_lines=lines, headers=(b"X-Checked: yes",))


class SlowConnect:
    """CONNECT, asynchronously (as a DNS blocklist would): refuses 127.0.0.2 after 0.1 s."""

    name = "slow_connect"
    stages = frozenset({Stage.CONNECT})

    def __init__(self, ctx: Any) -> None:
        self.clock = ctx.clock

    def check(self, stage: Stage, state: Any) -> Deferred:
        from twisted.internet.task import deferLater

        refused = reject(R.Reply(554, "5.7.1", "Your address is listed"), reason="listed")
        return deferLater(self.clock, 0.1, lambda: refused if state.client_ip == "127.0.0.2" else ACCEPT)


class ForUsers:
    """MESSAGE, for authenticated clients only (``applies``): names the user in a field on top."""

    name = "for_users"
    stages = frozenset({Stage.MESSAGE})

    def __init__(self, ctx: Any) -> None:
        pass

    @staticmethod
    def applies(client: Any) -> bool:
        return client.authenticated

    def check(self, stage: Stage, state: Any) -> Verdict:
        if state.auth_user is None:
            return ACCEPT
        return Verdict(headers=(b"X-Submitted-By: " + state.auth_user.encode(),))


class BadApplies(ForUsers):
    """``applies`` is not a method: refused at start-up."""

    applies = True


def with_check(name: str, factory: str, **settings: Any) -> dict[str, Any]:
    """The configuration that adds one check after the built-in ones."""
    return {"checks": {"order": [*CHECKS, name],
                       name: {"factory": f"tests.test_pipeline:{factory}", **settings}}}


def capture() -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    return events


def stop_capture(events: list[dict]) -> None:
    globalLogPublisher.removeObserver(events.append)


def send(port: int, sender: str, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> list[tuple[int, str]]:
    """One transaction; the replies to MAIL, RCPT, DATA and the end of data (as far as it goes)."""
    c = RawClient(port)
    try:
        c.read_reply()
        c.cmd("EHLO client.test")
        replies = [c.cmd(f"MAIL FROM:<{sender}>")]
        if replies[-1][0] != 250:
            return replies
        replies.append(c.cmd("RCPT TO:<alice@example.test>"))
        if replies[-1][0] != 250:
            return replies
        replies.append(c.cmd("DATA"))
        replies.append(c.cmd(body + b"."))
        c.cmd("QUIT")
        return replies
    finally:
        c.close()


# --- over real SMTP ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_check_added_by_configuration_refuses_a_sender(tmp_path):
    events = capture()
    mta = await start_mta(tmp_path, extra=with_check("block_sender", "BlockSender"))
    try:
        blocked = await in_thread(send, mta.port(), "blocked@remote.test")
        other = await in_thread(send, mta.port(), "friend@remote.test")
    finally:
        await mta.stop()
        stop_capture(events)
    assert blocked == [(550, "550 5.7.1 Sender blocked by local policy")]
    assert [code for code, _ in other] == [250, 250, 354, 250]
    assert [e.sender for e in mta.queued()] == ["friend@remote.test"]
    (rejected,) = [e for e in events if e.get("event") == "rejected"]
    assert (rejected["stage"], rejected["sender"], rejected["reason"]) == (
        "mail", "blocked@remote.test", "blocklist")


@pytest.mark.parametrize("on_error,expected", [("tempfail", 451), ("accept", 250)])
@pytest_twisted.ensureDeferred
async def test_a_check_that_times_out_gets_its_configured_action(tmp_path, on_error, expected):
    events = capture()
    mta = await start_mta(tmp_path, extra=with_check("never", "NeverAnswers", timeout=0.2,
                                                     on_error=on_error))
    try:
        replies = await in_thread(send, mta.port(), "friend@remote.test")
    finally:
        await mta.stop()
        stop_capture(events)
    assert replies[1][0] == expected
    if on_error == "tempfail":
        assert replies[1] == (451, "451 4.3.0 Temporary failure checking the message, try again later")
        assert mta.queued() == []
    else:
        assert [code for code, _ in replies] == [250, 250, 354, 250] and len(mta.queued()) == 1
    (event,) = [e for e in events if e.get("event") == "check"]
    assert (event["check"], event["stage"], event["result"], event["on_error"]) == (
        "never", "rcpt", "timeout", on_error)


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
@pytest_twisted.ensureDeferred
async def test_a_check_that_raises_gets_its_configured_action(tmp_path, on_error):
    events = capture()
    mta = await start_mta(tmp_path, extra=with_check("explodes", "Explodes", on_error=on_error))
    try:
        replies = await in_thread(send, mta.port(), "friend@remote.test")
        # The session stays in step and the next transaction works as before.
        again = await in_thread(send, mta.port(), "friend@remote.test")
    finally:
        await mta.stop()
        stop_capture(events)
    if on_error == "tempfail":
        assert replies[-1] == (451, "451 4.3.0 Temporary failure checking the message, try again later")
        assert again[-1][0] == 451 and mta.queued() == []
    else:
        assert replies[-1][0] == again[-1][0] == 250 and len(mta.queued()) == 2
    failures = [e for e in events if e.get("event") == "check"]
    assert len(failures) == 2
    assert all((e["check"], e["stage"], e["result"]) == ("explodes", "message", "error")
               for e in failures)
    assert not any("ZeroDivision" in text for _, text in replies + again)  # no traceback to the client


@pytest_twisted.ensureDeferred
async def test_an_asynchronous_connect_check_holds_the_greeting_and_may_refuse(tmp_path):
    import smtplib

    from tests.harness import client_tls_context

    events = capture()
    mta = await start_mta(tmp_path, extra=with_check("slow_connect", "SlowConnect"))

    def refused() -> tuple[tuple[int, str], bool]:
        # A 554 that is not a closing reply is the greeting; then only QUIT (RFC 5321 §3.1).
        c = RawClient(mta.port(), source="127.0.0.2")
        try:
            greeting = c.read_reply()
            assert c.cmd("EHLO client.test")[0] == 503
            assert c.cmd("QUIT")[0] == 221
            return greeting, c.is_closed()
        finally:
            c.close()

    def greeted() -> list[int]:
        c = RawClient(mta.port())
        try:
            return [c.read_reply()[0], c.cmd("EHLO client.test")[0], c.cmd("QUIT")[0]]
        finally:
            c.close()

    def implicit_tls() -> int:
        # The client's TLS hello arrives while the check runs: it must reach TLS.
        with smtplib.SMTP_SSL("127.0.0.1", mta.port("submissions"), context=client_tls_context(),
                              timeout=10) as s:
            return s.ehlo()[0]

    try:
        refusal, closed = await in_thread(refused)
        codes = await in_thread(greeted)
        tls = await in_thread(implicit_tls)
    finally:
        await mta.stop()
        stop_capture(events)
    assert refusal == (554, "554 5.7.1 Your address is listed") and closed
    assert codes == [220, 250, 221] and tls == 250
    (rejected,) = [e for e in events if e.get("event") == "rejected"]
    assert (rejected["stage"], rejected["ip"], rejected["reason"]) == ("connect", "127.0.0.2", "listed")


@pytest_twisted.ensureDeferred
async def test_a_headers_check_rewrites_the_lines_and_adds_a_field_on_top(tmp_path):
    mta = await start_mta(tmp_path, extra=with_check("tag", "TagHeaders"))
    try:
        replies = await in_thread(send, mta.port(), "friend@remote.test",
                                  b"Subject: quiet\r\nFrom: f@remote.test\r\n\r\nbody\r\n")
        (envelope,) = mta.queued()
        data = mta.message_bytes(envelope.id)
    finally:
        await mta.stop()
    assert replies[-1][0] == 250
    assert data.startswith(b"X-Checked: yes\r\nReceived: ")
    assert data.endswith(b"\r\nSubject: QUIET\r\nFrom: f@remote.test\r\n\r\nbody\r\n")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, str]]:
    """(check, stage) of every run of a built-in check or of ForUsers, in order."""
    from mta.policy.checks import BUILTIN

    # The MTA makes ForUsers from "tests.test_pipeline:ForUsers": the module under
    # that name, which need not be the one pytest loaded this file as.
    from tests.test_pipeline import ForUsers as configured

    seen: list[tuple[str, str]] = []
    for cls in (*BUILTIN.values(), configured):
        def check(self: Any, stage: Stage, state: Any, _original: Any = cls.check) -> Any:
            seen.append((self.name, stage.value))
            return _original(self, stage, state)
        monkeypatch.setattr(cls, "check", check)
    return seen


@pytest_twisted.ensureDeferred
async def test_a_trusted_clients_plain_message_runs_only_the_checks_that_apply_to_it(tmp_path, calls):
    """relay_networks: no HELO check, no SPF, none of the authenticated user's
    checks (the built-in ones nor one added by configuration) is even run."""
    extra = {"relay_networks": ["127.0.0.0/8"], **with_check("for_users", "ForUsers")}
    mta = await start_mta(tmp_path, extra=extra)
    try:
        replies = await in_thread(send, mta.port(), "friend@remote.test")
        (envelope,) = mta.queued()
        data = mta.message_bytes(envelope.id)
    finally:
        await mta.stop()
    assert [code for code, _ in replies] == [250, 250, 354, 250]
    assert calls == [("limits", "connect"), ("recipient", "rcpt"), ("forged_authres", "headers"),
                     ("loop", "headers"), ("msgauth", "message"), ("srs", "message")]
    assert b"X-Submitted-By" not in data and data.endswith(b"\r\nSubject: hi\r\n\r\nhello\r\n")


@pytest_twisted.ensureDeferred
async def test_auth_and_starttls_change_which_checks_run(tmp_path, calls):
    """An untrusted client: SPF and the HELO check run, the authenticated user's
    checks do not, before STARTTLS and after it; once AUTH succeeds, in the
    same session, those run (the one added by configuration names the user on
    top of the message) and SPF no longer does."""
    from tests.harness import PASSWORD

    mta = await start_mta(tmp_path, extra=with_check("for_users", "ForUsers"))

    def message(c: RawClient, sender: str) -> list[int]:
        return [c.cmd(f"MAIL FROM:<{sender}>")[0], c.cmd("RCPT TO:<bob@example.test>")[0],
                c.cmd("DATA")[0], c.cmd(b"Subject: hi\r\nFrom: " + sender.encode() + b"\r\n\r\nhello\r\n.")[0]]

    def run() -> tuple[list[list[int]], list[int]]:
        import base64

        marks, codes = [], []
        c = RawClient(mta.port())
        try:
            c.read_reply()
            c.cmd("EHLO client.test")
            codes.append(message(c, "friend@remote.test"))
            marks.append(len(calls))
            assert c.cmd("STARTTLS")[0] == 220
            c.starttls()
            c.cmd("EHLO client.test")
            codes.append(message(c, "friend@remote.test"))
            marks.append(len(calls))
            auth = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode()
            codes.append([c.cmd("AUTH PLAIN " + auth)[0]])
            codes.append(message(c, "alice@example.test"))
            marks.append(len(calls))
            c.cmd("QUIT")
        finally:
            c.close()
        return codes, marks

    try:
        codes, marks = await in_thread(run)
        by_sender = {e.sender: mta.message_bytes(e.id) for e in mta.queued()}
    finally:
        await mta.stop()
    assert codes == [[250, 250, 354, 250], [250, 250, 354, 250], [235], [250, 250, 354, 250]]
    untrusted = [("helo", "helo"), ("spf", "mail"), ("recipient", "rcpt"), ("forged_authres", "headers"),
                 ("loop", "headers"), ("msgauth", "message"), ("srs", "message")]
    assert calls[:marks[0]] == [("limits", "connect"), *untrusted]
    assert calls[marks[0]:marks[1]] == untrusted  # after STARTTLS, still not authenticated
    assert calls[marks[1]:] == [
        ("sender_binding", "mail"), ("user_rate", "mail"), ("recipient", "rcpt"),
        ("forged_authres", "headers"), ("loop", "headers"), ("submission_headers", "headers"),
        ("from_binding", "message"), ("msgauth", "message"), ("srs", "message"),
        ("for_users", "message")]
    assert by_sender["alice@example.test"].startswith(b"X-Submitted-By: alice@example.test\r\n")
    assert b"X-Submitted-By" not in by_sender["friend@remote.test"]


# --- the pipeline itself -------------------------------------------------------------


@dataclass
class State:
    """What a session shows its checks (mta.mail.checks.CheckState), set by hand."""

    client_ip: str = "192.0.2.1"
    trusted: bool = False
    listener_kind: str = "mx"
    helo: str = "client.example"
    esmtp: bool = True
    tls_active: bool = False
    auth_user: str | None = None
    sender: str | None = "friend@remote.test"
    recipient: Any = None
    recipients: list[str] = field(default_factory=list)
    expanded: list[Any] = field(default_factory=list)
    header_lines: list[bytes] = field(default_factory=lambda: [b"Subject: x"])
    message: bytes | None = b"Subject: x\r\n\r\nbody\r\n"
    facts: Any = field(default_factory=lambda: EMPTY)


def test_the_default_checks_answer_a_plain_message_without_a_deferred(tmp_path):
    """The fast path: the default pipeline (SPF off, as in the test configuration)
    answers every stage of a plain message with the shared ACCEPT itself."""
    from mta.daemon.service import load_policies
    from mta.mail.address import parse_path
    from mta.smtp.server import ServerContext

    config = make_config(tmp_path)
    policies = load_policies(config)
    ctx = ServerContext(config=config, store=None, users=policies.users, aliases=policies.aliases,
                        identities=policies.identities, clock=Clock())
    state = State(recipient=parse_path("<alice@example.test>"))
    assert {stage: ctx.pipeline.names(stage) for stage in Stage} == {
        Stage.CONNECT: ["limits"], Stage.HELO: ["helo"],
        Stage.MAIL: ["sender_binding", "user_rate", "spf", "milter"],
        Stage.RCPT: ["recipient", "milter"],
        Stage.HEADERS: ["forged_authres", "loop", "submission_headers"],
        Stage.MESSAGE: ["from_binding", "msgauth", "milter", "srs"]}
    for stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.HEADERS, Stage.MESSAGE):
        assert ctx.pipeline.run(stage, state) is ACCEPT, stage
    verdict = ctx.pipeline.run(Stage.RCPT, state)
    assert not isinstance(verdict, Deferred) and verdict.action is Action.ACCEPT
    assert [t.address for t in verdict.targets] == ["alice@example.test"]


class Sync:
    def __init__(self, name: str, verdict: Verdict) -> None:
        self.name, self.stages, self.verdict = name, frozenset({Stage.MAIL}), verdict
        self.calls = 0

    def check(self, stage: Stage, state: Any) -> Verdict:
        self.calls += 1
        return self.verdict


class Later(Sync):
    def check(self, stage: Stage, state: Any) -> Deferred:
        self.calls += 1
        self.d: Deferred = Deferred()
        return self.d


def test_first_refusal_wins_and_accepting_checks_accumulate():
    first = Sync("a", Verdict(headers=(b"X-A: 1",), facts={"a": 1}))
    refusal = Sync("b", reject(R.USER_RATE_LIMIT))
    never = Sync("c", ACCEPT)
    pipeline = Pipeline([(first, CheckSettings()), (refusal, CheckSettings()), (never, CheckSettings())],
                        Clock())
    verdict = pipeline.run(Stage.MAIL, State())
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, R.USER_RATE_LIMIT)
    assert verdict.headers == (b"X-A: 1",) and verdict.facts == {"a": 1}
    assert never.calls == 0
    assert pipeline.run(Stage.RCPT, State()) is ACCEPT  # no check at that stage


def test_only_an_asynchronous_check_makes_a_deferred_and_only_it_is_timed():
    clock = Clock()
    slow = Later("slow", ACCEPT)
    after = Sync("after", Verdict(headers=(b"X-After: 1",)))
    pipeline = Pipeline([(slow, CheckSettings(timeout=5.0)), (after, CheckSettings())], clock)
    result = pipeline.run(Stage.MAIL, State())
    assert isinstance(result, Deferred) and after.calls == 0
    assert len(clock.getDelayedCalls()) == 1
    slow.d.callback(Verdict(headers=(b"X-Slow: 1",)))
    assert clock.getDelayedCalls() == []  # the timer went with the answer
    assert result.result.headers == (b"X-Slow: 1", b"X-After: 1") and after.calls == 1


@pytest.mark.parametrize("stage,reply", [(Stage.MAIL, R.CHECK_FAILED), (Stage.CONNECT, R.CHECK_FAILED_CONNECT)])
def test_a_timeout_on_the_clock_is_a_temporary_failure_logged_once(stage, reply):
    clock = Clock()
    slow = Later("slow", ACCEPT)
    slow.stages = frozenset({stage})
    pipeline = Pipeline([(slow, CheckSettings(timeout=5.0))], clock)
    events = capture()
    try:
        result = pipeline.run(stage, State())
        clock.advance(4.9)
        assert not result.called
        clock.advance(0.2)
    finally:
        stop_capture(events)
    assert (result.result.action, result.result.reply) == (
        Action.DISCONNECT if stage is Stage.CONNECT else Action.TEMPFAIL, reply)
    (event,) = [e for e in events if e.get("event") == "check"]
    assert (event["check"], event["result"], event["stage"]) == ("slow", "timeout", stage.value)
    slow.d.callback(ACCEPT)  # a late answer is dropped, not an error


def test_a_check_answering_something_else_than_a_verdict_fails_it():
    slow = Later("slow", ACCEPT)
    pipeline = Pipeline([(slow, CheckSettings(on_error="accept"))], Clock())
    result = pipeline.run(Stage.MAIL, State())
    slow.d.callback("yes")
    assert result.result is ACCEPT


def test_a_headers_check_must_answer_at_once():
    slow = Later("slow", ACCEPT)
    slow.stages = frozenset({Stage.HEADERS})
    pipeline = Pipeline([(slow, CheckSettings())], Clock())
    verdict = pipeline.run_now(Stage.HEADERS, State())
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, R.CHECK_FAILED)
    assert slow.d.called  # cancelled, not left pending


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize("checks,message", [
    ({"order": ["limits", "nosuch", "recipient"]},
     "checks.order[1]: unknown check 'nosuch': built in are limits, helo"),
    ({"order": ["limits", "spf"]}, "checks.order: must include recipient"),
    ({"order": ["recipient", "recipient"]}, "checks.order[1]: recipient is listed twice"),
    ({"order": ["recipient", "Bad-Name"]}, "checks.order[1]: must be a check name"),
    ({"spf": {"on_error": "ignore"}}, "checks.spf.on_error: must be one of tempfail, accept"),
    ({"spf": {"timeout": 0}}, "checks.spf.timeout: must be greater than zero"),
    ({"recipient": {"on_error": "accept"}}, "checks.recipient.on_error: must be tempfail for recipient"),
    ({"spf": {"retries": 2}}, "checks.spf.retries: unknown key"),
    ({"extra": {"factory": "tests.x:y"}}, "checks.extra: is not in checks.order"),
    ({"spf": {"factory": "tests.x:y"}}, "checks.spf.factory: spf is a built-in check"),
    ({"order": [*CHECKS, "x"], "x": {"factory": "no colon"}}, "checks.x.factory: 'no colon': must be"),
])
def test_bad_checks_configuration_is_one_clear_line(tmp_path, checks, message):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"checks": checks})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_default_checks_are_every_builtin_in_todays_order(tmp_path):
    from mta.policy.checks import BUILTIN

    config = make_config(tmp_path)
    # The optional ones (issue 17: dnsbl, greylist) run only when the order names them.
    assert config.checks.order == CHECKS
    assert tuple(BUILTIN) == CHECKS + OPTIONAL_CHECKS
    assert config.checks.settings_for("spf") == CheckSettings(timeout=120.0, on_error="tempfail")


def test_a_factory_that_cannot_be_loaded_stops_start_up_with_its_key(tmp_path):
    from mta.smtp.pipeline import build_pipeline

    config = make_config(tmp_path, extra={"checks": {
        "order": [*CHECKS, "x"], "x": {"factory": "tests.test_pipeline:Missing"}}})
    with pytest.raises(ConfigError) as e:
        build_pipeline(config, None, Clock())
    assert str(e.value).startswith("checks.x.factory: cannot load tests.test_pipeline:Missing")


def test_a_factory_whose_check_has_a_bad_applies_stops_start_up_with_its_key(tmp_path):
    from mta.smtp.pipeline import build_pipeline

    config = make_config(tmp_path, extra=with_check("x", "BadApplies"))
    with pytest.raises(ConfigError) as e:
        build_pipeline(config, None, Clock())
    assert str(e.value) == (
        "checks.x.factory: tests.test_pipeline:BadApplies made a check whose applies is not callable")


def test_a_plan_holds_each_stages_checks_that_apply_in_order_and_a_failing_applies_keeps_its_check():
    """Made once per class of client; an applies() that raises is logged and its check runs."""
    mail = Sync("mail", ACCEPT)
    users = Sync("users", ACCEPT)
    users.applies = lambda client: client.authenticated
    broken = Sync("broken", ACCEPT)
    broken.applies = lambda client: 1 / 0
    pipeline = Pipeline([(users, CheckSettings()), (mail, CheckSettings()), (broken, CheckSettings())],
                        Clock())
    events = capture()
    try:
        anonymous = pipeline.plan(False, False, "mx")
        user = pipeline.plan(False, True, "mx")
        again = pipeline.plan(False, False, "mx")
    finally:
        stop_capture(events)
    assert pipeline.names(Stage.MAIL, anonymous) == ["mail", "broken"]
    assert pipeline.names(Stage.MAIL, user) == ["users", "mail", "broken"]
    assert again is anonymous and anonymous[Stage.RCPT] == ()
    assert [(e["check"], e["result"]) for e in events if e.get("event") == "check"] == [
        ("broken", "error"), ("broken", "error")]  # once per class of client
    assert pipeline.run(Stage.MAIL, State(), anonymous[Stage.MAIL]) is ACCEPT
    assert (users.calls, mail.calls, broken.calls) == (0, 1, 1)
