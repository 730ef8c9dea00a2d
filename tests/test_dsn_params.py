"""The DSN extension's parameters on the way in (RFC 3461 §4): byte-exact dialogs
against a real server on loopback, and what the envelope on disk keeps."""

from __future__ import annotations

import json

import pytest_twisted

from mta.mail.dsnfields import rcpt_params, xtext_decode, xtext_encode
from mta.queue.envelope import Envelope
from mta.queue.layout import read_embedded_envelope
from tests.harness import in_thread
from tests.test_server_dialog import dialog, mta  # noqa: F401 - the fixture

MESSAGE = "Subject: dsn\r\nFrom: s@remote.test\r\n\r\nbody\r\n."


@pytest_twisted.ensureDeferred
async def test_ehlo_advertises_dsn(mta):  # noqa: F811
    replies = await in_thread(dialog, mta.port(), [("EHLO client.test", 250)])
    assert "250-DSN" in replies[1][1].split("\n")


@pytest_twisted.ensureDeferred
async def test_bad_mail_parameters_refused_and_session_in_sync(mta):  # noqa: F811
    long_envid = "a" * 101
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test> RET=BOTH", 501),
        ("MAIL FROM:<s@remote.test> RET", 501),
        (f"MAIL FROM:<s@remote.test> ENVID={long_envid}", 501),
        ("MAIL FROM:<s@remote.test> ENVID=a+2", 501),  # a cut hexchar
        ("MAIL FROM:<s@remote.test> ENVID=a+2f", 501),  # hex must be upper case
        ("MAIL FROM:<s@remote.test> ENVID=a=b", 501),  # '=' must be encoded
        ("MAIL FROM:<s@remote.test> ENVID=a+0Ab", 501),  # decodes to a control
        ("MAIL FROM:<s@remote.test> RET=FULL RET=HDRS", 501),
        ("MAIL FROM:<s@remote.test> ENVID=x ENVID=y", 501),
        ("MAIL FROM:<s@remote.test> RET=hdrs ENVID=" + "b" * 100, 250),
        ("MAIL FROM:<s@remote.test>", 503),  # the good MAIL above took effect
    ])
    assert replies[2][1] == "501 5.5.4 RET must be FULL or HDRS (RFC 3461 section 4.3)"
    for i in (4, 5, 6, 7, 8):
        assert replies[i][1].startswith("501 5.5.4 ENVID must be xtext"), replies[i]
    assert replies[9][1] == "501 5.5.4 Parameter RET given more than once"
    assert replies[10][1] == "501 5.5.4 Parameter ENVID given more than once"


@pytest_twisted.ensureDeferred
async def test_bad_rcpt_parameters_refused_and_session_in_sync(mta):  # noqa: F811
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS", 501),
        ("RCPT TO:<alice@example.test> NOTIFY=SUCCESS,SUCCESS", 501),
        ("RCPT TO:<alice@example.test> NOTIFY=SOMETIMES", 501),
        ("RCPT TO:<alice@example.test> NOTIFY=", 501),
        ("RCPT TO:<alice@example.test> NOTIFY=DELAY NOTIFY=FAILURE", 501),
    ])
    assert replies[3][1].startswith("501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS")
    assert replies[7][1] == "501 5.5.4 Parameter NOTIFY given more than once"
    # A new session: the server closes one with too many errors.
    replies = await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<alice@example.test> ORCPT=rfc822", 501),  # no ';'
        ("RCPT TO:<alice@example.test> ORCPT=rfc822;", 501),  # no address
        ("RCPT TO:<alice@example.test> ORCPT=rfc(822;a@b.test", 501),  # type not an atom
        ("RCPT TO:<alice@example.test> ORCPT=rfc822;a b@x.test", 501),  # split: junk
        ("RCPT TO:<alice@example.test> ORCPT=rfc822;a+ZZ@x.test", 501),
        ("RCPT TO:<alice@example.test> ORCPT=rfc822;a+C3+A9@x.test", 501),  # not ASCII
        ("RCPT TO:<alice@example.test> ORCPT=rfc822;" + "a" * 500, 501),  # too long
        ("RCPT TO:<alice@example.test> XNOTIFY=SUCCESS", 555),
        ("RCPT TO:<alice@example.test> notify=success,delay orcpt=RFC822;alice+2Bdsn@example.test",
         250),
        ("DATA", 354),
        (MESSAGE, 250),
    ])
    assert replies[3][1].startswith("501 5.5.4 ORCPT must be addr-type;xtext")
    assert replies[6][1] == "501 5.5.4 Syntax: RCPT TO:<address>"  # "b@x.test" is no parameter
    assert replies[10][1] == "555 5.5.4 Unsupported parameter"


