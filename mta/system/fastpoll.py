"""The epoll reactor's event loop without Twisted's per-event log context.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to
``_doReadOrWrite`` through ``twisted.python.log.callWithLogger``, which asks
the connection for its log prefix and pushes a copy of the legacy log
context (``{"system": prefix}``) around the call, only for the legacy
``log.msg`` API's "system" field, a cost paid on every event, several per
message (accept, one read per SMTP command, close; bench/README.rst).  This
MTA logs with twisted.logger, whose events carry their own namespace, so :func:`install` replaces the reactor's poll step with the same
loop calling ``_doReadOrWrite`` directly.  What callWithLogger also did, log
an exception that escapes the call (from a protocol's connectionLost) and go
on with the next descriptor, is kept.

Only an ``EPollReactor`` whose internals look as expected is changed; any
other reactor is left alone.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

log = Logger()


def install(reactor: Any) -> bool:
    """Serve ``reactor``'s epoll events without the log context; whether it did."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:
        return False
    if not isinstance(reactor, EPollReactor) or not all(
            hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    if getattr(reactor, "_mta_fast_poll", False):
        return True
    poller = reactor._poller
    selectables = reactor._selectables
    serve = reactor._doReadOrWrite

    def do_poll(timeout: float | None) -> None:
        """One poll step (Twisted's EPollReactor.doPoll, without callWithLogger)."""
        try:
            ready = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                serve(selectable, fd, event)
            except Exception:
                log.failure("error while handling {selectable}", selectable=selectable)

    reactor.doIteration = do_poll
    reactor.doPoll = do_poll
    reactor._mta_fast_poll = True
    return True
