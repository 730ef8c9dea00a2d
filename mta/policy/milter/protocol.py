"""One connection to one milter: the requests and their answers, with their timeouts.

:class:`MilterProtocol` is the I/O half (the wire format is
:mod:`mta.policy.milter.codec`): :meth:`~MilterProtocol.request` writes a
command and, unless the milter said it will not answer that step (the
SMFIP_NR_* flags of the negotiation), gives a Deferred firing with the
answer: the modification packets collected (end of message only) followed by
the one final reply (SMFIR_CONTINUE, ACCEPT, REJECT ...).  SMFIR_PROGRESS
restarts the timer (libmilter's smfi_progress).  Anything else, a packet
out of turn, a close or a timeout fails that Deferred (and every later
request at once): the caller then applies the milter's default action, and
the connection is dropped, so a late answer can never be taken for the next
step's (the session stays in step).

:func:`client_endpoint` turns Postfix's ``unix:/path`` and
``inet:host:port`` (or a Twisted client endpoint string) into an endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from mta.policy.milter import codec
from mta.policy.milter.codec import Packet, ProtocolError

# Modification packets a milter may send before its final end-of-message reply.
MAX_MODIFICATIONS = 10_000


class MilterFailed(Exception):
    """The milter cannot be used any more in this session (``reason``: closed,
    garbage, timeout, down, or the milter's own SMFIR_SHUTDOWN)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def endpoint_string(socket: str) -> str:
    """Postfix's milter socket syntax as a Twisted client endpoint string:
    ``unix:/path`` -> ``unix:path=/path``, ``inet:host:port`` (host may be
    ``[v6]``) -> ``tcp:host=host:port=port``; anything else is taken as a
    Twisted client endpoint string already (``tcp:host=...:port=...``)."""
    if socket.startswith("unix:") and "=" not in socket:
        return "unix:path=" + socket[5:].replace(":", r"\:")
    if socket.startswith(("inet:", "inet6:")):
        hostport = socket.split(":", 1)[1]
        host, _, port = hostport.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            host = "127.0.0.1"
        return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"
    return socket


def client_endpoint(reactor: Any, socket: str, timeout: float) -> Any:
    spec = endpoint_string(socket)
    if spec.startswith(("tcp:", "unix:")) and "timeout=" not in spec:
        spec += f":timeout={max(1, int(timeout))}"
    return clientFromString(reactor, spec)


class MilterProtocol(Protocol):
    """The connection; one request at a time (see the module docstring)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._decoder = codec.Decoder()
        self._waiting: Deferred[list[Packet]] | None = None
        self._optneg = False  # the request waiting is the negotiation
        self._eom = False  # the request waiting may collect modifications
        self._collected: list[Packet] = []
        self._timer: Any = None
        self._timeout = 0.0
        self.failure: MilterFailed | None = None
        self.connected = False

    # --- requests -----------------------------------------------------------

    def request(self, data: bytes, timeout: float, answer: bool = True, optneg: bool = False,
                eom: bool = False) -> Deferred[list[Packet]] | None:
        """Write ``data`` (one or more packets); with ``answer`` a Deferred for the
        reply (``optneg``: the negotiation's; ``eom``: modifications may come
        before it), else None.  Fails at once if the milter has failed."""
        if self.failure is not None:
            from twisted.internet.defer import fail

            return fail(self.failure) if answer else None
        assert self._waiting is None, "one request at a time"
        self.transport.write(data)
        if not answer:
            return None
        d: Deferred[list[Packet]] = Deferred()
        self._waiting, self._optneg, self._eom = d, optneg, eom
        self._collected = []
        self._timeout = timeout
        self._timer = self.clock.callLater(timeout, self._timed_out)
        return d

    def close(self, quit: bool = True) -> None:
        """SMFIC_QUIT (when the milter is still usable) and close."""
        if self.connected and self.failure is None and quit:
            self.transport.write(codec.packet(codec.QUIT))
        self._fail(MilterFailed("closed", "by us"), drop=True)

    # --- the wire -------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        self.connected = True
        # No Nagle: the steps a milter does not answer (SMFIP_NR_*: rspamd answers
        # only the end of message) go out as the client's commands come, each a
        # small segment while the last is unacknowledged, and the milter's side
        # delays its ACK (40 ms on Linux): without this every message waited so.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.failure is not None:
            return
        try:
            packets = self._decoder.feed(data)
        except ProtocolError as e:
            self._fail(MilterFailed("garbage", str(e)))
            return
        for p in packets:  # bounded: what one read held
            if self.failure is not None:
                return
            self._packet(p)

    def _packet(self, p: Packet) -> None:
        d = self._waiting
        if d is None:
            self._fail(MilterFailed("garbage", f"unasked reply {p.command!r}"))
            return
        command = p.command
        if command == codec.PROGRESS:
            if self._timer is not None and self._timer.active():
                self._timer.reset(self._timeout)
            return
        if self._optneg:
            if command != codec.OPTNEG:
                self._fail(MilterFailed("garbage", f"negotiation answered with {command!r}"))
                return
        elif command == codec.SHUTDOWN:
            self._fail(MilterFailed("shutdown", "the milter shut down"))
            return
        elif command in codec.MODIFICATIONS:
            if not self._eom or len(self._collected) >= MAX_MODIFICATIONS:
                self._fail(MilterFailed("garbage", f"modification {command!r} out of turn"))
                return
            self._collected.append(p)
            return
        elif command not in codec.FINAL:
            self._fail(MilterFailed("garbage", f"unknown reply {command!r}"))
            return
        self._collected.append(p)
        answer, self._collected = self._collected, []
        self._waiting = None
        self._cancel_timer()
        d.callback(answer)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(MilterFailed("timeout", f"no answer in {self._timeout:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, failure: MilterFailed, drop: bool = True) -> None:
        if self.failure is None:
            self.failure = failure
        self._cancel_timer()
        d, self._waiting = self._waiting, None
        if drop and self.transport is not None and self.connected:
            if failure.reason == "closed":  # by us, in order: what was written goes first
                self.transport.loseConnection()
            else:  # a milter out of step: nothing more is read from or written to it
                self.transport.abortConnection()
        if d is not None and not d.called:  # (called: cancelled by the stage's time limit)
            d.errback(Failure(failure))

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        self.connected = False
        detail = "" if reason is None or reason.check(ConnectionDone) else str(reason.value)
        self._fail(MilterFailed("closed", detail or "the milter closed the connection"), drop=False)


__all__ = ["MilterFailed", "MilterProtocol", "TimeoutError", "client_endpoint", "endpoint_string"]
