"""Local couriers: Maildir files, pipe aliases and an external delivery agent.

All three implement :class:`mta.queue.courier.Courier` and never errback: every
recipient gets a :class:`~mta.queue.courier.DeliveryResult`.

Line endings.  The queue keeps messages with CRLF line endings (the SMTP wire
form).  Everything delivered on this host is converted to LF line endings, the
Unix convention that Maildir readers (Dovecot, mutt, Courier) and delivery
agents (dovecot-lda, procmail) expect.  Only CRLF pairs are converted; a lone CR
(which the DATA reader refuses anyway) is kept.  The conversion streams in
chunks and never loads a message whole.

Every local delivery starts with two header lines (RFC 5321 §4.4: the final
delivery inserts ``Return-Path``)::

    Return-Path: <sender>
    Delivered-To: user@domain

Maildir I/O is done synchronously on the reactor thread (short local file
I/O, fsync included); commands run as child processes through
``reactor.spawnProcess`` and never block.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mta.config import maildir_template_problem
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient
from mta.queue.layout import QueuedMessage
from mta.system.fsutil import fsync_dir

log = Logger()

CHUNK_SIZE = 64 * 1024
STDERR_LIMIT = 4096
EX_TEMPFAIL = 75  # sysexits.h

# sysexits.h codes a delivery agent may use for a permanent failure, mapped to
# RFC 3463 statuses (the same table Postfix uses); anything else is 5.3.0.
_SYSEXIT_STATUS = {
    64: "5.3.0",  # EX_USAGE
    65: "5.6.0",  # EX_DATAERR
    67: "5.1.1",  # EX_NOUSER
    68: "5.1.2",  # EX_NOHOST
    77: "5.7.0",  # EX_NOPERM
    78: "5.3.5",  # EX_CONFIG
}

DEFAULT_ENV: Mapping[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SHELL": "/bin/sh"}


# --- helpers shared by the couriers ---------------------------------------------


class CRLFToLF:
    """A stateful CRLF → LF converter for a stream of chunks.

    A chunk that ends in CR keeps it back until the next chunk shows whether an
    LF follows; :meth:`flush` returns what is left at the end of the stream.
    """

    def __init__(self) -> None:
        self._held_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        return chunk.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        held, self._held_cr = self._held_cr, False
        return b"\r" if held else b""


def _header_value(text: str) -> bytes:
    """An address for a header line: no CR, LF or NUL can sneak in."""
    return re.sub(r"[\r\n\x00]", "", text).encode("utf-8")


def delivery_prelude(sender: str, delivered_to: str) -> bytes:
    """The lines every local delivery gets first (LF line endings)."""
    return (b"Return-Path: <" + _header_value(sender) + b">\n"
            + b"Delivered-To: " + _header_value(delivered_to) + b"\n")


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    user, at, domain = mailbox.rpartition("@")
    if not at:
        return "", ""
    return user, domain.lower()


def _unsafe_name(part: str) -> str | None:
    """Why ``part`` may not be a path component, or None when it is safe."""
    if not part:
        return "empty name"
    if part.startswith("."):
        return "name starts with a dot"
    if "/" in part or "\x00" in part:
        return "name contains '/' or NUL"
    if any(ord(c) < 0x20 or c == "\x7f" for c in part):
        return "name contains control characters"
    if len(part.encode("utf-8")) > 255:
        return "name too long"
    return None


def _reply_text(data: bytes, limit: int = 200) -> str:
    """The first non-empty line of ``data``, printable and bounded."""
    for line in data.decode("utf-8", "replace").splitlines():
        line = "".join(c if c.isprintable() else "?" for c in line).strip()
        if line:
            return line[:limit]
    return ""



# --- Maildir --------------------------------------------------------------------


def escape_maildir_host(hostname: str) -> str:
    """The hostname part of a Maildir file name: ``/`` → ``\\057``, ``:`` → ``\\072``.

    As https://cr.yp.to/proto/maildir.html asks, so that the name stays one path
    component and the ``:2,`` info suffix stays unambiguous.
    """
    return hostname.replace("/", "\\057").replace(":", "\\072")


def expand_maildir_template(template: str, user: str, domain: str) -> str:
    """``template`` with ``%u`` (user@domain), ``%n`` (user), ``%d`` (domain), ``%%``.

    The names Dovecot's ``mail_location`` uses, so that ``%d/%n/Maildir`` means
    what a Dovecot administrator expects.  The template is assumed checked
    (:func:`mta.config.maildir_template_problem`); ``user`` and ``domain`` are
    safe path components.
    """
    values = {"u": f"{user}@{domain}", "n": user, "d": domain, "%": "%"}
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            out.append(values[template[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class MaildirCourier:
    """Delivers local recipients into Maildirs under ``mail_dir``.

    Where: ``template`` (``[maildir] template``) expanded for the mailbox,
    relative to ``mail_dir``; the default ``%d/%n`` is ``mail_dir/<domain>/<user>/``.
    Missing directories on the way are created (mode 0700) and their parents
    fsynced.
    """

    def __init__(self, mail_dir: Path, hostname: str, fsync: bool = True,
                 clock: Callable[[], float] = time.time, template: str = "%d/%n") -> None:
        problem = maildir_template_problem(template)
        if problem:
            raise ValueError(f"maildir template {template!r}: {problem}")
        self.template = template
        self.mail_dir = mail_dir
        self.hostname = escape_maildir_host(hostname)
        self.fsync = fsync
        self.clock = clock
        self._counter = itertools.count(1)

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        return succeed([self._deliver_one(envelope, r, data_path) for r in recipients])

    def unique_name(self) -> str:
        """``<seconds>.M<usec>P<pid>Q<counter>.<host>`` (the Maildir spec's modern form)."""
        now = self.clock()
        seconds = int(now)
        usec = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{usec}P{os.getpid()}Q{next(self._counter)}.{self.hostname}"

    def maildir_for(self, mailbox: str) -> Path:
        """The Maildir of ``user@domain``; ValueError if it is not a safe path."""
        user, domain = _split_mailbox(mailbox)
        for part in (user, domain):
            problem = _unsafe_name(part)
            if problem:
                raise ValueError(problem)
        if self.template == "%d/%n":
            return self.mail_dir / domain / user
        return self.mail_dir / expand_maildir_template(self.template, user, domain)

    def _deliver_one(self, envelope: Envelope, rcpt: Recipient, data_path: Path) -> DeliveryResult:
        mailbox = rcpt.mailbox
        if not mailbox:
            # An alias named a local address that is neither user nor alias.
            return DeliveryResult(rcpt, Outcome.FAILED,
                                  f"550 5.1.1 <{rcpt.address}>: no such user here", status="5.1.1")
        try:
            maildir = self.maildir_for(mailbox)
        except ValueError as e:
            return DeliveryResult(rcpt, Outcome.FAILED,
                                  f"550 5.1.1 mailbox {mailbox!r} unavailable: {e}", status="5.1.1")
        try:
            name = self._write(maildir, envelope.sender, mailbox, data_path)
        except OSError as e:
            log.error("maildir delivery to {mailbox} failed: {err}", mailbox=mailbox, err=e)
            reason = e.strerror or str(e)
            return DeliveryResult(rcpt, Outcome.DEFERRED,
                                  f"451 4.3.0 cannot write to mailbox: {reason}", status="4.3.0")
        return DeliveryResult(rcpt, Outcome.DELIVERED,
                              f"250 2.0.0 delivered to maildir as {name}", status="2.0.0")

    def _ensure_maildir(self, maildir: Path) -> None:
        if (maildir / "new").is_dir() and (maildir / "tmp").is_dir():
            return
        created: list[Path] = []
        missing = []  # maildir and its missing parents below mail_dir, outermost first
        d = maildir
        while d != self.mail_dir and d != d.parent and not d.is_dir():
            missing.insert(0, d)
            d = d.parent
        if not self.mail_dir.is_dir():
            self.mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (*missing, maildir / "tmp", maildir / "new", maildir / "cur"):
            try:
                d.mkdir(mode=0o700)
                created.append(d)
            except FileExistsError:
                pass
        if self.fsync:
            for parent in {d.parent for d in created}:
                fsync_dir(parent)

    def _write(self, maildir: Path, sender: str, mailbox: str, data_path: Path) -> str:
        self._ensure_maildir(maildir)
        with QueuedMessage(data_path).open() as src:
            for _ in range(100):  # O_EXCL: a clash only if the clock went backwards
                name = self.unique_name()
                tmp = maildir / "tmp" / name
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileExistsError:
                    continue
            else:
                raise OSError("no unique file name in tmp/")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(delivery_prelude(sender, mailbox))
                    _copy_lf(src, out)
                    out.flush()
                    if self.fsync:
                        os.fsync(out.fileno())
                os.rename(tmp, maildir / "new" / name)
            except BaseException:
                try:
                    tmp.unlink()
                except OSError:
                    pass
                raise
        if self.fsync:
            fsync_dir(maildir / "new")
        return name


def _copy_lf(src: BinaryIO, out: BinaryIO) -> None:
    convert = CRLFToLF()
    while chunk := src.read(CHUNK_SIZE):
        out.write(convert(chunk))
    out.write(convert.flush())


# --- child processes ---------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    stderr: bytes
    timed_out: bool


class _CommandProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.done: Deferred[CommandResult] = Deferred()
        self.stderr = bytearray()
        self.timed_out = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2 and len(self.stderr) < STDERR_LIMIT:
            self.stderr += data[: STDERR_LIMIT - len(self.stderr)]
        # stdout is read and discarded, so a chatty command never blocks on it.

    def processEnded(self, reason: Failure) -> None:
        status = reason.value
        self.done.callback(CommandResult(
            exit_code=getattr(status, "exitCode", None),
            signal=getattr(status, "signal", None),
            stderr=bytes(self.stderr),
            timed_out=self.timed_out,
        ))


def run_command(reactor: Any, argv: list[str], env: Mapping[str, str], prelude: bytes,
                data_path: Path, timeout: float,
                setsid: str | None = None) -> Deferred[CommandResult]:
    """Run ``argv`` (no shell) with ``prelude`` + the message (LF endings) on stdin.

    With ``setsid`` (the path of the util-linux tool) the command runs in its own
    process group, so a timeout kills the whole group, not just the shell.
    Raises OSError if the message cannot be opened or the process not started.
    """
    src = QueuedMessage(data_path).open()  # closed when the process ends
    proto = _CommandProtocol()
    args = [setsid, *argv] if setsid else list(argv)
    try:
        transport = reactor.spawnProcess(proto, args[0], args, env=dict(env), path="/")
    except BaseException:
        src.close()
        raise

    def on_timeout() -> None:
        proto.timed_out = True
        log.warn("command {cmd!r} timed out after {t}s; killing it", cmd=argv[0], t=timeout)
        _kill(transport, group=setsid is not None)
        # Close our ends of the pipes so processEnded does not wait for any
        # grandchild that still holds them.
        transport.loseConnection()

    timer = reactor.callLater(timeout, on_timeout)

    def ended(result: CommandResult) -> CommandResult:
        if timer.active():
            timer.cancel()
        src.close()
        return result

    proto.done.addCallback(ended)

    transport.write(prelude)
    convert = CRLFToLF()
    sent = FileSender()
    sent.CHUNK_SIZE = CHUNK_SIZE
    d = sent.beginFileTransfer(src, transport, convert)

    def finished(_: object) -> None:
        transport.write(convert.flush())
        transport.closeStdin()

    # The command may exit without reading everything: that is not an error here,
    # its exit status decides.
    d.addCallbacks(finished, lambda _f: None)
    return proto.done


def _kill(transport: Any, group: bool) -> None:
    pid = transport.pid
    if pid is None:
        return
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        transport.signalProcess("KILL")


def classify_exit(result: CommandResult, what: str) -> tuple[Outcome, str, str]:
    """Outcome, reply text and RFC 3463 status for a finished command."""
    detail = _reply_text(result.stderr)
    suffix = f": {detail}" if detail else ""
    if result.timed_out:
        return Outcome.DEFERRED, f"451 4.3.0 {what} timed out and was killed", "4.3.0"
    if result.exit_code is None:
        return (Outcome.DEFERRED,
                f"451 4.3.0 {what} killed by signal {result.signal}{suffix}", "4.3.0")
    if result.exit_code == 0:
        return Outcome.DELIVERED, f"250 2.0.0 delivered to {what}", "2.0.0"
    if result.exit_code == EX_TEMPFAIL:
        return (Outcome.DEFERRED,
                f"451 4.3.0 {what} failed temporarily (exit {EX_TEMPFAIL}){suffix}", "4.3.0")
    status = _SYSEXIT_STATUS.get(result.exit_code, "5.3.0")
    return (Outcome.FAILED,
            f"550 {status} {what} failed (exit {result.exit_code}){suffix}", status)


def _clean_env(value: str) -> str:
    return value.replace("\x00", "")


class _ProcessCourier:
    """What pipes and delivery agents share: run one command per recipient, in turn."""

    def __init__(self, timeout: float, reactor: Any, env: Mapping[str, str] | None,
                 setsid: str | None) -> None:
        assert IReactorProcess.providedBy(reactor) and IReactorTime.providedBy(reactor)
        self.timeout = timeout
        self.reactor = reactor
        self.env = dict(DEFAULT_ENV if env is None else env)
        self.setsid = setsid

    async def _deliver_all(self, envelope: Envelope, recipients: list[Recipient],
                           data_path: Path) -> list[DeliveryResult]:
        results = []
        for rcpt in recipients:
            try:
                results.append(await self._deliver_one(envelope, rcpt, data_path))
            except Exception as e:  # never errback: a courier answers for everyone
                log.failure("command delivery to {rcpt} failed", rcpt=rcpt.original)
                results.append(DeliveryResult(rcpt, Outcome.DEFERRED,
                                              f"451 4.3.0 local delivery error: {e}", status="4.3.0"))
        return results

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        return Deferred.fromCoroutine(self._deliver_all(envelope, recipients, data_path))

    async def _deliver_one(self, envelope: Envelope, rcpt: Recipient,
                           data_path: Path) -> DeliveryResult:
        raise NotImplementedError

    async def _run(self, rcpt: Recipient, argv: list[str], env: dict[str, str], prelude: bytes,
                   data_path: Path, what: str) -> DeliveryResult:
        start = self.reactor.seconds()
        try:
            result = await run_command(self.reactor, argv, env, prelude, data_path,
                                       self.timeout, self.setsid)
        except OSError as e:
            log.error("cannot run {what}: {err}", what=what, err=e)
            return DeliveryResult(rcpt, Outcome.DEFERRED,
                                  f"451 4.3.0 cannot run {what}: {e.strerror or e}", status="4.3.0")
        outcome, reply, status = classify_exit(result, what)
        log.info("{what} for {rcpt}: exit {code} signal {sig} in {t:.3f}s", what=what,
                 rcpt=rcpt.original, code=result.exit_code, sig=result.signal,
                 t=self.reactor.seconds() - start)
        return DeliveryResult(rcpt, outcome, reply, status=status)


class PipeCourier(_ProcessCourier):
    """Alias targets ``| command``: ``recipient.address`` is run by ``/bin/sh -c``.

    The environment is ``env`` (default: a fixed PATH and SHELL, nothing
    inherited from the MTA's own environment) plus SENDER, RECIPIENT (the
    original RCPT TO address), LOCAL and DOMAIN (its parts).
    Exit 0 delivers, 75 (EX_TEMPFAIL) defers, anything else fails with the
    first line of stderr in the reason; a timeout kills the command and defers.
    """

    def __init__(self, timeout: float, reactor: Any, env: Mapping[str, str] | None = None,
                 shell: str = "/bin/sh", setsid: str | None = shutil.which("setsid")) -> None:
        super().__init__(timeout, reactor, env, setsid)
        self.shell = shell

    async def _deliver_one(self, envelope: Envelope, rcpt: Recipient,
                           data_path: Path) -> DeliveryResult:
        local, _, domain = rcpt.original.rpartition("@")
        env = dict(self.env)
        env.update(SENDER=_clean_env(envelope.sender), RECIPIENT=_clean_env(rcpt.original),
                   LOCAL=_clean_env(local), DOMAIN=_clean_env(domain))
        argv = [self.shell, "-c", rcpt.address]
        return await self._run(rcpt, argv, env, delivery_prelude(envelope.sender, rcpt.original),
                               data_path, "pipe command")


_PLACEHOLDER = re.compile(r"%([udrs%])")


class CommandCourier(_ProcessCourier):
    """An external delivery agent for local recipients (``delivery.mailbox_command``).

    The template is split into words like a shell would (``shlex``) once; then
    in each word ``%u`` (user), ``%d`` (domain), ``%r`` (recipient mailbox
    ``user@domain``), ``%s`` (envelope sender) and ``%%`` are replaced.  The
    values never pass through a shell and never split into more words.  The
    agent runs once per recipient, with the same exit code rules as pipes.
    """

    def __init__(self, command: str, timeout: float, reactor: Any,
                 env: Mapping[str, str] | None = None,
                 setsid: str | None = shutil.which("setsid")) -> None:
        super().__init__(timeout, reactor, env, setsid)
        self.template = shlex.split(command)
        if not self.template:
            raise ValueError("empty delivery command")

    def argv_for(self, sender: str, mailbox: str) -> list[str]:
        user, domain = _split_mailbox(mailbox)
        values = {"u": user, "d": domain, "r": mailbox, "s": sender, "%": "%"}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word) for word in self.template]

    async def _deliver_one(self, envelope: Envelope, rcpt: Recipient,
                           data_path: Path) -> DeliveryResult:
        mailbox = rcpt.mailbox or rcpt.address
        user, domain = _split_mailbox(mailbox)
        problem = _unsafe_name(user) or _unsafe_name(domain)
        if problem is None and user.startswith("-"):
            problem = "name starts with '-'"  # would read as an option to the agent
        if problem:
            return DeliveryResult(rcpt, Outcome.FAILED,
                                  f"550 5.1.1 mailbox {mailbox!r} unavailable: {problem}",
                                  status="5.1.1")
        argv = self.argv_for(envelope.sender, mailbox)
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=self.env.get("PATH"))
        if exe is None or not os.access(exe, os.X_OK):
            # A configuration problem: keep the mail queued rather than bounce it.
            return DeliveryResult(rcpt, Outcome.DEFERRED,
                                  f"451 4.3.5 delivery agent {argv[0]!r} not found", status="4.3.5")
        argv[0] = exe
        env = dict(self.env)
        env.update(SENDER=_clean_env(envelope.sender), RECIPIENT=_clean_env(mailbox),
                   ORIGINAL_RECIPIENT=_clean_env(rcpt.original), USER=_clean_env(user),
                   DOMAIN=_clean_env(domain))
        return await self._run(rcpt, argv, env, delivery_prelude(envelope.sender, mailbox),
                               data_path, "delivery agent")
