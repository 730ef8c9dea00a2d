"""The outbound SMTP client: one connection, an explicit state machine, per-recipient results.

:func:`send` connects to one server, speaks RFC 5321 ESMTP to it and runs one or
more mail transactions on the connection.  It never raises for anything the
server or the network does: every outcome is in the returned
:class:`SessionResult`, one :class:`RecipientReply` per recipient that got a
final answer, and ``connection_error`` when the server must be considered
failed (the caller then tries the recipients without an answer on the next
server).

This module is the entry point; the pieces, from the wire up, are modules
of their own:

* :mod:`mta.delivery.outbound`: the values asked for and reported back
  (:class:`OutboundMessage`, :class:`ClientOptions`, :class:`SessionResult`);
* :mod:`mta.delivery.wire`: the wire encoding (replies parsed into
  :class:`~mta.delivery.wire.ServerReply`, EHLO capabilities, dot-stuffing,
  BDAT framing);
* :mod:`mta.delivery.protocol`: the I/O half (reply queue, timers, STARTTLS,
  the body streamed from disk);
* :mod:`mta.delivery.session`: the state machine (``State``,
  ``_TRANSITIONS``, ``ClientSession``), where the protocol choices are made
  and described;
* :mod:`mta.delivery.tlspolicy`: when to start TLS and how the certificate
  is checked.

Here: connecting (with the connection cache, :mod:`mta.delivery.cache`) and
one log line per transaction on a server that failed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mta.delivery.cache import ConnectionCache
from mta.delivery.outbound import (
    ClientOptions,
    OutboundMessage,
    RecipientReply,
    SessionResult,
    Timeouts,
    TransactionResult,
)
from mta.delivery.protocol import SMTPClientProtocol
from mta.delivery.session import ClientSession
from mta.delivery.tlspolicy import tls_creator
from mta.mail.address import logged_sender

# What a caller of send() needs, importable from here.
__all__ = ["ClientOptions", "OutboundMessage", "RecipientReply", "SessionResult", "Timeouts",
           "TransactionResult", "cache_key", "send"]

log = Logger()


# --- entry point -------------------------------------------------------------------------


class _OneProtocolFactory(Factory):
    noisy = False  # no "Starting factory" log line per outbound connection

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._proto


def _source(host: str, options: ClientOptions | None) -> str | None:
    """The source address to bind for ``host`` (ClientOptions.bind_address/6), or None."""
    if options is None:
        return None
    if isIPAddress(host):
        return options.bind_address
    if isIPv6Address(host):
        return options.bind_address6
    return options.bind_address or options.bind_address6


def _endpoint(reactor: Any, host: str, port: int, timeout: float,
              options: ClientOptions | None = None) -> interfaces.IStreamClientEndpoint:
    source = _source(host, options)
    bind = (source, 0) if source else None
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)


def cache_key(host: str, port: int, server: str, options: ClientOptions) -> tuple[Any, ...]:
    """What a cached connection is kept under: the server and every option the
    session was opened with (a connection is reused only with the same ones)."""
    return (host, port, server, options.tls_policy, options.tls_hostname, options.username,
            options.password, options.lmtp, options.helo_name, options.bind_address,
            options.bind_address6)


async def send(reactor: Any, destination: interfaces.IStreamClientEndpoint | tuple[str, int],
               messages: list[OutboundMessage], options: ClientOptions, *,
               clock: interfaces.IReactorTime | None = None,
               server: str | None = None, cache: ConnectionCache | None = None) -> SessionResult:
    """Connect to one server and send ``messages`` there, one mail transaction each;
    never raises for network errors.

    ``destination`` is an endpoint or ``(host, port)``; ``server`` names the
    server in results and logs (default: the host).  Every timer runs on
    ``clock`` (default: ``reactor``).  With a ``cache`` (and a ``(host, port)``
    destination) an open connection to the same server with the same options
    is reused, and this one is left open in the cache afterwards.
    """
    clock = clock or reactor
    key: tuple[Any, ...] | None = None
    if isinstance(destination, tuple):
        host, port = destination
        endpoint = _endpoint(reactor, host, port, options.timeouts.connect, options)
        server = server or host
        if cache is not None and cache.enabled:
            key = cache_key(host, port, server, options)
    else:
        endpoint = destination
        server = server or str(destination)

    def new_result() -> SessionResult:
        return SessionResult(server=server, transactions=[TransactionResult(m) for m in messages])

    result = new_result()
    session: ClientSession | None = cache.take(key) if cache is not None and key is not None else None  # type: ignore[assignment]
    if session is not None:
        result.tls, result.tls_verified = session.result.tls, session.result.tls_verified
        session.result = result
        session.body_started = False
        if await session.run(result.transactions, reused=True, keep=True):
            cache.put(key, session)  # type: ignore[union-attr]
        elif (result.connection_error is not None and not session.body_started
              and not any(tr.replies for tr in result.transactions)):
            # The reused connection failed before any recipient was answered and
            # before the message data went out (closed while idle, or a 421 to
            # MAIL from a server that limits messages per connection): nothing
            # was taken there, so a new connection gets the whole transaction.
            result, session = new_result(), None
    if session is None:
        proto = SMTPClientProtocol(clock)
        connected = await _connect(clock, endpoint, proto, options.timeouts.connect, result)
        if not connected and isinstance(destination, tuple) and _source(destination[0], options):
            result.connection_error = (f"{result.connection_error} (from source address "
                                       f"{_source(destination[0], options)})")
        if connected:
            result.local_ip = getattr(proto.transport.getHost(), "host", "")
            creator = tls_creator(options.tls_policy, options.tls_hostname, options.trust_root, server,
                                  session_key=destination if isinstance(destination, tuple) else None)
            session = ClientSession(proto, options, result, creator)
            if await session.run(result.transactions, keep=key is not None):
                cache.put(key, session)  # type: ignore[union-attr]
    _log_result(result, "LMTP" if options.lmtp else "SMTP")
    return result


async def _connect(clock: interfaces.IReactorTime, endpoint: interfaces.IStreamClientEndpoint,
                   proto: SMTPClientProtocol, timeout: float, result: SessionResult) -> bool:
    d = endpoint.connect(_OneProtocolFactory(proto))
    timer = clock.callLater(timeout, d.cancel)
    try:
        await d
        return True
    except CancelledError:
        reason = f"timeout after {timeout:g}s"
    except Exception as e:
        reason = str(e) or type(e).__name__
    finally:
        if timer.active():
            timer.cancel()
    result.connection_error = f"connect to {result.server} failed: {reason}"
    result.error_status = "4.4.1"  # RFC 3463: no answer from host
    return False


def _log_result(result: SessionResult, protocol: str) -> None:
    """One line per transaction on a server that failed; the queue runner logs every
    recipient's outcome anyway (``delivery ...``), so a session that went well adds none."""
    if result.connection_error is None:
        return
    for tr in result.transactions:
        tx = tr.message
        outcomes = ", ".join(f"{r}={tr.replies[r].outcome}" if r in tr.replies else f"{r}=unanswered"
                             for r in dict.fromkeys(tx.recipients))
        log.info(
            "{protocol} to {server} ({tls}): from={sender} {outcomes}{error}",
            protocol=protocol,
            server=result.server,
            tls=result.tls or "no TLS",
            sender=logged_sender(tx.sender),
            outcomes=outcomes,
            error=f"; server failed: {result.connection_error}" if result.connection_error else "",
            replies={r: str(reply) for r, reply in tr.replies.items()},
            connection_error=result.connection_error,
            size=tx.size,
        )
