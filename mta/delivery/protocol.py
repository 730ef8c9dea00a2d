"""The outbound client's I/O half: :class:`SMTPClientProtocol`.

Replies are read through a :class:`~mta.delivery.wire.ReplyParser` into a
queue, one waiter at a time, with one timer per connection on an injectable
clock (RFC 5321 §4.5.3.2 stage timeouts); commands go out in one write (so a
pipelined group leaves in one segment); STARTTLS throws away anything received
in plaintext after its reply (RFC 3207 §4.2); the message body is streamed
from the queue file by a pull producer, or sent in one write when small.

Anything that ends the dialogue with this server is a :class:`SessionError`.
The dialogue itself (what to send when) is :mod:`mta.delivery.session`.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

from OpenSSL import SSL
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.delivery.wire import DotStuffer, ReplyError, ReplyParser, ServerReply, bdat_command
from mta.queue.layout import QueuedMessage
from mta.system.netio import send_now

CHUNK_SIZE = 64 * 1024
SMALL_BODY = 16 * 1024  # sent in one write without a producer (fits any socket send buffer)


# --- errors that end a session -----------------------------------------------------------


class SessionError(Exception):
    """This server failed: recipients without a final reply go to the next one.

    ``polite``: the connection is still in a known state, so QUIT is sent
    before closing; otherwise the connection is aborted.
    """

    def __init__(self, text: str, status: str = "4.4.2", polite: bool = False) -> None:
        super().__init__(text)
        self.status = status
        self.polite = polite


def refused(reply: ServerReply, stage: str) -> SessionError:
    """The server answered, but not in a way that lets us go on with it."""
    status = reply.enhanced if reply.enhanced.startswith("4") else "4.4.2"
    return SessionError(f"{reply} (in reply to {stage})", status, polite=reply.code != 421)


# --- the I/O half ------------------------------------------------------------------------


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Streams the message file through a :class:`DotStuffer`, one chunk per pull.

    The transport asks for the next chunk when its buffer has drained, so only
    a chunk or two of the message is ever in memory.  A pull that does not
    come for ``block_timeout`` seconds means the server stopped reading
    (RFC 5321 §4.5.3.2.5 data block timeout).
    """

    def __init__(self, proto: SMTPClientProtocol, path: Path, block_timeout: float,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self._proto = proto
        self._file: BinaryIO | None = QueuedMessage(path).open()  # closed in _close
        self._stuffer = DotStuffer()
        self._block_timeout = block_timeout
        self._chunk_size = chunk_size
        self._timer: interfaces.IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._arm()
        self._proto.transport.registerProducer(self, False)

    def _read_chunk(self) -> bytes:
        assert self._file is not None
        return self._file.read(self._chunk_size)

    def resumeProducing(self) -> None:
        if self._file is None:
            return
        self._arm()
        while True:  # ends: every pass reads the file further or reaches its end
            chunk = self._read_chunk()
            if not chunk:
                self._finish()
                return
            out = self._stuffer.feed(chunk)
            if out:
                self._proto.transport.write(out)
                return

    def stopProducing(self) -> None:
        self.abort(SessionError("connection lost while sending the message data"))

    def abort(self, error: SessionError) -> None:
        if self._close() and not self.done.called:
            self.done.errback(Failure(error))

    def _finish(self) -> None:
        self._proto.transport.write(self._stuffer.finish())
        self._close()
        self._proto.transport.unregisterProducer()
        if not self.done.called:
            self.done.callback(None)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._proto.clock.callLater(self._block_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._proto.fail(SessionError(
            f"timeout after {self._block_timeout:g}s sending the message data (server not reading)"))

    def _close(self) -> bool:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._file is None:
            return False
        self._file.close()
        self._file = None
        return True


@implementer(interfaces.IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """Replies in, commands out; one waiter at a time with a timer on ``clock``."""

    def __init__(self, clock: interfaces.IReactorTime) -> None:
        self.clock = clock
        self._parser = ReplyParser()
        self._replies: deque[ServerReply] = deque()
        self._waiter: Deferred[Any] | None = None
        self._waiting_for = ""  # "reply", "tls" or "" (nothing awaited)
        self._waiting_for_text = ""
        self._timer: interfaces.IDelayedCall | None = None
        self._timeout = 0.0  # of the current wait
        self._failure: SessionError | None = None
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        self._body: _BodyProducer | None = None
        self.tls_active = False

    # twisted callbacks

    def connectionMade(self) -> None:
        if interfaces.ITCPTransport.providedBy(self.transport):
            try:
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass  # a UNIX socket (LMTP) says ITCPTransport but has no Nagle to turn off

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            replies = self._parser.feed(data)
        except ReplyError as e:
            self.fail(SessionError(f"protocol error: {e}"))
            return
        self._replies.extend(replies)
        if self._replies and self._waiting_for == "reply":
            self._resolve(self._replies.popleft())

    def handshakeCompleted(self) -> None:
        self.tls_active = True
        if self._waiting_for == "tls" and not self.transport.disconnecting:
            self._resolve(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._stop_timer()
        why = reason.getErrorMessage()
        error = SessionError(f"lost connection{self._while()}: {why}")
        if self._failure is None:
            self._failure = error
        if self._body is not None:
            self._body.abort(self._failure)
        self._reject(self._failure)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    # what the session uses

    @property
    def alive(self) -> bool:
        return not self._lost and self._failure is None

    @property
    def idle(self) -> bool:
        """Open, with nothing received that was not asked for: fit to start a new command."""
        return self.alive and not self._replies and not self._parser.pending and self._waiter is None

    def _while(self) -> str:
        return f" while waiting for {self._waiting_for_text}" if self._waiting_for else ""

    def write_lines(self, lines: list[str], tail: bytes = b"") -> None:
        """Send commands (one write, so a pipelined group leaves in one segment);
        ``tail``: bytes that follow them in the same write (a BDAT chunk)."""
        self.ensure_idle()
        send_now(self.transport, b"".join(line.encode("utf-8") + b"\r\n" for line in lines) + tail)

    def write_chunk(self, chunk: bytes, last: bool) -> None:
        """Send one BDAT command with its octets (RFC 3030 §2), in one write.

        Replies to earlier chunks may be waiting (they are read later): no idle check."""
        if self._failure is not None:
            raise self._failure
        send_now(self.transport, bdat_command(chunk, last))

    def ensure_idle(self) -> None:
        """Nothing may have arrived that we did not ask for (RFC 5321 §4.2: a reply per command)."""
        if self._replies:
            extra = self._replies[0]
            if extra.code == 421:
                raise refused(extra, "nothing (unsolicited)")
            raise SessionError(f"protocol error: unexpected reply {extra}")
        if self._parser.pending:
            raise SessionError("protocol error: unexpected data from the server")

    def read_reply(self, timeout: float, what: str) -> Deferred[ServerReply]:
        if self._replies:
            return succeed(self._replies.popleft())
        if self._failure is not None:
            return fail(self._failure)
        return self._wait("reply", timeout, what)

    def take_reply(self) -> ServerReply | None:
        """A reply that is already here, if any (a server may answer before the end of DATA)."""
        return self._replies.popleft() if self._replies else None

    def start_tls(self, creator: Any, timeout: float) -> Deferred[None]:
        """Start the handshake; bytes already received in plaintext are an error.

        Anything after the 220 to STARTTLS and before the handshake was not
        protected and must not be taken as a reply (RFC 3207 §4.2; the
        CVE-2011-0411 class of response injection).
        """
        self.ensure_idle()
        self._parser = ReplyParser()
        d = self._wait("tls", timeout, "the TLS handshake")
        self.transport.startTLS(creator)
        return d

    def tls_description(self) -> str:
        handle = self.transport.getHandle()
        if not isinstance(handle, SSL.Connection):
            return ""
        return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"

    def peer_chain(self) -> list[Any]:
        """The certificate chain the server sent (its own first), after the handshake."""
        handle = self.transport.getHandle()
        if not isinstance(handle, SSL.Connection):
            return []
        return list(handle.get_peer_cert_chain() or [])

    def send_body(self, path: Path, block_timeout: float) -> Deferred[None]:
        """Send the message file as DATA, with its end.

        A message of at most ``SMALL_BODY`` octets (most mail) goes out in one
        write, which the socket's send buffer takes at once; a bigger one is
        streamed by a :class:`_BodyProducer` as the server reads it.
        """
        if self._failure is not None:
            return fail(self._failure)
        head = QueuedMessage(path).read_start(SMALL_BODY + 1)
        if len(head) <= SMALL_BODY:
            stuffer = DotStuffer()
            send_now(self.transport, stuffer.feed(head) + stuffer.finish())
            return succeed(None)
        self._body = _BodyProducer(self, path, block_timeout)
        self._body.start()
        return self._body.done

    def fail(self, error: SessionError) -> None:
        """Give up on this connection: abort it and wake the waiter with ``error``."""
        if self._failure is None:
            self._failure = error
        if self._body is not None:
            self._body.abort(self._failure)
        self._reject(self._failure)
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()

    def close(self, timeout: float) -> Deferred[None]:
        """Close (abort after ``timeout``); fires once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
            return d
        self._closed_waiters.append(d)
        timer = self.clock.callLater(timeout, self.transport.abortConnection)

        def closed(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(closed)
        self.transport.loseConnection()
        return d

    # waiting

    def _wait(self, kind: str, timeout: float, what: str) -> Deferred[Any]:
        assert self._waiter is None, "one waiter at a time"
        d: Deferred[Any] = Deferred()
        self._waiter, self._waiting_for, self._waiting_for_text = d, kind, what
        self._timeout = timeout
        # One timer per connection, moved to each wait's deadline (a new
        # DelayedCall per reply, cancelled when it came, cost more than the
        # rest of reading that reply).  Between waits it may run out: then
        # nothing was awaited and _timed_out does nothing.
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)
        return d

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiter is not None:
            self.fail(SessionError(f"timeout after {self._timeout:g}s waiting for "
                                   f"{self._waiting_for_text}"))

    def _take_waiter(self) -> Deferred[Any] | None:
        d, self._waiter, self._waiting_for = self._waiter, None, ""
        return d

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _resolve(self, value: Any) -> None:
        d = self._take_waiter()
        if d is not None:
            d.callback(value)

    def _reject(self, error: SessionError) -> None:
        d = self._take_waiter()
        if d is not None:
            d.errback(Failure(error))
