"""The ``mta`` admin command and the control channel.

In-process tests run the real :class:`mta.daemon.service.MTAService` (queue store,
runner, Maildir delivery) with its control socket in this process; only the
remote courier is replaced by one whose deliveries the test finishes, so a
message can be "being delivered right now".  The blocking CLI runs in a
thread (``main([...])``, output captured by capsys) while the reactor serves.
The last tests start the real ``twistd -n mta`` daemon and run the console
entry as a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mta.admin import cli
from mta.admin.control import ControlError, DaemonNotRunning, call
from mta.config import load_config
from mta.daemon.control import (
    ControlService,
    ControlSocketError,
    prepare_socket_path,
)
from mta.daemon.service import MTAService, build_control
from mta.policy.auth import add_user, read_users_file
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient
from mta.queue.layout import open_message
from tests.daemon import QUIET_TAIL, Daemon, free_port

PASSWORD = "correct horse battery staple"
ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
control_socket = "{socket}"

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[limits]
max_message_size = 20000
max_received_headers = 5
""" + QUIET_TAIL

ALIASES = "info: alice\nteam: alice, bob, friend@remote.test\n"


def write_setup(root: Path, sock: Path, port: int = 0) -> Path:
    domain = root / "domains" / "example.test"
    domain.mkdir(parents=True)
    add_user(domain / "users", "alice", PASSWORD)
    add_user(domain / "users", "bob", PASSWORD)
    (domain / "aliases").write_text(ALIASES)
    path = root / "mta.toml"
    path.write_text(CONFIG.format(socket=sock, port=port, dead_port=free_port()))
    return path


@pytest.fixture
def sock_dir():
    """A short directory for the control socket (sun_path holds 107 octets)."""
    d = Path(tempfile.mkdtemp(prefix="mta", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class ManualCourier:
    """A remote courier whose deliveries stay in progress until the test answers them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Envelope, list[Recipient], Deferred]] = []

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((envelope, list(recipients), d))
        return d

    def pending(self) -> list[tuple[Envelope, list[Recipient], Deferred]]:
        return [c for c in self.calls if not c[2].called]

    def answer_all(self, outcome: Outcome = Outcome.DEFERRED,
                   reply: str = "451 4.4.1 try later") -> None:
        for _env, rcpts, d in self.pending():
            d.callback([DeliveryResult(r, outcome, reply) for r in rcpts])


class Running:
    """The in-process daemon of one test."""

    def __init__(self, root: Path, sock: Path) -> None:
        self.root = root
        self.sock = sock
        self.config_path = write_setup(root, sock)
        self.config = load_config(self.config_path)
        self.service = MTAService(self.config, reactor=reactor, config_path=self.config_path)
        self.remote = ManualCourier()
        self.service.runner.router.couriers["remote"] = self.remote
        if "control" not in self.service.namedServices:
            self.service.addService(build_control(self.service))

    @property
    def store(self) -> Any:
        return self.service.context.store

    async def start(self) -> None:
        self.service.startService()
        await self.service.listening

    async def stop(self) -> None:
        self.remote.answer_all()
        await self.service.stopService()

    def maildir(self, user: str) -> list[bytes]:
        new = self.root / "var" / "mail" / "example.test" / user / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def running(tmp_path, sock_dir):
    r = Running(tmp_path, sock_dir / "control.sock")
    pytest_twisted.blockon(Deferred.fromCoroutine(r.start()))
    yield r
    pytest_twisted.blockon(Deferred.fromCoroutine(r.stop()))


async def until(predicate, timeout: float = 5.0) -> None:
    """Let the reactor run until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.01, lambda: None)


def run_cli(*args: str, stdin: bytes | None = None) -> Deferred:
    """``cli.main`` in a thread (it blocks on the socket while the reactor serves)."""
    def run() -> int:
        saved = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            return cli.main(list(args))
        finally:
            sys.stdin = saved
    return deferToThread(run)


def submit(r: Running, recipients: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n",
           sender: str = "alice@example.test") -> Deferred:
    import base64

    return deferToThread(call, r.sock, "submit", sender=sender, recipients=recipients,
                         message=base64.b64encode(body).decode())


# --- the control channel, in process ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_socket_is_private_and_status_answers(running):
    mode = running.sock.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    answer = await deferToThread(call, running.sock, "status")
    assert answer["ok"] is True and answer["pid"] == os.getpid()
    assert answer["hostname"] == "mx.example.test" and answer["queued"] == 0
    assert answer["delivery"] is True


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_errors_in_order_on_one_connection(running):
    def dialog() -> list[dict]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(running.sock))
            s.sendall(b'not json\n{"command": "nope"}\n["x"]\n{"command": "delete", '
                      b'"id": "../../etc/passwd"}\n{"command": "status"}\n')
            buf = b""
            while buf.count(b"\n") < 5:
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
        return [json.loads(line) for line in buf.splitlines()]

    answers = await deferToThread(dialog)
    assert [a["ok"] for a in answers] == [False, False, False, False, True]
    assert "one line of JSON" in answers[0]["error"]
    assert answers[1]["error"] == "unknown command 'nope'" and answers[1]["code"] == "usage"
    assert answers[3]["code"] == "usage" and "queue id" in answers[3]["error"]


