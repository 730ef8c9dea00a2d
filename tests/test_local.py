"""Tests for the local couriers: Maildir files, pipe aliases, the delivery-agent command.

Maildir tests check the bytes on disk; pipe and command tests run real child
processes through the running reactor.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor

from mta.delivery.local import (
    CHUNK_SIZE,
    CommandCourier,
    CRLFToLF,
    MaildirCourier,
    PipeCourier,
    escape_maildir_host,
)
from mta.queue.courier import Outcome
from mta.queue.envelope import Envelope, Recipient, RecipientKind

SENDER = "alice@example.org"


def local_rcpt(mailbox: str, original: str | None = None) -> Recipient:
    return Recipient(address=mailbox, kind=RecipientKind.LOCAL, original=original or mailbox,
                     mailbox=mailbox)


def pipe_rcpt(command: str, original: str = "list@example.com") -> Recipient:
    return Recipient(address=command, kind=RecipientKind.PIPE, original=original)


def envelope(*recipients: Recipient, sender: str = SENDER) -> Envelope:
    return Envelope(id="0000test0001", sender=sender, recipients=list(recipients),
                    created=time.time())


def message(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path


MESSAGE = (b"Received: from client by mx.example.com\r\nSubject: hello\r\n"
           b"From: Alice <alice@example.org>\r\n\r\nline one\r\n.leading dot\r\n"
           b"lone\rcarriage return\r\n\r\nlast line\r\n")


def prelude(sender: str, delivered_to: str) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode()


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --- CRLF conversion ---------------------------------------------------------------


@given(st.binary(max_size=300).map(lambda b: b.replace(b"x", b"\r\n")),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_crlf_to_lf_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    convert = CRLFToLF()
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out = b"".join(convert(data[a:b]) for a, b in zip(points, points[1:], strict=False))
    out += convert.flush()
    assert out == data.replace(b"\r\n", b"\n")


# --- Maildir -------------------------------------------------------------------------


def test_escape_maildir_host() -> None:
    assert escape_maildir_host("mx/1:2.example") == "mx\\0571\\0722.example"


@pytest_twisted.ensureDeferred
async def test_maildir_delivery_writes_file_in_new(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    data = message(tmp_path / "q.msg", MESSAGE)
    courier = MaildirCourier(mail, "mx.example.com")
    rcpt = local_rcpt("bob@example.com", original="Bob@Example.com")
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)

    assert result.outcome is Outcome.DELIVERED and result.recipient is rcpt
    assert result.reply.startswith("250 2.0.0")
    maildir = mail / "example.com" / "bob"
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    assert files[0].read_bytes() == prelude(SENDER, "bob@example.com") + lf(MESSAGE)
    assert b"lone\rcarriage" in files[0].read_bytes()  # a lone CR is kept as it is
    assert list((maildir / "tmp").iterdir()) == []
    assert (maildir / "cur").is_dir()
    for d in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_maildir_unique_names_and_large_message(tmp_path: Path) -> None:
    # A CRLF pair straddles the courier's read-chunk boundary.
    body = b"Subject: big\r\n\r\n" + b"a" * (CHUNK_SIZE - 17) + b"\r\n" + b"b" * 200_000 + b"\r\n"
    assert body[CHUNK_SIZE - 1: CHUNK_SIZE + 1] == b"\r\n"
    data = message(tmp_path / "q.msg", body)
    courier = MaildirCourier(tmp_path / "mail", "mx/a:b", fsync=False, clock=lambda: 1700000000.25)
    rcpt = local_rcpt("carol@example.com")
    env = envelope(rcpt)
    r1 = await courier.deliver(env, [rcpt], data)
    r2 = await courier.deliver(env, [rcpt], data)
    assert [r.outcome for r in r1 + r2] == [Outcome.DELIVERED] * 2
    files = sorted((tmp_path / "mail" / "example.com" / "carol" / "new").iterdir())
    assert len(files) == 2
    pattern = re.compile(rf"1700000000\.M250000P{os.getpid()}Q\d+\.mx\\057a\\072b\Z")
    assert all(pattern.match(f.name) for f in files), [f.name for f in files]
    for f in files:
        assert f.read_bytes() == prelude(SENDER, "carol@example.com") + lf(body)


@pytest_twisted.ensureDeferred
async def test_maildir_several_recipients_one_call(tmp_path: Path) -> None:
    data = message(tmp_path / "q.msg", MESSAGE)
    courier = MaildirCourier(tmp_path / "mail", "mx.example.com", fsync=False)
    rcpts = [local_rcpt("a@example.com"), local_rcpt("b@example.net"), local_rcpt("../x@example.com")]
    results = await courier.deliver(envelope(*rcpts), rcpts, data)
    assert [r.recipient for r in results] == rcpts
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED, Outcome.FAILED]
    for mailbox in ("example.com/a", "example.net/b"):
        [f] = (tmp_path / "mail" / mailbox / "new").iterdir()
        assert f.read_bytes().startswith(b"Return-Path: <alice@example.org>\nDelivered-To: ")


@pytest.mark.parametrize("mailbox", [
    "../escape@example.com", ".hidden@example.com", "a/b@example.com", "nul\x00@example.com",
    "user@../etc", "user@.example.com", "no-at-sign", "@example.com", "user@",
])
@pytest_twisted.ensureDeferred
async def test_maildir_unsafe_mailbox_fails(tmp_path: Path, mailbox: str) -> None:
    data = message(tmp_path / "q.msg", MESSAGE)
    mail = tmp_path / "mail"
    courier = MaildirCourier(mail, "mx.example.com", fsync=False)
    rcpt = local_rcpt(mailbox)
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.FAILED
    assert result.reply.startswith("550 5.1.1") and result.status == "5.1.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.msg"]  # nothing created anywhere


@pytest_twisted.ensureDeferred
async def test_maildir_write_error_defers(tmp_path: Path) -> None:
    data = message(tmp_path / "q.msg", MESSAGE)
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "example.com").write_text("a file where a directory should be")
    courier = MaildirCourier(mail, "mx.example.com", fsync=False)
    rcpt = local_rcpt("bob@example.com")
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.startswith("451 4.3.0") and result.status == "4.3.0"

    other = local_rcpt("bob@example.net")
    [missing] = await courier.deliver(envelope(other), [other], tmp_path / "gone.msg")
    assert missing.outcome is Outcome.DEFERRED
    assert list((mail / "example.net" / "bob" / "tmp").iterdir()) == []


# --- pipes ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipe_receives_message_and_environment(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTA_TEST_SECRET", "hunter2")
    body = MESSAGE + b"x" * 300_000 + b"\r\n"  # bigger than a pipe buffer
    data = message(tmp_path / "q.msg", body)
    out, envfile = tmp_path / "out", tmp_path / "env"
    rcpt = pipe_rcpt(f"env > {envfile}; cat > {out}")
    courier = PipeCourier(10.0, reactor)
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert out.read_bytes() == prelude(SENDER, "list@example.com") + lf(body)
    env = dict(line.split("=", 1) for line in envfile.read_text().splitlines() if "=" in line)
    assert env["SENDER"] == SENDER
    assert env["RECIPIENT"] == "list@example.com"
    assert env["LOCAL"] == "list" and env["DOMAIN"] == "example.com"
    assert "MTA_TEST_SECRET" not in env and "hunter2" not in envfile.read_text()


@pytest.mark.parametrize(("command", "outcome", "code", "text"), [
    ("cat > /dev/null; exit 0", Outcome.DELIVERED, "250 2.0.0", ""),
    ("echo 'mailbox busy, later' >&2; exit 75", Outcome.DEFERRED, "451 4.3.0", "mailbox busy, later"),
    ("echo 'no such list' >&2; echo second line >&2; exit 1", Outcome.FAILED, "550 5.3.0",
     "no such list"),
    ("exit 67", Outcome.FAILED, "550 5.1.1", "exit 67"),
    ("exit 0", Outcome.DELIVERED, "250 2.0.0", ""),  # never reads stdin
    ("kill -TERM $$", Outcome.DEFERRED, "451 4.3.0", "signal"),
])
@pytest_twisted.ensureDeferred
async def test_pipe_exit_codes(tmp_path: Path, command: str, outcome: Outcome, code: str,
                               text: str) -> None:
    data = message(tmp_path / "q.msg", MESSAGE + b"y" * 200_000 + b"\r\n")
    rcpt = pipe_rcpt(command)
    [result] = await PipeCourier(10.0, reactor).deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is outcome
    assert result.reply.startswith(code)
    assert text in result.reply
    assert "second line" not in result.reply


def _gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest_twisted.ensureDeferred
async def test_pipe_timeout_kills_the_command_and_defers(tmp_path: Path) -> None:
    data = message(tmp_path / "q.msg", MESSAGE)
    shpid, sleeppid = tmp_path / "sh.pid", tmp_path / "sleep.pid"
    rcpt = pipe_rcpt(f"echo $$ > {shpid}; sleep 5 & echo $! > {sleeppid}; wait")
    started = time.monotonic()
    [result] = await PipeCourier(0.3, reactor).deliver(envelope(rcpt), [rcpt], data)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.startswith("451 4.3.0") and "timed out" in result.reply
    assert 0.3 <= elapsed < 3.0
    deadline = time.monotonic() + 2.0
    pids = [int(shpid.read_text()), int(sleeppid.read_text())]
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_gone(p) for p in pids), pids


@pytest_twisted.ensureDeferred
async def test_pipe_timeout_plain_sleep(tmp_path: Path) -> None:
    data = message(tmp_path / "q.msg", MESSAGE)
    rcpt = pipe_rcpt("sleep 5")
    started = time.monotonic()
    [result] = await PipeCourier(0.3, reactor, setsid=None).deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.DEFERRED and "timed out" in result.reply
    assert time.monotonic() - started < 3.0


# --- the delivery-agent command -----------------------------------------------------


AGENT = """\
import json, sys
out = sys.argv[1]
with open(out + "/argv.json", "w") as f:
    json.dump(sys.argv[2:], f)
