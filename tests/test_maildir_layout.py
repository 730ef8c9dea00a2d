"""The Maildir path template ([maildir] template): mail lands where the template says.

Deliveries go through the real daemon service in-process (SMTP in, the real
queue runner and Maildir courier out), so the test sees the file on disk where
a mail reader (Dovecot's ``mail_location = maildir:~/%d/%n/Maildir``) looks.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mta.config import ConfigError
from mta.delivery.local import MaildirCourier, expand_maildir_template
from tests.harness import RawClient, in_thread, make_config, start_mta


async def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


def send(port: int, rcpts: list[str]) -> int:
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<sender@elsewhere.test>")
    for rcpt in rcpts:
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    c.cmd("DATA")
    c.send(b"Subject: layout\r\n\r\nwhere am I\r\n.\r\n")
    code = c.read_reply()[0]
    c.close()
    return code


@pytest.mark.parametrize(("template", "where"), [
    (None, ["example.test/alice", "example.test/bob"]),               # today's layout, unchanged
    ("%d/%n/Maildir", ["example.test/alice/Maildir", "example.test/bob/Maildir"]),  # Dovecot's
    ("%u", ["alice@example.test", "bob@example.test"]),
    ("users/%d/%n", ["users/example.test/alice", "users/example.test/bob"]),
    ("shared", ["shared", "shared"]),                                  # a fixed folder
    ("100%%/%n", ["100%/alice", "100%/bob"]),
])
@pytest_twisted.ensureDeferred
async def test_deliveries_land_where_the_template_says(tmp_path, template, where):
    extra = {} if template is None else {"maildir": {"template": template}}
    mta = await start_mta(tmp_path, runner=None, extra=extra)
    try:
        assert (await in_thread(send, mta.port(), ["alice@example.test", "bob@example.test"])) == 250
        mail = tmp_path / "var" / "mail"
        expected = {mail / w for w in where}

        def delivered() -> bool:
            return sum(len(list((d / "new").glob("*"))) for d in expected
                       if (d / "new").is_dir()) == 2

        await wait_for(delivered)
        await wait_for(lambda: not mta.store.ids())
        for user, d in zip(("alice", "bob"), where, strict=True):
            files = [f.read_bytes() for f in (mail / d / "new").iterdir()]
            assert any(f"Delivered-To: {user}@example.test".encode() in f
                       and f.endswith(b"\n\nwhere am I\n") for f in files)
            assert (mail / d / "cur").is_dir() and (mail / d / "tmp").is_dir()
        # Nothing was written anywhere else.
        maildirs = {p.parent for p in mail.rglob("new")}
        assert maildirs == expected
    finally:
        await mta.stop()


def test_expand_variables() -> None:
    assert expand_maildir_template("%d/%n/Maildir", "bob", "example.org") == "example.org/bob/Maildir"
    assert expand_maildir_template("%u", "bob", "example.org") == "bob@example.org"
    assert expand_maildir_template("a%%b/%n", "bob", "example.org") == "a%b/bob"


@pytest.mark.parametrize(("template", "problem"), [
    ("/var/mail/%n", "relative to mail_dir"),
    ("~/%n", "relative to mail_dir"),
    ("%d/../%n", "'..'"),
    ("..", "'..'"),
    ("%d//%n", "empty"),
    ("%d/%h", "unknown variable"),
    ("%d/%", "unknown variable"),
    ("", "must not be empty"),
    ("%d/.hidden", "starts with a dot"),
])
def test_bad_templates_are_refused_at_load(tmp_path, template, problem) -> None:
    with pytest.raises(ConfigError, match=r"maildir\.template") as info:
        make_config(tmp_path, extra={"maildir": {"template": template}})
    assert problem in str(info.value)
    with pytest.raises(ValueError):
        MaildirCourier(tmp_path / "mail", "mx.example.test", template=template)
