"""The control channel: admin commands to the running daemon over a Unix socket.

The daemon listens on ``config.control_socket`` (mode 0600, so only its own
user and root may connect; a missing parent directory is created 0700).  The
protocol is one JSON object per line each way::

    → {"command": "flush", "id": "6650a1b2c3d4e5f6a7b8"}
    ← {"ok": true, "messages": 1}
    ← {"ok": false, "error": "no message 6650a1b2c3d4e5f6a7b8 in the queue", "code": "not_found"}

Commands: ``status``; ``flush`` [id]; ``delete`` id; ``bounce`` id;
``release`` id (out of the hold queue, delivered now; code ``not_held`` when
it is not held); ``submit`` sender, recipients, message (base64); ``reload``.  Requests on one
connection are answered in order.  ``code`` in an error names its kind for
scripts: usage, not_found, busy, unavailable, reload, internal, or one of
:mod:`mta.intake.submit`'s kinds (recipient, data, temporary).

This module is the server side (:class:`ControlService` around
:class:`ControlCommands`, built by :mod:`mta.daemon.service`),
run in the daemon's reactor, and the protocol's shared limits; the client side
(:func:`mta.admin.control.call`) is plain blocking code for the ``mta`` and
``sendmail`` commands, which run no reactor.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import Config

log = Logger()

# Queue ids are hex today; allowing only letters and digits keeps any id a
# plain file name (no "/", no "..") whatever the store's format becomes.
QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}\Z")
# Linux limits sun_path to 108 octets including the final NUL.
MAX_SOCKET_PATH = 107
IDLE_TIMEOUT = 300.0


def valid_queue_id(text: str) -> bool:
    return bool(QUEUE_ID.match(text))


# --- the commands (in the daemon) ------------------------------------------------------


class CommandError(Exception):
    """A command cannot be carried out; sent back as ``ok: false``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


Reload = Callable[[], Any]  # returns a value or a Deferred; raises / errbacks on failure
# Queues one message (sender, recipients, message, submitter) and returns its id,
# or a Deferred firing with it; raises (or errbacks) mta.intake.submit.SubmitError.  The composition root binds it to the
# running store, configuration and aliases (mta.intake.submit.submit_message).
Submit = Callable[[str, list[str], bytes, Any], Any]


class Live(TypingProtocol):
    """The daemon's running state, read at each command so that a reload or the
    start of a shutdown is seen (the SMTP server's context provides it,
    :class:`mta.smtp.server.ServerContext`)."""

    config: Config
    accepting: bool


class QueueFiles(TypingProtocol):
    """What the commands need of the queue store (:class:`mta.queue.store.QueueStore`)."""

    def exists(self, queue_id: str) -> bool: ...

    def ids(self) -> list[str]: ...

    def remove(self, queue_id: str) -> None: ...


class Runner(TypingProtocol):
    """What the commands need of the queue runner (:class:`mta.queue.runner.QueueRunner`)."""

    @property
    def in_flight(self) -> int: ...

    def flush(self, queue_id: str | None = None) -> int: ...

    def delete(self, queue_id: str) -> None: ...

    def bounce(self, queue_id: str) -> Any:
        """How many recipients failed, or a Deferred firing with that."""

    def release(self, queue_id: str) -> None:
        """Out of the hold queue, delivered now (issue 17)."""