@pytest_twisted.ensureDeferred
async def test_rcpt_parameters_need_ehlo(mta):  # noqa: F811
    replies = await in_thread(dialog, mta.port(), [
        ("HELO client.test", 250),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<alice@example.test> NOTIFY=NEVER", 555),
        ("RCPT TO:<alice@example.test>", 250),
    ])
    assert replies[3][1] == "555 5.5.4 Parameters need EHLO, not HELO"


def _queued_envelope(mta) -> tuple[Envelope, dict]:  # noqa: F811
    (env,) = mta.queued()
    on_disk = json.loads(read_embedded_envelope(mta.store.data_path(env.id)))
    return env, on_disk


@pytest_twisted.ensureDeferred
async def test_envelope_on_disk_keeps_dsn_parameters(mta):  # noqa: F811
    await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test> RET=HDRS ENVID=QQ+2B314159", 250),
        ("RCPT TO:<alice@example.test> NOTIFY=DELAY,SUCCESS ORCPT=rfc822;Alice+2Bx@example.test",
         250),
        # An alias of two mailboxes: each target keeps the RCPT's NOTIFY and ORCPT.
        ("RCPT TO:<team@example.test> NOTIFY=NEVER ORCPT=utf-8;t\\x{E9}am@example.test", 250),
        ("RCPT TO:<info@example.test>", 250),  # alice again (one copy): the first RCPT's
        ("DATA", 354),
        (MESSAGE, 250),
    ])
    env, on_disk = _queued_envelope(mta)
    assert (on_disk["dsn"], on_disk["ret"], on_disk["envid"]) == (True, "HDRS", "QQ+314159")
    rcpts = {(r["mailbox"], r["original"]): (r["notify"], r["orcpt"]) for r in on_disk["recipients"]}
    assert rcpts == {
        ("alice@example.test", "alice@example.test"): ("SUCCESS,DELAY",
                                                       "rfc822;Alice+x@example.test"),
        ("bob@example.test", "team@example.test"): ("NEVER", "utf-8;téam@example.test"),
    }
    # Loaded back, it is the same.
    assert Envelope.from_bytes(env.to_bytes()) == env
    assert [r.notify for r in env.recipients] == ["SUCCESS,DELAY", "NEVER"]


@pytest_twisted.ensureDeferred
async def test_envelope_without_dsn_is_unchanged(mta):  # noqa: F811
    await in_thread(dialog, mta.port(), [
        ("EHLO client.test", 250),
        ("MAIL FROM:<s@remote.test>", 250),
        ("RCPT TO:<alice@example.test>", 250),
        ("DATA", 354),
        (MESSAGE, 250),
    ])
    env, on_disk = _queued_envelope(mta)
    assert not {"dsn", "ret", "envid"} & set(on_disk)
    assert not {"notify", "orcpt"} & set(on_disk["recipients"][0])
    assert not env.dsn and env.recipients[0].notify == ""


def test_old_envelope_loads_without_dsn_fields():
    old = (b'{"id": "q1", "sender": "a@b.test", "created": 1.0, "version": 1, "extra": {},'
           b' "recipients": [{"address": "c@d.test", "kind": "remote", "original": "c@d.test"}]}')
    env = Envelope.from_bytes(old)
    assert (env.dsn, env.ret, env.envid) == (False, "", "")
    assert (env.recipients[0].notify, env.recipients[0].orcpt) == ("", "")


def test_xtext_round_trip_and_outbound_rcpt_parameters():
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert rcpt_params("", "", "x@y.test") == ""
    assert rcpt_params("SUCCESS", "", "x+1@y.test") == "NOTIFY=SUCCESS ORCPT=rfc822;x+2B1@y.test"
    assert rcpt_params("", "utf-8;té@y.test", "x@y.test") == "ORCPT=utf-8;t\\x{E9}@y.test"
