"""The session's framing: reading command lines and message octets, writing replies in order.

:class:`Framing` is the part of :class:`mta.smtp.server.SMTPSession` that
turns the byte stream into work and the work's answers into replies:

* command lines end only at CRLF; a bare CR or LF in a command is refused;
  an over-long command line is discarded as it arrives (memory and CPU stay
  linear) and answered with 500 once its CRLF comes; a NUL or invalid UTF-8
  is refused;
* in DATA the octets go to the message reader, in BDAT exactly the announced
  octets (:mod:`mta.smtp.reception`), during AUTH each line to the SASL step;
* a handler returns a Reply (sent at once), None (it wrote its own), or a
  Deferred: while it is pending no further pipelined input is processed, so
  replies always go out in command order (RFC 2920 §3); what arrives
  meanwhile is kept, and reading stops once ``BUSY_READ_LIMIT`` octets wait
  (not before: most clients wait for the reply, and pausing and resuming the
  socket would cost two epoll changes per message);
* replies made while one segment of input is processed leave in one write;
* a handler's exception is a 451 4.3.0 and a log line, never a traceback to
  the client; the session stays in step.

Its state lives as long as the connection (``phase``, the input buffer and
its scan position, the busy and paused flags, the batched output).  It calls
the session's handlers: ``_command``, ``_auth_step``, ``_end_of_data``,
``_read_chunk``/``_chunk_done`` and ``_prepare_writer``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.mail import replies as R
from mta.mail.replies import Reply
from mta.system.netio import send_now

# The session's log lines keep the namespace they always had (log readers match it).
log = Logger(namespace="mta.smtp.server")

# RFC 4954 §4: an AUTH response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# Octets of unprocessed input kept while a reply is pending; past it the
# session stops reading until the reply has gone out.
BUSY_READ_LIMIT = 64 * 1024


class Phase(Enum):
    COMMAND = "command"
    AUTH = "auth"  # waiting for a SASL response line
    DATA = "data"
    BDAT = "bdat"  # reading the octets of a BDAT chunk (RFC 3030)
    CLOSED = "closed"


class Framing:
    """Line and octet reading, reply ordering and batching (see the module docstring)."""

    transport: Any
    ctx: Any
    limits: Any
    listener: Any
    client_ip: str

    def _init_framing(self) -> None:
        self.phase = Phase.COMMAND
        self._buf = b""
        self._pos = 0
        self._scan = 0  # where to resume looking for CRLF in _buf
        self._discarding = False  # inside an over-long command line
        self._busy = False
        self._paused = False  # reading stopped while busy (BUSY_READ_LIMIT)
        self._out: list[bytes] | None = None  # replies batched while input is processed
        self._after_reply: list[Any] = []  # done once an asynchronous reply has gone out

    # --- output -----------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._write(reply.format())
        if self.ctx.observer is not None:
            self.ctx.observer(self, reply)
        if reply.close:
            self.phase = Phase.CLOSED
            self._flush()
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        """Replies made while reading one segment of input leave together, in one
        write (RFC 2920 §3.2: a pipelined group's replies may be batched); others at once."""
        if self._out is not None:
            self._out.append(data)
        else:
            send_now(self.transport, data)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            send_now(self.transport, b"".join(out))

    def _reply(self, reply: Reply) -> None:
        """Send a reply to a client command, counting client errors (RFC 5321 §4.3.2)."""
        self._send(reply)
        if reply.is_error and reply.code != 552:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self._send(R.TOO_MANY_ERRORS)
        if self._closing_after_reply and self.phase is Phase.COMMAND:
            self._send(R.SHUTTING_DOWN)

    # --- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.phase is Phase.CLOSED:
            return
        if not self._greeted and self.listener.kind != "submissions":
            log.info("early talker {ip}", ip=self.client_ip, event="limit", limit="early_talker")
            self._send(R.EARLY_TALKER)
            return
        if self.phase is Phase.DATA or self.phase is Phase.BDAT:
            # Message content: any progress restarts the wait; session_timeout
            # bounds a slow sender.  Commands restart it only when complete (_process).
            self._reset_idle_timer()
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._scan -= self._pos
            self._pos = 0
        self._buf = self._buf + data if self._buf else data
        if self._busy and not self._paused and len(self._buf) - self._pos > BUSY_READ_LIMIT:
            self._paused = True
            self.transport.pauseProducing()
        self._out = []
        try:
            self._process()
        finally:
            self._flush()
            self._out = None
        if self._prepare_after_flush:
            self._prepare_writer()

    def _process(self) -> None:
        while not self._busy and self.phase is not Phase.CLOSED and self._pos < len(self._buf):
            if self.phase is Phase.DATA:
                assert self._data is not None
                chunk = self._buf[self._pos :] if self._pos else self._buf
                self._buf, self._pos, self._scan = b"", 0, 0
                rest = self._data.feed(chunk)
                if rest is None:
                    return
                self._buf = rest
                self._run(self._end_of_data)
                continue
            if self.phase is Phase.BDAT:
                if self._read_chunk():
                    self._run(self._chunk_done)
                    continue
                return
            line = self._next_line()
            if line is None:
                return
            # RFC 5321 §4.5.3.2.7: command_timeout is the wait for the next *command*;
            # octets trickled without their CRLF must not extend it (slowloris).
            self._reset_idle_timer()
            if isinstance(line, Reply):
                self.phase = Phase.COMMAND  # a bad line also ends a SASL exchange
                self._reply(line)
                continue
            if self.phase is Phase.AUTH:
                self._run(self._auth_step, line)
            else:
                self._run(self._command, line)

    def _next_line(self) -> str | Reply | None:
        limit = MAX_AUTH_LINE if self.phase is Phase.AUTH else self.limits.max_command_length
        end = self._buf.find(b"\r\n", max(self._scan, self._pos))
        if end < 0:
            if len(self._buf) - self._pos > limit:
                # Bounded memory: drop what we have of this line, keep its last
                # octet in case it is the CR of the CRLF.
                self._discarding = True
                self._buf = self._buf[-1:]
                self._pos = 0
            self._scan = max(self._pos, len(self._buf) - 1)
            return None
        raw = self._buf[self._pos : end]
        self._pos = end + 2
        self._scan = self._pos
        if self._discarding:
            self._discarding = False
            return R.LINE_TOO_LONG
        if len(raw) > limit:
            return R.LINE_TOO_LONG
        if b"\n" in raw or b"\r" in raw:
            return R.BAD_LINE_ENDING
        if b"\x00" in raw:
            return R.NUL_IN_COMMAND
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return R.BAD_UTF8

    def _run(self, handler: Any, *args: Any) -> None:
        try:
            result = handler(*args)
        except Exception:
            log.failure("internal error handling input from {ip}", ip=self.client_ip)
            result = Reply(451, "4.3.0", "Internal server error, transaction aborted")
            self._reset_transaction()
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._internal_error)
            result.addCallback(self._async_done)
        elif result is not None:
            self._reply(result)

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error in asynchronous check for {ip}", failure, ip=self.client_ip)
        self._reset_transaction()
        return Reply(451, "4.3.0", "Internal server error, try again later")

    def _async_done(self, reply: Reply | None) -> None:
        self._busy = False
        if self.phase is not Phase.CLOSED and reply is not None:
            self._reply(reply)
        if self._after_reply and self.phase is not Phase.CLOSED:
            self._flush()  # on the wire before what comes after it (a commit can end at once)
        while self._after_reply:  # bounded: each entry is taken out before it runs
            self._after_reply.pop(0)()
        if self.phase is not Phase.CLOSED:
            self._reset_idle_timer()  # the wait for the next command starts with our reply
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            self._process()
