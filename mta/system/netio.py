"""Small writes without a reactor round trip: :func:`send_now`.

Twisted's ``transport.write`` only queues the bytes: it registers the socket
for writability (an ``epoll_ctl``), the next reactor turn sends them, and a
second ``epoll_ctl`` unregisters it.  An SMTP session writes a few dozen bytes
per reply, several times per message, on a socket whose send buffer is
empty, so :func:`send_now` hands such a write straight to the kernel and
leaves anything it did not take to the transport, as before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``; on an idle plain TCP connection the bytes go out at once.

    Only for a TCP connection without TLS, without a producer and with
    nothing queued, so the order of bytes on the wire never changes.
    """
    if type(transport) in _PLAIN_TCP and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:  # full (EAGAIN) or broken: the transport finds out and reports it
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle(transport: Any) -> bool:
    """Open, plain, with nothing queued and no producer (twisted's FileDescriptor
    attributes; if a Twisted release renames them, every write takes the normal path)."""
    try:
        return (not transport.TLS and transport.connected and not transport.disconnecting
                and not transport._writeDisconnected and transport.producer is None
                and not transport.dataBuffer and not transport._tempDataBuffer)
    except AttributeError:
        return False