class ControlCommands:
    """Carries out control commands against the daemon's queue, runner and policies.

    ``live`` gives the running configuration (and whether the daemon still
    accepts mail) at each command, so a reload is seen; ``queue`` is the queue
    store; ``runner`` the queue runner, or None when delivery is off;
    ``submit`` queues a local submission, or None; ``reload`` is the daemon's
    reload callable, or None.
    """

    def __init__(self, live: Live, queue: QueueFiles, runner: Runner | None,
                 submit: Submit | None, reload: Reload | None,
                 clock: IReactorTime) -> None:
        self.live = live
        self.queue = queue
        self.runner = runner
        self.submit = submit
        self.reload_callable = reload
        self.clock = clock
        self.started = clock.seconds()

    @property
    def config(self) -> Config:
        return self.live.config

    def dispatch(self, request: Any, peer: dict[str, int]) -> Deferred[dict[str, Any]]:
        """Carry out one request; fires with the answer (never errbacks)."""
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return _answer_error(CommandError("a request is a JSON object with a "
                                              "\"command\" string", "usage"))
        command = request["command"]
        handler = getattr(self, "do_" + command, None) if command.isidentifier() else None
        if handler is None:
            return _answer_error(CommandError(f"unknown command {command!r}", "usage"))
        log.info("control command {command} from uid {uid}", command=command,
                 uid=peer.get("uid"), id=request.get("id"), event="control")
        d = maybeDeferred(handler, request, peer)
        d.addCallback(lambda result: {"ok": True, **result})
        d.addErrback(_failure_answer, command)
        return d

    # --- helpers ---

    def _queue_id(self, request: dict[str, Any], required: bool = True) -> str | None:
        value = request.get("id")
        if value is None and not required:
            return None
        if not isinstance(value, str) or not valid_queue_id(value):
            raise CommandError(f"bad or missing queue id {value!r}", "usage")
        return value

    def _runner(self, what: str) -> Any:
        if self.runner is None:
            raise CommandError(f"cannot {what}: delivery is not running in this daemon",
                               "unavailable")
        return self.runner

    def _exists(self, queue_id: str) -> None:
        if not self.queue.exists(queue_id):
            raise CommandError(f"no message {queue_id} in the queue", "not_found")

    # --- commands ---

    def do_status(self, request: dict[str, Any], peer: dict[str, int]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "hostname": self.config.hostname,
            "uptime": round(self.clock.seconds() - self.started, 3),
            "queued": len(self.queue.ids()),
            "in_flight": self.runner.in_flight if self.runner is not None else 0,
            "held": getattr(self.runner, "held_count", 0),  # issue 17: the hold queue
            "delivery": self.runner is not None,
            "listeners": [{"name": lst.name, "endpoint": lst.endpoint, "kind": lst.kind}
                          for lst in self.config.listeners],
            "local_domains": list(self.config.local_domains),
        }

    def do_flush(self, request: dict[str, Any], peer: dict[str, int]) -> dict[str, Any]:
        queue_id = self._queue_id(request, required=False)
        runner = self._runner("flush the queue")
        if queue_id is not None:
            self._exists(queue_id)
        return {"messages": runner.flush(queue_id)}

    def do_delete(self, request: dict[str, Any], peer: dict[str, int]) -> dict[str, Any]:
        from mta.queue.runner import MessageBusy

        queue_id = self._queue_id(request)
        assert queue_id is not None
        self._exists(queue_id)
        if self.runner is None:
            self.queue.remove(queue_id)
            log.info("message {queue_id} deleted by the administrator", queue_id=queue_id,
                     event="deleted")
            return {"id": queue_id}
        try:
            self.runner.delete(queue_id)
        except MessageBusy as e:
            raise CommandError(str(e), "busy") from None
        except FileNotFoundError:
            raise CommandError(f"no message {queue_id} in the queue", "not_found") from None
        return {"id": queue_id}

    def do_bounce(self, request: dict[str, Any], peer: dict[str, int]) -> Deferred[dict[str, Any]]:
        from mta.queue.runner import MessageBusy

        queue_id = self._queue_id(request)
        assert queue_id is not None
        runner = self._runner("bounce a message")
        self._exists(queue_id)

        def refused(failure: Failure) -> Failure:
            if failure.check(MessageBusy):
                raise CommandError(failure.getErrorMessage(), "busy")
            if failure.check(FileNotFoundError):
                raise CommandError(f"no message {queue_id} in the queue", "not_found")
            return failure

        # The runner's answer may come at once or once the bounce is queued.
        return maybeDeferred(runner.bounce, queue_id).addCallbacks(
            lambda failed: {"id": queue_id, "failed": failed}, refused)

    def do_release(self, request: dict[str, Any], peer: dict[str, int]) -> dict[str, Any]:
        """Issue 17: a held message back into the active queue, delivered at once."""
        from mta.queue.runner import MessageBusy, NotHeld

        queue_id = self._queue_id(request)
        assert queue_id is not None
        runner = self._runner("release a message")
        self._exists(queue_id)
        try:
            runner.release(queue_id)
        except NotHeld as e:
            raise CommandError(str(e), "not_held") from None
        except MessageBusy as e:
            raise CommandError(str(e), "busy") from None
        except FileNotFoundError:
            raise CommandError(f"no message {queue_id} in the queue", "not_found") from None
        return {"id": queue_id}

    def do_submit(self, request: dict[str, Any], peer: dict[str, int]) -> Deferred[dict[str, Any]]:
        from mta.intake.submit import SubmitError, Submitter

        sender = request.get("sender", "")
        recipients = request.get("recipients")
        message = request.get("message")
        if not isinstance(sender, str):
            raise CommandError("sender must be a string (\"\" for the null sender)", "usage")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise CommandError("recipients must be a list of addresses", "usage")
        if not isinstance(message, str):
            raise CommandError("message must be the message in base64", "usage")
        try:
            data = base64.b64decode(message, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError("message is not valid base64", "usage") from None
        if self.submit is None:
            raise CommandError("this daemon cannot take submissions", "unavailable")
        if not self.live.accepting:
            raise CommandError("the daemon is shutting down; try again later", "temporary")
        submitter = Submitter(uid=peer.get("uid"), pid=peer.get("pid"))

        def refused(failure: Failure) -> None:
            failure.trap(SubmitError)
            raise CommandError(failure.getErrorMessage(), failure.value.kind)

        # The queue id may come at once or once the message is committed.
        return maybeDeferred(self.submit, sender, recipients, data, submitter).addCallbacks(
            lambda queue_id: {"id": queue_id}, refused)

    def do_reload(self, request: dict[str, Any], peer: dict[str, int]) -> Deferred[dict[str, Any]]:
        if self.reload_callable is None:
            raise CommandError("this daemon cannot reload", "unavailable")

        def done(result: Any) -> dict[str, Any]:
            if isinstance(result, dict):
                return {k: v for k, v in result.items() if k != "ok"}
            return {"message": result} if isinstance(result, str) else {}

        def failed(failure: Failure) -> Failure:
            # The reload's own message is what the admin needs to see.
            raise CommandError(f"reload failed: {failure.getErrorMessage()}", "reload")

        return maybeDeferred(self.reload_callable).addCallbacks(done, failed)


def _answer_error(error: CommandError) -> Deferred[dict[str, Any]]:
    d: Deferred[dict[str, Any]] = Deferred()
    d.callback({"ok": False, "error": str(error), "code": error.code})
    return d


def _failure_answer(failure: Failure, command: str) -> dict[str, Any]:
    if failure.check(CommandError):
        error = failure.value
        return {"ok": False, "error": str(error), "code": error.code}
    log.failure("control command {command} failed", failure, command=command)
    return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}",
            "code": "internal"}


