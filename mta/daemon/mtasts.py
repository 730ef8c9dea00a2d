"""MTA-STS policy hosting (RFC 8461 §3.3): an optional HTTPS listener of its own.

Serves ``GET /.well-known/mta-sts.txt`` for the hosts ``mta-sts.<domain>`` of
every local domain, with the policy made from the configuration
(:mod:`mta.policy.mtasts`), as ``text/plain``; any other path or host gets 404.
Only HTTPS: the policy is trusted because of the certificate (§3.3), which is
``[mta_sts]``'s own or ``[tls]``'s (with its SNI ``cert_dir``).  The policy and
the domains are read from the running configuration at each request, so a
reload changes them; the certificate and the endpoint need a restart.

Failing to listen is logged and does not stop the MTA (as the metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Request

from mta.config import Config, TLSConfig
from mta.daemon.web import QuietSite
from mta.policy.mtasts import HOST_PREFIX, WELL_KNOWN_PATH, policy_text

log = Logger()

NOT_FOUND = b"not found\n"


def policy_host(host_header: bytes | None) -> str | None:
    """The host name of a ``Host:`` header (no port, lower case, no final dot)."""
    if not host_header:
        return None
    text = host_header.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        return None  # an address literal is no policy host
    return text.rpartition(":")[0].rstrip(".") if ":" in text else text.rstrip(".")


class PolicyResource(Resource):
    """The one document; ``config()`` gives the running configuration."""

    isLeaf = True

    def __init__(self, config: Callable[[], Config]) -> None:
        super().__init__()
        self.config = config

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        config = self.config()
        hosts = {HOST_PREFIX + domain for domain in config.local_domains}
        if request.path != WELL_KNOWN_PATH.encode("ascii") or \
                policy_host(request.getHeader(b"host")) not in hosts:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return NOT_FOUND
        body = policy_text(config.mta_sts, config.hostname).encode("ascii")
        request.setHeader(b"content-type", b"text/plain")  # RFC 8461 §3.2
        request.setHeader(b"cache-control", b"no-cache")
        return body

    def render_HEAD(self, request: Request) -> bytes:  # noqa: N802
        return self.render_GET(request)



def policy_tls(config: Config) -> Any:
    """The server TLS context: ``[mta_sts]``'s certificate, else ``[tls]``'s."""
    from mta.system.tls import server_tls

    sts = config.mta_sts
    if sts.cert_file is not None:
        return server_tls(TLSConfig(cert_file=sts.cert_file, key_file=sts.key_file))
    return server_tls(config.tls)


class MTASTSService(Service):
    """Listens on ``endpoint`` with TLS while running; stops listening on stop."""

    def __init__(self, reactor: Any, endpoint: str, tls: Any,
                 config: Callable[[], Config]) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.tls = tls
        self.config = config
        self.port: IListeningPort | None = None
        self.listening: Deferred[Any] = succeed(None)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        site = QuietSite(PolicyResource(self.config))
        factory = TLSMemoryBIOFactory(self.tls, False, site)
        self.listening = serverFromString(self.reactor, self.endpoint).listen(factory)
        self.listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        if not self.running:
            port.stopListening()
            self.port = None
            return
        address = port.getHost()
        log.info("MTA-STS policy on https://{host}:{port}{path}", host=address.host,
                 port=address.port, path=WELL_KNOWN_PATH)

    def _listen_failed(self, failure: Any) -> None:
        log.error("cannot serve the MTA-STS policy on {endpoint}: {err}", endpoint=self.endpoint,
                  err=failure.value)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def mta_sts_service(reactor: Any, config: Config, current: Callable[[], Config]) -> MTASTSService:
    """The policy service for ``config.mta_sts.endpoint``; ``current()`` is the
    running configuration (after reloads).  Raises TLSConfigError for a bad
    certificate."""
    assert config.mta_sts.endpoint is not None
    return MTASTSService(reactor, config.mta_sts.endpoint, policy_tls(config), current)
