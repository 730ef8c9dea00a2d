"""The sendmail-compatible command: options, message preparation, and hand-over to the daemon.

Hand-over tests use the in-process daemon of :mod:`tests.test_cli` (real
service, queue, runner, Maildir delivery and control socket) and run
``sendmail.main`` in a thread; the daemon-down tests also run the console
entry as a subprocess.
"""

from __future__ import annotations

import io
import os
import pwd
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from mta.admin import sendmail
from mta.admin.sendmail import (
    EX_DATAERR,
    EX_NOUSER,
    EX_TEMPFAIL,
    EX_USAGE,
    Options,
    UsageError,
    extract_recipients,
    normalize_line_endings,
    parse_args,
    prepare,
    read_message,
)
from tests import test_cli
from tests.test_cli import Running, run_entry, until, write_setup

# The in-process daemon and the short socket directory of the CLI tests.
running = test_cli.running
sock_dir = test_cli.sock_dir

# --- options ---------------------------------------------------------------------------------


def test_options_as_programs_pass_them():
    opts = parse_args(["-oi", "-t", "-f", "root@host.test", "-FCron Daemon", "a@x.test"])
    assert (opts.ignore_dots, opts.extract, opts.sender, opts.full_name) == (
        True, True, "root@host.test", "Cron Daemon")
    assert opts.recipients == ["a@x.test"]
    opts = parse_args(["-ti", "-fme@x.test", "-oem", "-odb", "-B", "8BITMIME", "-N", "never",
                       "-v", "--", "-odd@x.test"])
    assert (opts.extract, opts.ignore_dots, opts.sender, opts.verbose) == (
        True, True, "me@x.test", True)
    assert opts.recipients == ["-odd@x.test"]
    assert parse_args(["-bp"]).mode == "p" and parse_args(["-b", "i"]).mode == "i"
    assert parse_args(["-bm", "x@y.test"]).mode == "m"
    assert parse_args(["-q"]).flush and parse_args(["-r", "<>"]).sender == "<>"
    assert parse_args(["-C/etc/x.toml"]).config == "/etc/x.toml"
    for bad, message in ((["-bs"], "-bs is not supported"), (["-f"], "-f needs a value"),
                         (["-k"], "unknown option -k"), (["-q30m"], "periodic")):
        with pytest.raises(UsageError, match=message):
            parse_args(bad)


# --- reading and preparing -------------------------------------------------------------------


def test_dot_line_ends_input_unless_i():
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read_message(io.BytesIO(data), ignore_dots=False, limit=1000) == b"Subject: x\n\nline\n"
    assert read_message(io.BytesIO(data), ignore_dots=True, limit=1000) == data
    assert read_message(io.BytesIO(b"a\r\n.\r\n"), False, 1000) == b"a\r\n"
    assert read_message(io.BytesIO(b"a\n..\nb\n"), False, 1000) == b"a\n..\nb\n"
    for ignore in (True, False):
        with pytest.raises(ValueError, match="larger than the limit of 10"):
            read_message(io.BytesIO(b"x" * 5 + b"\n" + b"y" * 20 + b"\n"), ignore, 10)