# --- the protocol ------------------------------------------------------------------------


class ControlProtocol(Protocol):
    """One control connection: JSON lines in, JSON lines out, answered in order.

    Lines are collected as a list of chunks and only new data is searched for
    the newline, so a large ``submit`` costs linear time.
    """

    def __init__(self, factory: ControlFactory) -> None:
        self.factory = factory
        self.peer: dict[str, int] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._requests: deque[bytes] = deque()
        self._busy = False
        self._closed = False
        self._timer: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        self.peer = peer_credentials(self.transport)
        self.factory.connections.add(self)
        self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self._closed = True
        self.factory.connections.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _idle(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout)
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            self._chunks.append(data[start:end])
            self._requests.append(b"".join(self._chunks))
            self._chunks, self._size = [], 0
            start = end + 1
        if start < len(data):
            self._chunks.append(data[start:])
            self._size += len(data) - start
            if self._size > self.factory.max_line:
                self._chunks, self._size = [], 0
                self._send({"ok": False, "code": "usage",
                            "error": f"request longer than {self.factory.max_line} octets"})
                self._closed = True
                self.transport.loseConnection()
                return
        self._next()

    def _next(self) -> None:
        while not self._busy and self._requests and not self._closed:
            line = self._requests.popleft()
            try:
                request = json.loads(line)
            except ValueError:
                self._send({"ok": False, "error": "a request is one line of JSON",
                            "code": "usage"})
                continue
            self._busy = True
            self.factory.commands.dispatch(request, self.peer).addCallback(self._answered)

    def _answered(self, answer: dict[str, Any]) -> None:
        self._busy = False
        if self._closed:
            return
        self._send(answer)
        self._next()

    def _send(self, answer: dict[str, Any]) -> None:
        self.transport.write(json.dumps(answer, ensure_ascii=False).encode("utf-8") + b"\n")


