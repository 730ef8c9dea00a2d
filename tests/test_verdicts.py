"""Each check's verdict counted by check and result, and logged unless it is a plain
acceptance (issue 17), by the pipeline for every check; the counts survive a reload."""

from __future__ import annotations

from twisted.internet.task import Clock

from mta.config import CheckSettings
from mta.mail import replies as R
from mta.mail.checks import ACCEPT, Action, Stage, Verdict, reject
from mta.smtp.pipeline import Pipeline
from tests.test_pipeline import Later, State, Sync, capture, make_config, stop_capture


class Raises(Sync):
    def check(self, stage, state):
        raise ValueError("a bug")


def test_every_verdict_is_counted_and_only_the_others_than_acceptance_are_logged():
    plain = Sync("plain", ACCEPT)
    adds = Sync("adds", Verdict(headers=(b"X-A: 1",)))  # an acceptance with something to add
    broken = Raises("broken", ACCEPT)
    slow = Later("slow", ACCEPT)
    refuses = Sync("refuses", reject(R.USER_RATE_LIMIT, reason="rate"))
    quiet = Sync("quiet", reject(R.CONNECTION_RATE, quiet=True))
    pipeline = Pipeline([(plain, CheckSettings()), (adds, CheckSettings()),
                         (broken, CheckSettings(on_error="accept")), (slow, CheckSettings()),
                         (refuses, CheckSettings())], Clock())
    events = capture()
    try:
        for _ in range(2):
            result = pipeline.run(Stage.MAIL, State())
            slow.d.callback(ACCEPT)
            assert result.result.action is Action.TEMPFAIL
        held = Pipeline([(Sync("hold", Verdict(quarantine="spam")), CheckSettings()),
                         (quiet, CheckSettings())], Clock())
        assert held.run(Stage.MAIL, State()).reply is R.CONNECTION_RATE
    finally:
        stop_capture(events)
    assert pipeline.verdict_counts() == {
        ("plain", "accept"): 2, ("adds", "accept"): 2, ("broken", "error"): 2,
        ("slow", "accept"): 2, ("refuses", "tempfail"): 2}
    assert held.verdict_counts() == {("hold", "quarantine"): 1, ("quiet", "disconnect"): 1}
    logged = [(e["check"], e["result"]) for e in events if e.get("event") == "check"]
    assert logged == [("broken", "error"), ("refuses", "tempfail")] * 2 + [("hold", "quarantine")]
    refused = next(e for e in events if e.get("check") == "refuses")
    assert (refused["stage"], refused["code"], refused["enhanced"], refused["reason"], refused["ip"]) == (
        "mail", 450, "4.7.1", "rate", "192.0.2.1")


def test_the_counts_carry_over_a_reload(tmp_path):
    from mta.daemon.service import load_policies
    from mta.mail.address import parse_path
    from mta.smtp.pipeline import build_pipeline
    from mta.smtp.server import ServerContext

    config = make_config(tmp_path)
    policies = load_policies(config)
    ctx = ServerContext(config=config, store=None, users=policies.users, aliases=policies.aliases,
                        identities=policies.identities, clock=Clock())
    state = State(recipient=parse_path("<alice@example.test>"))
    ctx.pipeline.run(Stage.RCPT, state)
    ctx.pipeline.run(Stage.RCPT, State(recipient=parse_path("<nobody@example.test>")))
    again = build_pipeline(config, ctx, Clock())  # what a reload does
    again.run(Stage.RCPT, state)
    counts = {k: n for k, n in again.verdict_counts().items() if k[0] == "recipient"}
    assert counts == {("recipient", "accept"): 2, ("recipient", "reject"): 1}
