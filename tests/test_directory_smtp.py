"""The SMTP server with an SQL directory (SQLite here, in-process), and the files' fast path.

The MTA of tests/harness.py, its directory switched to an SQLite file made
with the migrations and filled through :class:`SQLAdmin`: RCPT and AUTH are
answered from the tables (the files the harness writes are not read), a
domain only SQL knows is local, local submission expands an SQL alias, and
the recipient check gives a Deferred only for an SQL lookup that is not
cached (the files back end answers synchronously, as before).  The metric of the directory's log
events.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mta.mail.address import parse_mailbox
from mta.mail.checks import Stage, Verdict
from mta.policy.auth import hash_password
from mta.policy.checks import RecipientLookup
from mta.policy.sqldirectory import SQLAdmin, migrate, open_store
from tests.harness import DOMAIN, PASSWORD, client_tls_context, in_thread, start_mta

SQL_ONLY = "sql.example"


def make_sqlite(path: Path) -> None:
    from mta.config import DirectoryConfig

    store = open_store(DirectoryConfig(backend="sqlite", path=path), create=True)
    migrate(store)
    admin = SQLAdmin(store)
    for domain in (DOMAIN, SQL_ONLY):
        admin.add_domain(domain)
    admin.add_user(DOMAIN, "sqluser", hash_password(PASSWORD, n=1024))
    admin.set_alias(SQL_ONLY, "info", ["friend@remote.test"])
    store.close()


@pytest.fixture
def sql_mta(tmp_path):
    make_sqlite(tmp_path / "dir.sqlite")
    extra = {"directory": {"backend": "sqlite", "path": str(tmp_path / "dir.sqlite")}}
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(tmp_path, extra=extra)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


@pytest.fixture
def files_mta(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(root)))
    yield running
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


def rcpt_codes(port: int, recipients: list[str]) -> list[tuple[int, str]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@remote.test")
        return [(code, text.decode()) for code, text in (s.rcpt(r) for r in recipients)]


def login(port: int, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=client_tls_context())
        try:
            return s.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


@pytest_twisted.ensureDeferred
async def test_rcpt_and_auth_are_answered_from_the_sql_tables(sql_mta):
    replies = await in_thread(rcpt_codes, sql_mta.port(), [
        f"sqluser@{DOMAIN}", f"alice@{DOMAIN}", f"info@{SQL_ONLY}", f"nobody@{SQL_ONLY}",
        "friend@remote.test"])
    assert [code for code, _ in replies] == [250, 550, 250, 550, 554]
    assert replies[1][1].startswith("5.1.1")
    assert await in_thread(login, sql_mta.port("submission"), f"sqluser@{DOMAIN}", PASSWORD) == 235
    assert await in_thread(login, sql_mta.port("submission"), f"sqluser@{DOMAIN}", "no") == 535
    # alice is in the files the harness wrote, but this MTA reads SQL only.
    assert await in_thread(login, sql_mta.port("submission"), f"alice@{DOMAIN}", PASSWORD) == 535


def _state(address: str) -> SimpleNamespace:
    return SimpleNamespace(recipient=parse_mailbox(address), auth_user=None, trusted=False,
                           client_ip="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_the_recipient_check_waits_only_for_an_sql_lookup(sql_mta, files_mta):
    files_check = RecipientLookup(files_mta.context)
    for address in (f"alice@{DOMAIN}", f"nobody@{DOMAIN}", "x@remote.test"):
        assert isinstance(files_check.check(Stage.RCPT, _state(address)), Verdict)
    sql_check = RecipientLookup(sql_mta.context)
    waiting = sql_check.check(Stage.RCPT, _state(f"info@{SQL_ONLY}"))
    assert isinstance(waiting, Deferred)
    verdict = await waiting
    assert verdict.accepted and [t.address for t in verdict.targets] == ["friend@remote.test"]
    # Asked again within cache_ttl: every answer is cached, so no thread, no Deferred.
    again = sql_check.check(Stage.RCPT, _state(f"INFO@{SQL_ONLY}"))
    assert isinstance(again, Verdict) and again.targets == verdict.targets
    # Another domain needs no lookup: refused (no relay) at once.
    refused = sql_check.check(Stage.RCPT, _state("x@remote.test"))
    assert isinstance(refused, Verdict) and refused.reply.code == 554


@pytest_twisted.ensureDeferred
async def test_local_submission_expands_sql_aliases(sql_mta):
    from mta.daemon.service import _submit_with_sql
    from mta.intake.submit import SubmitError, Submitter

    queue_id = await _submit_with_sql(sql_mta.context, f"sqluser@{DOMAIN}",
                                      [f"info@{SQL_ONLY}", f"sqluser@{DOMAIN}"],
                                      b"Subject: local\r\n\r\nbody\r\n", Submitter(uid=0))
    (env,) = [e for e in sql_mta.queued() if e.id == queue_id]
    assert [(r.original, r.address) for r in env.recipients] == [
        (f"info@{SQL_ONLY}", "friend@remote.test"), (f"sqluser@{DOMAIN}", f"sqluser@{DOMAIN}")]
    with pytest.raises(SubmitError, match="nobody@sql.example"):
        await _submit_with_sql(sql_mta.context, "", [f"nobody@{SQL_ONLY}"],
                               b"Subject: x\r\n\r\ny\r\n", Submitter(uid=0))


def test_directory_events_are_counted_in_the_metrics():
    from mta.daemon.metrics import Metrics

    metrics = Metrics()
    for result in ("unavailable", "unavailable", "recovered"):
        metrics.observe_event({"event": "directory", "result": result})
    value = metrics.registry.get_sample_value
    assert value("mta_directory_events_total", {"result": "unavailable"}) == 2
    assert value("mta_directory_events_total", {"result": "recovered"}) == 1
    metrics.observe_event({"event": "auth", "result": "unavailable"})
    assert value("mta_auth_total", {"result": "unavailable"}) == 1


def test_dkim_keys_in_sql_sign_for_their_domain(tmp_path):
    """A dkim_keys row holding the PEM itself, and one naming a file: both are
    loaded at start (and reload) into the signer, as dkim.keys are."""
    from mta.config import DirectoryConfig, config_from_dict
    from mta.daemon.service import load_policies
    from mta.policy.dkim import generate_key

    make_sqlite(tmp_path / "dir.sqlite")
    generate_key("ed25519", tmp_path / "inline.pem")
    generate_key("rsa", tmp_path / "file.pem")
    store = open_store(DirectoryConfig(backend="sqlite", path=tmp_path / "dir.sqlite"))
    admin = SQLAdmin(store)
    admin.set_dkim_key(SQL_ONLY, "s1", pem=(tmp_path / "inline.pem").read_text())
    admin.set_dkim_key(DOMAIN, "s2", path=str(tmp_path / "file.pem"))
    store.close()
    config = config_from_dict({"hostname": "mx.example.test", "local_domains": [DOMAIN],
                               "data_dir": str(tmp_path / "var"),
                               "domains_dir": str(tmp_path / "domains"),
                               "directory": {"backend": "sqlite",
                                             "path": str(tmp_path / "dir.sqlite")}}, tmp_path)
    policies = load_policies(config)
    try:
        signer = policies.authenticator.signer
        assert signer.domains == frozenset({SQL_ONLY, DOMAIN})
        assert [k.selector for k in signer.keys(SQL_ONLY)] == ["s1"]
        message = b"From: a@sql.example\r\nTo: b@remote.test\r\nSubject: x\r\n\r\nbody\r\n"
        (field,) = signer.sign(message, SQL_ONLY)
        assert b"d=sql.example" in field and b"s=s1" in field
    finally:
        policies.directory.close()