def peer_credentials(transport: Any) -> dict[str, int]:
    """``{"pid", "uid", "gid"}`` of the process at the other end (Linux SO_PEERCRED)."""
    try:
        handle = transport.getHandle()
        raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"pid": pid, "uid": uid, "gid": gid}


class ControlFactory(Factory):
    def __init__(self, commands: ControlCommands, clock: IReactorTime, max_line: int,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.commands = commands
        self.clock = clock
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.connections: set[ControlProtocol] = set()

    def buildProtocol(self, addr: Any) -> ControlProtocol:  # noqa: N802
        return ControlProtocol(self)


def max_request_size(config: Config) -> int:
    """Room for a ``submit`` of a message somewhat over the limit, in base64.

    Over the size limit but under this, the submission gets a proper "too big"
    answer from the DATA reader rather than a cut connection.
    """
    return (config.limits.max_message_size + 1024 * 1024) * 2 + 1024 * 1024


# --- the service -----------------------------------------------------------------------


class ControlSocketError(Exception):
    """The control socket cannot be created."""


def prepare_socket_path(path: Path) -> None:
    """Make the parent directory (0700 if new) and remove a stale socket file.

    A socket someone still answers on belongs to a running daemon: refused.
    Anything there that is not a socket is never removed.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlSocketError(f"control socket path {path} is longer than "
                                 f"{MAX_SOCKET_PATH} octets")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlSocketError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    with probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            pass  # stale: left by a daemon that died
        except OSError as e:
            raise ControlSocketError(f"{path}: {e.strerror or e}") from None
        else:
            raise ControlSocketError(f"another daemon is listening on {path}")
    log.info("removing stale control socket {path}", path=str(path))
    path.unlink()


class ControlService(Service):
    """Listens on the control socket while running."""

    name = "control"

    def __init__(self, path: Path, commands: ControlCommands, reactor: Any,
                 max_line: int) -> None:
        self.path = path
        self.reactor = reactor
        self.factory = ControlFactory(commands, reactor, max_line)
        self.port: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        try:
            self.listen()
        except ControlSocketError as e:
            log.critical("cannot open the control socket: {err}", err=str(e))
            raise SystemExit(f"mta: cannot open the control socket: {e}") from None

    def listen(self) -> None:
        """Bind the socket, born with mode 0600 (umask), so no one else can ever connect."""
        prepare_socket_path(self.path)
        endpoint = UNIXServerEndpoint(self.reactor, str(self.path), mode=0o600)
        outcome: list[Any] = []
        old = os.umask(0o177)
        try:
            endpoint.listen(self.factory).addBoth(outcome.append)
        finally:
            os.umask(old)
        result = outcome[0]  # listenUNIX is synchronous: the Deferred has fired
        if isinstance(result, Failure):
            raise ControlSocketError(f"{self.path}: {result.getErrorMessage()}")
        self.port = result
        log.info("control socket listening on {path}", path=str(self.path))

    def stopService(self) -> Deferred[None] | None:  # noqa: N802
        super().stopService()
        for conn in list(self.factory.connections):
            conn.transport.loseConnection()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return DeferredList([maybeDeferred(port.stopListening)]).addCallback(lambda _: None)