with open(out + "/stdin", "wb") as f:
    f.write(sys.stdin.buffer.read())
code = int(open(out + "/exit").read()) if __import__("os").path.exists(out + "/exit") else 0
if code:
    sys.stderr.write("agent says no\\n")
sys.exit(code)
"""


@pytest.fixture
def agent(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    out = tmp_path / "agent-out"
    out.mkdir()
    return script, out


@pytest_twisted.ensureDeferred
async def test_command_courier_substitutes_words(tmp_path: Path, agent: tuple[Path, Path]) -> None:
    script, out = agent
    data = message(tmp_path / "q.msg", MESSAGE)
    courier = CommandCourier(f"{sys.executable} {script} {out} -d %u --domain=%d -r %r "
                             "-f %s '100%%'", 10.0, reactor)
    mailbox = "we ird;$(touch pwned)@example.com"
    rcpt = local_rcpt(mailbox, original="Weird@example.com")
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert json.loads((out / "argv.json").read_text()) == [
        "-d", "we ird;$(touch pwned)", "--domain=example.com", "-r", mailbox, "-f", SENDER, "100%",
    ]
    assert (out / "stdin").read_bytes() == prelude(SENDER, mailbox) + lf(MESSAGE)
    assert not (tmp_path / "pwned").exists() and not Path("/pwned").exists()


@pytest_twisted.ensureDeferred
async def test_command_courier_exit_codes_and_errors(tmp_path: Path,
                                                     agent: tuple[Path, Path]) -> None:
    script, out = agent
    data = message(tmp_path / "q.msg", MESSAGE)
    courier = CommandCourier(f"{sys.executable} {script} {out} -d %u", 10.0, reactor)
    rcpt = local_rcpt("bob@example.com")

    (out / "exit").write_text("75")
    [r] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert r.outcome is Outcome.DEFERRED and "agent says no" in r.reply

    (out / "exit").write_text("67")
    [r] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert r.outcome is Outcome.FAILED and r.reply.startswith("550 5.1.1")
    assert "agent says no" in r.reply

    dash = local_rcpt("-oops@example.com")
    [r] = await courier.deliver(envelope(dash), [dash], data)
    assert r.outcome is Outcome.FAILED and r.status == "5.1.1"

    missing = CommandCourier("/nonexistent/deliver -d %u", 10.0, reactor)
    [r] = await missing.deliver(envelope(rcpt), [rcpt], data)
    assert r.outcome is Outcome.DEFERRED and r.reply.startswith("451 4.3.5")


@pytest_twisted.ensureDeferred
async def test_maildir_alias_target_without_user_fails(tmp_path: Path) -> None:
    """An alias naming a local address that is no user: 5.1.1, no Maildir created."""
    data = message(tmp_path / "q.msg", MESSAGE)
    courier = MaildirCourier(tmp_path / "mail", "mx.example.com", fsync=False)
    rcpt = Recipient(address="ghost@example.com", kind=RecipientKind.LOCAL,
                     original="list@example.com", mailbox="")
    [result] = await courier.deliver(envelope(rcpt), [rcpt], data)
    assert result.outcome is Outcome.FAILED and result.status == "5.1.1"
    assert not (tmp_path / "mail").exists()
