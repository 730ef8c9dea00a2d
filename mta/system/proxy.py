"""HAProxy PROXY protocol (v1 and v2) on chosen listeners.

Twisted's ``haproxy:`` endpoint wrapper starts the wrapped protocol as soon as
the TCP connection opens, before the PROXY header has been read, so the SMTP
session would see the proxy's address for its limits and greeting.  This
wrapper starts the SMTP session only once the header is parsed, so every
decision (limits, SPF, Received) uses the real client address.  A header that
is malformed or does not arrive within ``HEADER_TIMEOUT`` closes the connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import _WrapperServerEndpoint, serverFromString
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy

HEADER_TIMEOUT = 10.0
PREFIX = "haproxy:"


class StartAfterHeaderWrapper(HAProxyProtocolWrapper):
    """Like Twisted's wrapper, but the wrapped protocol starts after the header."""

    _buffer = b""
    _timer: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        from twisted.internet import reactor

        self._timer = reactor.callLater(HEADER_TIMEOUT, self.loseConnection)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        data = self._buffer + data
        if self._parser is None:
            if len(data) < 16 and not (data.startswith(b"PROXY") and b"\r\n" in data):
                self._buffer = data  # too short to tell v1 from v2 yet (bounded: < 16 octets)
                return
            if data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            else:
                self.loseConnection()
                return
        self._buffer = b""
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self.loseConnection()
            return
        if self._proxyInfo is None:
            return  # header not complete yet; the parser keeps what it has
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.wrappedProtocol.makeConnection(self)
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._proxyInfo is not None:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class StartAfterHeaderFactory(HAProxyWrappingFactory):
    protocol = StartAfterHeaderWrapper


# Twisted's default listen backlog is 50: a burst of new connections overflows
# it and clients hang half-open.  Used unless the description sets backlog=.
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    if description.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def listening_endpoint(reactor: Any, description: str) -> Any:
    """``serverFromString``, with ``haproxy:`` handled by :class:`StartAfterHeaderWrapper`
    and a listen backlog of DEFAULT_BACKLOG unless one is given."""
    if description.startswith(PREFIX):
        inner = serverFromString(reactor, with_backlog(description[len(PREFIX):]))
        return _WrapperServerEndpoint(inner, StartAfterHeaderFactory)
    return serverFromString(reactor, with_backlog(description))