@pytest_twisted.ensureDeferred
async def test_overlong_request_is_refused_and_closed(running):
    def dialog() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(running.sock))
            chunk = b"x" * 65536
            try:
                for _ in range(200):  # 13 MB without a newline; the limit is ~3 MB here
                    s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = b""
            while True:
                try:
                    part = s.recv(65536)
                except ConnectionResetError:
                    break
                if not part:
                    break
                data += part
            return data

    data = await deferToThread(dialog)
    answer = json.loads(data.splitlines()[0])
    assert answer["ok"] is False and "longer than" in answer["error"]


@pytest_twisted.ensureDeferred
async def test_submit_queues_like_smtp_submission(running):
    body = (b"From: Alice <alice@example.test>\r\nTo: info@example.test\r\n"
            b"Bcc: secret@remote.test,\r\n  other@remote.test\r\nSubject: hello\r\n\r\n"
            b".leading dot\r\nbody\r\n")
    answer = await submit(running, ["info@example.test", "friend@remote.test"], body)
    queue_id = answer["id"]
    with open_message(running.store.data_path(queue_id)) as q:
        data = q.read()
    env = running.store.load(queue_id)
    assert data.startswith(b"Received: from localhost (uid=")
    assert f"by mx.example.test with ESMTP id {queue_id}".encode() in data
    assert b"Bcc" not in data and b"secret@" not in data and b"other@remote" not in data
    assert b"\r\nDate: " in data and b"\r\nMessage-ID: <" in data and b"@mx.example.test>" in data
    assert data.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
    assert env.sender == "alice@example.test"
    # The alias was expanded for the local recipient; the remote one is relayed.
    assert [(str(r.kind), r.address, r.mailbox, r.original) for r in env.recipients] == [
        ("local", "alice@example.test", "alice@example.test", "info@example.test"),
        ("remote", "friend@remote.test", "", "friend@remote.test"),
    ]
    assert env.extra["local_uid"] == os.getuid()
    # The runner was told: alice's copy arrives in her Maildir.
    await until(lambda: running.maildir("alice"))
    assert b"Subject: hello" in running.maildir("alice")[0]


@pytest_twisted.ensureDeferred
async def test_submit_forwarding_gets_an_srs_sender_as_over_smtp(running):
    queue_id = (await submit(running, ["team@example.test"], sender="someone@else.test"))["id"]
    env = running.store.load(queue_id)
    assert env.sender == "someone@else.test"
    assert env.extra["srs_recipients"] == ["friend@remote.test"]
    srs_sender = env.extra["srs_sender"]
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("@example.test")
    assert running.service.context.srs.reverse(srs_sender) == "someone@else.test"