def test_line_endings_become_crlf():
    assert normalize_line_endings(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalize_line_endings(b"") == b""


def test_t_takes_recipients_from_headers_and_drops_bcc():
    data = (b"From: me@x.test\nTo: A <a@x.test>, b@x.test\nCc: \"Last, First\" <c@x.test>\n"
            b"Bcc: hidden@x.test,\n  also@x.test\nSubject: s\n\nBcc: not a header\n")
    message, rcpts = prepare(data, Options(extract=True, recipients=["z@x.test", "a@x.test"]),
                             "me@x.test")
    assert rcpts == ["z@x.test", "a@x.test", "b@x.test", "c@x.test", "hidden@x.test",
                     "also@x.test"]
    assert message == (b"From: me@x.test\r\nTo: A <a@x.test>, b@x.test\r\n"
                       b"Cc: \"Last, First\" <c@x.test>\r\nSubject: s\r\n\r\n"
                       b"Bcc: not a header\r\n")
    # Resent-* headers, when present, name the recipients of a resent message.
    found, kept = extract_recipients([b"To: old@x.test", b"Resent-To: new@x.test",
                                      b"Resent-Bcc: secret@x.test"])
    assert found == ["new@x.test", "secret@x.test"] and kept == [b"To: old@x.test",
                                                                 b"Resent-To: new@x.test"]
    # Without -t the headers are left alone and only the arguments count.
    message, rcpts = prepare(data, Options(recipients=["z@x.test"]), "me@x.test")
    assert rcpts == ["z@x.test"] and b"Bcc: hidden@x.test" in message


def test_from_is_added_when_missing():
    message, _ = prepare(b"Subject: s\n\nbody\n", Options(full_name="Zoë Q. Admin"),
                         "root@mx.test")
    assert message == (b"Subject: s\r\nFrom: =?utf-8?q?Zo=C3=AB_Q=2E_Admin?= <root@mx.test>\r\n"
                       b"\r\nbody\r\n")
    message, _ = prepare(b"just a body line\n", Options(), "root@mx.test")
    assert message == b"From: root@mx.test\r\n\r\njust a body line\r\n"
    message, _ = prepare(b"FROM: x@y.test\n\nb\n", Options(full_name="N"), "root@mx.test")
    assert message == b"FROM: x@y.test\r\n\r\nb\r\n"


# --- hand-over to the daemon -----------------------------------------------------------------


def run_sendmail(args: list[str], stdin: bytes) -> Deferred:
    def run() -> int:
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            return sendmail.main(args)
        finally:
            sys.stdin = saved
    return deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_cron_style_message_is_delivered(running: Running, capsys):
    config = str(running.config_path)
    stdin = (b"To: info@example.test\nBcc: bob@example.test\nSubject: cron output\n\n"
             b"line one\n.\nnot part of it\n")
    assert await run_sendmail(["-C", config, "-t", "-F", "Cron Daemon", "-v"], stdin) == 0
    assert capsys.readouterr().err.startswith("sendmail: queued as ")
    await until(lambda: running.maildir("alice") and running.maildir("bob"))
    user = pwd.getpwuid(os.getuid()).pw_name
    for copy in (running.maildir("alice")[0], running.maildir("bob")[0]):  # Maildirs use LF
        assert b"\nSubject: cron output\n" in copy
        assert b"Bcc" not in copy and b"not part of it" not in copy
        assert copy.endswith(b"\n\nline one\n")
        assert f"\nFrom: Cron Daemon <{user}@mx.example.test>\n".encode() in copy
        assert b"Received: from localhost (uid=" in copy and b"Message-ID: <" in copy


@pytest_twisted.ensureDeferred
async def test_refused_recipient_and_bad_message_exit_codes(running: Running, capsys):
    config = str(running.config_path)
    assert await run_sendmail(["-C", config, "ghost@example.test"], b"Subject: x\n\nx\n") == \
        EX_NOUSER
    err = capsys.readouterr().err
    assert "recipient refused: ghost@example.test: 550 5.1.1" in err and "NOT sent" in err
    big = b"Subject: x\n\n" + b"y" * 25000 + b"\n"
    assert await run_sendmail(["-C", config, "-i", "alice@example.test"], big) == EX_DATAERR
    assert "larger than the limit of 20000 octets" in capsys.readouterr().err
    assert await run_sendmail(["-C", config], b"Subject: x\n\nx\n") == EX_USAGE
    assert "no recipients" in capsys.readouterr().err
    assert running.store.ids() == []


@pytest_twisted.ensureDeferred
async def test_null_sender_and_flush(running: Running, capsys):
    config = str(running.config_path)
    assert await run_sendmail(["-C", config, "-f", "<>", "friend@remote.test"],
                              b"Subject: x\n\nx\n") == 0
    await until(lambda: running.remote.calls)
    assert running.remote.calls[0][0].sender == ""
    running.remote.answer_all()
    await until(lambda: not running.service.runner.in_flight)
    assert await run_sendmail(["-C", config, "-q"], b"") == 0
    await until(lambda: len(running.remote.calls) == 2)
    running.remote.answer_all()


def test_daemon_down_queues_nothing(tmp_path, sock_dir, capsys, monkeypatch):
    config = str(write_setup(tmp_path, sock_dir / "c.sock"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Subject: x\n\nx\n")))
    assert sendmail.main(["-C", config, "alice@example.test"]) == EX_TEMPFAIL
    err = capsys.readouterr().err
    assert err == (f"sendmail: the mta daemon is not running (nothing listens on "
                   f"{sock_dir / 'c.sock'}); message NOT sent, nothing was queued\n")
    assert not (tmp_path / "var").exists()
    # The console entry says the same with the same status.
    result = run_entry("mta.admin.sendmail", "-C", config, "-oi", "alice@example.test",
                       stdin=b"Subject: x\n\nx\n")
    assert result.returncode == EX_TEMPFAIL and b"message NOT sent" in result.stderr


def test_bp_bi_and_mailq(tmp_path, sock_dir, capsys, monkeypatch):
    config = str(write_setup(tmp_path, sock_dir / "c.sock"))
    (tmp_path / "var" / "queue" / "msg").mkdir(parents=True)
    assert sendmail.main(["-bp", "-C", config]) == 0
    assert capsys.readouterr().out == "queue is empty\n"
    monkeypatch.setenv("MTA_CONFIG", config)
    assert sendmail.mailq_main([]) == 0
    assert capsys.readouterr().out == "queue is empty\n"
    assert sendmail.main(["-bi"]) == 0
    assert "nothing to rebuild" in capsys.readouterr().out
    monkeypatch.setenv("MTA_CONFIG", str(Path(tmp_path) / "nope.toml"))
    assert sendmail.main(["x@y.test"]) == 78
    assert "configuration error" in capsys.readouterr().err
