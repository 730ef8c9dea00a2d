"""What the daemon's HTTP listeners share (the MTA-STS policy host, the status page)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.server import Request, Site

log = Logger()


class QuietSite(Site):
    """A twisted.web site that writes no access-log line per request (so no
    request line, header or credential of a request ever reaches a log)."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


class WebListener(Service):
    """Listens on ``endpoint`` while running (the site :meth:`factory` makes);
    stops listening on stop.  Failing to listen is logged and does not stop the
    MTA.  A subclass gives the factory and the lines it logs."""

    what = "an HTTP listener"  # for the log: "cannot serve <what> on <endpoint>"

    def __init__(self, reactor: Any, endpoint: str | IStreamServerEndpoint) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.port: IListeningPort | None = None
        self.listening: Deferred[Any] = succeed(None)

    def factory(self) -> Any:
        """The protocol factory to listen with (a :class:`QuietSite`, maybe wrapped)."""
        raise NotImplementedError

    def listening_on(self, address: Any) -> None:
        """Log where it listens, once it does."""

    def startService(self) -> None:  # noqa: N802
        super().startService()
        endpoint = self.endpoint
        if isinstance(endpoint, str):
            endpoint = serverFromString(self.reactor, endpoint)
        self.listening = endpoint.listen(self.factory())
        self.listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        if not self.running:
            port.stopListening()
            self.port = None
            return
        self.listening_on(port.getHost())

    def _listen_failed(self, failure: Any) -> None:
        # ``what`` is a fixed text of the class (no braces): part of the format.
        log.error("cannot serve " + self.what + " on {endpoint}: {err}",
                  endpoint=str(self.endpoint), err=failure.value)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