@pytest_twisted.ensureDeferred
async def test_submit_refusals_queue_nothing(running):
    cases = [
        (["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n", "recipient", "5.1.1"),
        ([], b"Subject: x\r\n\r\nx\r\n", "usage", "no recipients"),
        (["alice@example.test"], b"Subject: x\n\nbare LF\n", "data", "bare CR or LF"),
        (["alice@example.test"], b"Subject: x\r\n\r\n" + b"y" * 30000 + b"\r\n", "data",
         "longer than 998"),
        (["alice@example.test"], b"Subject: x\r\n\r\n" + (b"y" * 900 + b"\r\n") * 30, "data",
         "larger than the limit of 20000"),
        (["alice@example.test"], b"Received: x\r\n" * 6 + b"\r\nloop\r\n", "data", "mail loop"),
    ]
    for recipients, body, code, text in cases:
        with pytest.raises(ControlError) as info:
            await submit(running, recipients, body)
        assert info.value.code == code and text in str(info.value), (text, str(info.value))
    with pytest.raises(ControlError) as info:
        await submit(running, ["alice@example.test"], sender="not an address")
    assert info.value.code == "usage"
    assert running.store.ids() == []
    assert list(running.store.tmp_dir.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_queue_list_and_show(running, capsys):
    first = (await submit(running, ["friend@remote.test", "other@remote.test"]))["id"]
    await until(lambda: len(running.remote.pending()) == 1)
    running.remote.answer_all(Outcome.DEFERRED, "451 4.4.1 connection refused")
    await until(lambda: running.store.load(first).recipients[0].attempts == 1
                and not running.service.runner.busy(first))
    second = (await submit(running, ["far@remote.test"], sender=""))["id"]
    capsys.readouterr()
    assert await run_cli("--config", str(running.config_path), "queue", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATE", "LAST",
                                "REPLY"]
    column = lines[0].index("RECIPIENT")
    assert lines[1].startswith(first) and "alice@example.test" in lines[1]
    assert lines[1][column:].startswith("friend@remote.test")
    assert "deferred  451 4.4.1 connection refused" in lines[1]
    assert lines[2][column:].startswith("other@remote.test") and lines[2][:column].strip() == ""
    assert lines[3].startswith(second) and "<>" in lines[3]
    assert lines[-1] == "-- 2 messages, " + cli.human_size(
        running.store.load(first).size + running.store.load(second).size) + " in total"

    assert await run_cli("queue", "list", "--json", "--config", str(running.config_path)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == [first, second]
    assert listed[0]["recipients"][0]["state"] == "deferred" and listed[0]["age"] >= 0

    assert await run_cli("queue", "show", first, "--config", str(running.config_path)) == 0
    out = capsys.readouterr().out
    assert f"Queue ID:  {first}" in out and "Sender:    <alice@example.test>" in out
    assert "friend@remote.test  remote  deferred  1" in out
    assert "Received: from localhost" in out and "Subject: t" in out and "\nhi" not in out

    assert await run_cli("queue", "show", "0123abcd", "--config", str(running.config_path)) == 1
    assert "no message 0123abcd" in capsys.readouterr().err
    assert await run_cli("queue", "show", "../x", "--config", str(running.config_path)) == 1
    assert "is not a queue id" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_flush_retries_now(running, capsys):
    queue_id = (await submit(running, ["friend@remote.test"]))["id"]
    await until(lambda: len(running.remote.calls) == 1)
    running.remote.answer_all()
    await until(lambda: not running.service.runner.busy(queue_id))
    assert running.store.load(queue_id).recipients[0].next_attempt > time.time() + 3000
    assert await run_cli("--config", str(running.config_path), "queue", "flush", queue_id) == 0
    assert capsys.readouterr().out == "flushed 1 message: delivery is being attempted now\n"
    await until(lambda: len(running.remote.calls) == 2)
    running.remote.answer_all()
    assert await run_cli("--config", str(running.config_path), "queue", "flush") == 0
    assert "flushed 1 message" in capsys.readouterr().out
    await until(lambda: len(running.remote.calls) == 3)
    running.remote.answer_all()
    assert await run_cli("--config", str(running.config_path), "queue", "flush",
                         "00000000aaaaaaaaaaaa") == 1
    assert "no message 00000000aaaaaaaaaaaa in the queue" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_delete_refused_while_delivering_then_done(running, capsys):
    queue_id = (await submit(running, ["friend@remote.test"]))["id"]
    await until(lambda: running.remote.pending())
    assert await run_cli("--config", str(running.config_path), "queue", "delete", queue_id) == 1
    err = capsys.readouterr().err
    assert f"message {queue_id} is being delivered right now" in err
    assert running.store.exists(queue_id)
    running.remote.answer_all()
    await until(lambda: not running.service.runner.busy(queue_id))
    assert await run_cli("--config", str(running.config_path), "queue", "delete", queue_id) == 0
    assert capsys.readouterr().out == f"deleted {queue_id}\n"
    assert not running.store.exists(queue_id)
    assert not running.store.data_path(queue_id).exists()
    # The runner forgot it: its retry timer is gone (the leak check would see it).
    assert queue_id not in running.service.runner._timers
    assert await run_cli("--config", str(running.config_path), "queue", "delete", queue_id) == 1
    assert "no message" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_bounce_fails_pending_recipients_and_notifies_sender(running, capsys):
    queue_id = (await submit(running, ["friend@remote.test", "info@example.test"]))["id"]
    await until(lambda: running.maildir("alice") and running.remote.pending())
    assert await run_cli("--config", str(running.config_path), "queue", "bounce", queue_id) == 1
    assert "being delivered right now" in capsys.readouterr().err
    running.remote.answer_all()
    await until(lambda: not running.service.runner.busy(queue_id))
    assert await run_cli("--config", str(running.config_path), "queue", "bounce", queue_id) == 0
    assert capsys.readouterr().out == (f"bounced {queue_id}: 1 recipient failed, the sender "
                                       "is notified\n")
    assert not running.store.exists(queue_id)
    # The bounce reaches alice (the sender) in her Maildir, next to the copy she got.
    await until(lambda: len(running.maildir("alice")) == 2)
    dsn = [m for m in running.maildir("alice") if b"delivery-status" in m][0]
    assert b"friend@remote.test" in dsn and b"Status: 5.0.0" in dsn
    assert b"delivery cancelled by the mail administrator" in dsn
    assert b"Action: failed" in dsn


@pytest_twisted.ensureDeferred
async def test_user_add_passwd_remove_reload_the_daemon(running, capsys):
    config = str(running.config_path)
    users_file = running.config.users_file("example.test")
    assert await run_cli("user", "add", "example.test", "Carol", "--config", config,
                         stdin=b"s3cret pass\nignored\n") == 0
    assert capsys.readouterr().out == f"{users_file} updated; the daemon has reloaded\n"
    assert "carol" in read_users_file(users_file)
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    users = running.service.context.users
    assert await users.authenticate("carol@example.test", "s3cret pass") == "carol@example.test"

    assert await run_cli("user", "passwd", "example.test", "carol", "--config", config,
                         stdin=b"new one\n") == 0
    capsys.readouterr()
    users = running.service.context.users
    assert await users.authenticate("carol@example.test", "new one") == "carol@example.test"
    assert await users.authenticate("carol@example.test", "s3cret pass") is None

    assert await run_cli("user", "list", "example.test", "--config", config) == 0
    assert capsys.readouterr().out.split() == ["alice@example.test", "bob@example.test",
                                               "carol@example.test"]
    assert await run_cli("user", "remove", "example.test", "carol", "--config", config) == 0
    capsys.readouterr()
    assert not running.service.context.users.exists("carol", "example.test")

    # Mistakes say what is wrong and change nothing.
    before = users_file.read_bytes()
    assert await run_cli("user", "add", "example.test", "alice", "--config", config,
                         stdin=b"x\n") == 1
    assert "already exists" in capsys.readouterr().err
    assert await run_cli("user", "add", "other.test", "dave", "--config", config,
                         stdin=b"x\n") == 1
    assert "other.test is not a local domain" in capsys.readouterr().err
    assert await run_cli("user", "add", "example.test", "dave", "--config", config,
                         stdin=b"\n") == 1
    assert "empty password" in capsys.readouterr().err
    assert await run_cli("user", "passwd", "example.test", "nobody", "--config", config,
                         stdin=b"x\n") == 1
    assert "no user 'nobody'" in capsys.readouterr().err
    assert users_file.read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_reload_reports_the_daemons_error(running, capsys):
    config = str(running.config_path)
    assert await run_cli("reload", "--config", config) == 0
    assert capsys.readouterr().out == "reloaded\n"
    aliases = running.config.aliases_file("example.test")
    aliases.write_text("broken line without colon\n")
    assert await run_cli("reload", "--config", config) == 1
    err = capsys.readouterr().err
    assert err.startswith("mta: reload failed: ") and "aliases:1" in err
    # The daemon kept its working aliases.
    assert running.service.context.aliases.exists("info", "example.test")
    # A user change while the daemon cannot reload is made, and the problem is told.
    assert await run_cli("user", "add", "example.test", "erin", "--config", config,
                         stdin=b"pw\n") == 1
    captured = capsys.readouterr()
    assert "updated" in captured.out and "did not reload" in captured.err


@pytest_twisted.ensureDeferred
async def test_status_command(running, capsys):
    assert await run_cli("status", "--config", str(running.config_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"running: pid {os.getpid()}, mx.example.test, up ")
    assert "queue: 0 messages, 0 in delivery" in out and "listener mx: tcp:0" in out


# --- control socket life cycle ---------------------------------------------------------------


class _Commands:
    """Stands in for ControlCommands where only the socket matters."""


def test_stale_socket_is_replaced_and_a_live_one_refused(sock_dir):
    path = sock_dir / "sub" / "c.sock"
    prepare_socket_path(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # A socket file nobody listens on (a daemon that was killed) is removed.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    prepare_socket_path(path)
    assert not path.exists()
    # A socket someone answers on belongs to a running daemon: refused, kept.
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(ControlSocketError, match="another daemon is listening"):
            prepare_socket_path(path)
        assert path.exists()
    finally:
        live.close()
        path.unlink()
    # Anything else is never removed.
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "precious"
    with pytest.raises(ControlSocketError, match="longer than 107"):
        prepare_socket_path(sock_dir / ("x" * 120))


@pytest_twisted.ensureDeferred
async def test_service_removes_its_socket_on_stop_and_refuses_a_second_daemon(sock_dir):
    path = sock_dir / "c.sock"
    first = ControlService(path, _Commands(), reactor, 1024)  # type: ignore[arg-type]
    first.startService()
    second = ControlService(path, _Commands(), reactor, 1024)  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="another daemon is listening"):
        second.startService()
    second.running = False
    await first.stopService()
    assert not path.exists()
    with pytest.raises(DaemonNotRunning):
        await deferToThread(call, path, "status")


class _OnlyQueue:
    """The queue as ControlCommands sees it (QueueFiles): nothing else is there."""

    __slots__ = ("queued",)

    def __init__(self, queued: list[str]) -> None:
        self.queued = queued

    def exists(self, queue_id: str) -> bool:
        return queue_id in self.queued

    def ids(self) -> list[str]:
        return list(self.queued)

    def remove(self, queue_id: str) -> None:
        self.queued.remove(queue_id)


class _OnlyLive:
    """The running state as ControlCommands sees it (Live): config and accepting only."""

    __slots__ = ("accepting", "config")

    def __init__(self, config: Any, accepting: bool) -> None:
        self.config, self.accepting = config, accepting


@pytest_twisted.ensureDeferred
async def test_control_commands_work_with_only_the_collaborators_they_are_given(tmp_path, sock_dir):
    """The commands get the running state, the queue, a submit function and no
    runner, not the daemon: over the real socket, status, delete and submit
    answer from those alone, and a daemon that stops accepting is seen at once."""
    from twisted.internet.task import Clock

    from mta.daemon.control import ControlCommands

    config = load_config(write_setup(tmp_path, sock_dir / "unused.sock"))
    queue = _OnlyQueue(["6b0a3e032267e810cec1", "6b0a3e032267e810cec2"])
    live = _OnlyLive(config, accepting=False)
    submitted: list[tuple[str, list[str], bytes, int | None]] = []

    def submit(sender: str, recipients: list[str], data: bytes, submitter: Any) -> str:
        submitted.append((sender, recipients, data, submitter.uid))
        return "6b0a3e032267e810cec3"

    path = sock_dir / "c.sock"
    commands = ControlCommands(live, queue, None, submit, None, Clock())
    service = ControlService(path, commands, reactor, 1024 * 1024)
    service.startService()
    try:
        status = await deferToThread(call, path, "status")
        assert (status["queued"], status["delivery"], status["in_flight"]) == (2, False, 0)
        assert status["hostname"] == config.hostname
        assert await deferToThread(call, path, "delete", id="6b0a3e032267e810cec1") == {
            "ok": True, "id": "6b0a3e032267e810cec1"}
        assert queue.queued == ["6b0a3e032267e810cec2"]
        message = base64.b64encode(b"Subject: hi\r\n\r\nbody\r\n").decode()
        with pytest.raises(ControlError) as refused:
            await deferToThread(call, path, "submit", sender="root@example.test",
                                recipients=["alice@example.test"], message=message)
        assert refused.value.code == "temporary" and submitted == []
        live.accepting = True
        answer = await deferToThread(call, path, "submit", sender="root@example.test",
                                     recipients=["alice@example.test"], message=message)
        assert answer == {"ok": True, "id": "6b0a3e032267e810cec3"}
        assert submitted == [("root@example.test", ["alice@example.test"],
                              b"Subject: hi\r\n\r\nbody\r\n", os.getuid())]
        with pytest.raises(ControlError) as no_runner:
            await deferToThread(call, path, "flush")
        assert no_runner.value.code == "unavailable"
    finally:
        await service.stopService()


def test_cli_without_daemon(tmp_path, sock_dir, capsys):
    config = str(write_setup(tmp_path, sock_dir / "c.sock"))
    (tmp_path / "var" / "queue" / "msg").mkdir(parents=True)
    for args in (["queue", "flush"], ["queue", "bounce", "0123abcd"], ["reload"], ["status"]):
        assert cli.main([*args, "--config", config]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mta: the mta daemon is not running (nothing listens on "), err
        assert "start it first" in err
    # delete works on the files directly, since nothing else touches them.
    msg = tmp_path / "var" / "queue" / "msg"
    (msg / "0123abcd.json").write_text("{}")
    (msg / "0123abcd.msg").write_text("x")
    (msg / "0123abce.msg").write_bytes(b"mta-envelope 2\n{}Received: x\r\n")
    assert cli.main(["queue", "delete", "0123abcd", "--config", config]) == 0
    assert "daemon is not running: removed its queue files" in capsys.readouterr().out
    assert cli.main(["queue", "delete", "0123abce", "--config", config]) == 0
    assert "daemon is not running: removed its queue files" in capsys.readouterr().out
    assert list(msg.iterdir()) == []
    # A spare queue file (empty, write-only) left by a stopped daemon is no message.
    (msg / "0123abcf.msg").touch(mode=0o200)
    assert cli.main(["queue", "delete", "0123abcf", "--config", config]) == 1
    assert "no message 0123abcf" in capsys.readouterr().err
    (msg / "0123abcf.msg").unlink()
    assert cli.main(["queue", "list", "--config", config]) == 0
    assert capsys.readouterr().out == "queue is empty\n"
    # A user change with the daemon stopped is simply made.
    assert cli.main(["user", "remove", "example.test", "bob", "--config", config]) == 0
    assert "daemon is not running" in capsys.readouterr().out


def test_queue_list_without_queue_dir_and_bad_config(tmp_path, sock_dir, capsys):
    config = str(write_setup(tmp_path, sock_dir / "c.sock"))
    assert cli.main(["queue", "list", "--config", config]) == 1
    assert "no queue at" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()  # nothing created
    assert cli.main(["status", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "configuration error" in capsys.readouterr().err
    assert cli.main([]) == 2


# --- alias resolve, check-config -------------------------------------------------------------


def test_alias_resolve(tmp_path, sock_dir, capsys):
    config = str(write_setup(tmp_path, sock_dir / "c.sock"))
    assert cli.main(["alias", "resolve", "Team@Example.test", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "KIND    ADDRESS             MAILBOX",
        "local   alice@example.test  alice@example.test",
        "local   bob@example.test    bob@example.test",
        "remote  friend@remote.test  -",
    ]
    assert cli.main(["alias", "resolve", "alice+tag@example.test", "--json",
                     "--config", config]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"kind": "local", "address": "alice+tag@example.test", "mailbox": "alice@example.test"}]
    assert cli.main(["alias", "resolve", "x@else.test", "--config", config]) == 0
    assert "else.test is not local" in capsys.readouterr().out
    assert cli.main(["alias", "resolve", "ghost@example.test", "--config", config]) == 1
    assert "ghost@example.test: refused with 550 5.1.1" in capsys.readouterr().err
    # A bounce to an address the daemon SRS-rewrote goes back to the original sender.
    from mta.policy.srs import SRSRewriter

    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "srs-secret").write_text("s3cret\n")
    bounce = SRSRewriter("s3cret").forward("someone@else.test", "example.test")
    assert cli.main(["alias", "resolve", bounce, "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"kind": "remote", "address": "someone@else.test", "mailbox": ""}]
    forged = bounce.replace("SRS0=", "SRS0=x")
    assert cli.main(["alias", "resolve", forged, "--config", config]) == 1
    assert "refused with 550 5.1.1" in capsys.readouterr().err


def test_check_config(tmp_path, sock_dir, capsys):
    path = write_setup(tmp_path, sock_dir / "c.sock")
    config = str(path)
    assert cli.main(["check-config", "--config", config]) == 0
    assert capsys.readouterr().out == "configuration OK\n"
    domain = tmp_path / "domains" / "example.test"
    (domain / "aliases").write_text("a: b\nb: a\nbad\n")
    (domain / "users").write_text("alice not-a-hash\n")
    (tmp_path / "afile").write_text("")
    text = path.read_text().replace('hostname = "mx.example.test"',
                                    'hostname = "mx.example.test"\nqueue_dir = "afile/q"')
    path.write_text(text.replace("[spf]", '[tls]\ncert_file = "nope.pem"\n'
                                          'key_file = "nope.key"\n\n[spf]'))
    assert cli.main(["check-config", "--config", config]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tls: ") and "nope.pem" in line for line in lines), lines
    assert f"{domain / 'users'}:1: bad password hash for 'alice': not a $scrypt$n=N,r=R,p=P$salt$key hash" in lines
    assert f"{domain / 'aliases'}:3: expected 'name: target, target...'" in lines
    assert f"queue_dir: {tmp_path / 'afile'} is not a directory" in lines
    # The aliases file is unreadable as a whole, so its loop is not reported separately.
    (domain / "aliases").write_text("a: b\nb: a\n")
    (domain / "users").write_text("")
    path.write_text(CONFIG.format(socket=sock_dir / "c.sock", port=0, dead_port=1))
    assert cli.main(["check-config", "--config", config]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{domain / 'aliases'}: alias 'a': a@example.test: aliases loop and deliver nowhere",
        f"{domain / 'aliases'}: alias 'b': b@example.test: aliases loop and deliver nowhere",
    ]
    path.write_text("hostname = 3\n")
    assert cli.main(["check-config", "--config", config]) == 1
    assert "hostname: must be a str" in capsys.readouterr().err


def test_helpers():
    assert cli.format_table(["A", "BB", "C"], [["xxx", "y", "last col"], ["", "", "z"]]) == [
        "A    BB  C", "xxx  y   last col", "         z"]
    assert [cli.human_age(s) for s in (5, 150, 7300, 200000)] == ["5s", "2m", "2h", "2d"]
    assert [cli.human_size(n) for n in (900, 1536, 3 * 1024 * 1024)] == ["900", "1.5K", "3.0M"]
    stream = io.StringIO()
    ticks = iter(range(1000))
    progress = cli.Progress(stream, 300, "reading", enabled=True, interval=10,
                            clock=lambda: next(ticks) * 1.0)
    for i in range(1, 301):
        progress.update(i)
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\rreading 1/300") and "\rreading 300/300" in text
    assert text.count("\r") == 32 and text.endswith("\r\033[K")
    quiet = io.StringIO()
    small = cli.Progress(quiet, 10, "reading", enabled=True)
    small.update(10)
    small.finish()
    assert quiet.getvalue() == ""


# --- the real daemon and the console entry ---------------------------------------------------


def run_entry(module: str, *args: str, stdin: bytes = b"", cwd: Path | None = None
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MTA_CONFIG", None)
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, cwd=cwd,
                          env=env, capture_output=True, timeout=60)


def test_console_entry_against_the_real_daemon(tmp_path, sock_dir):
    port = free_port()
    path = write_setup(tmp_path, sock_dir / "control.sock", port)
    config = ["--config", str(path)]
    daemon = Daemon(tmp_path, path, port)
    daemon.start()
    try:
        result = run_entry("mta.admin.cli", "status", "--json", *config)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["pid"] == daemon.proc.pid and status["queued"] == 0
        result = run_entry("mta.admin.sendmail", "-C", str(path), "-f", "alice@example.test",
                           "friend@remote.test", stdin=b"Subject: via twistd\n\nhello\n")
        assert result.returncode == 0, result.stderr
        result = run_entry("mta.admin.cli", "queue", "list", "--json", *config)
        (message,) = json.loads(result.stdout)
        assert message["sender"] == "alice@example.test"
        assert message["recipients"][0]["address"] == "friend@remote.test"
        queue_id = message["id"]
        deadline = time.monotonic() + 20
        while json.loads(run_entry("mta.admin.cli", "queue", "show", queue_id, "--json", *config)
                         .stdout)["envelope"]["recipients"][0]["state"] != "deferred":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = run_entry("mta.admin.cli", "queue", "delete", queue_id, *config)
        assert result.returncode == 0 and result.stdout == f"deleted {queue_id}\n".encode()
        result = run_entry("mta.admin.cli", "user", "add", "example.test", "zed", *config,
                           stdin=b"pw pw\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(b"the daemon has reloaded\n")
        assert "configuration reloaded" in daemon.read_log()
    finally:
        daemon.terminate()
    assert not (sock_dir / "control.sock").exists()
    result = run_entry("mta.admin.cli", "queue", "flush", *config)
    assert result.returncode == 1
    assert b"the mta daemon is not running" in result.stderr


def test_dkim_keygen_writes_key_and_prints_record(tmp_path, capsys):
    import re

    from mta.policy.dkim import DKIMSigner

    config = tmp_path / "mta.toml"
    config.write_text(f'hostname = "mx.example.test"\nlocal_domains = ["example.test"]\n'
                      f'domains_dir = "{tmp_path / "domains"}"\n')
    assert cli.main(["dkim-keygen", "Example.Test", "s2026", "--type", "ed25519", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    key = tmp_path / "domains" / "example.test" / "dkim-s2026.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert "s2026._domainkey.example.test. IN TXT" in out
    assert re.search(r'"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/=]+"', out)
    assert 'selector = "s2026"' in out
    # The key signs, and a second run refuses to overwrite it.
    signer = DKIMSigner({"example.test": [("s2026", key)]})
    assert signer.sign(b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n", "example.test")
    assert cli.main(["dkim-keygen", "example.test", "s2026", "--config", str(config)]) == 1
    assert "exists already" in capsys.readouterr().err
