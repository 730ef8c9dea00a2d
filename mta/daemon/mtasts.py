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

from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Request

from mta.config import Config, TLSConfig
from mta.daemon.web import QuietSite, WebListener
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


class MTASTSService(WebListener):
    """Serves the policy on ``endpoint`` with TLS while running."""

    what = "the MTA-STS policy"

    def __init__(self, reactor: Any, endpoint: str, tls: Any,
                 config: Callable[[], Config]) -> None:
        super().__init__(reactor, endpoint)
        self.tls = tls
        self.config = config

    def factory(self) -> Any:
        return TLSMemoryBIOFactory(self.tls, False, QuietSite(PolicyResource(self.config)))

    def listening_on(self, address: Any) -> None:
        log.info("MTA-STS policy on https://{host}:{port}{path}", host=address.host,
                 port=address.port, path=WELL_KNOWN_PATH)


def mta_sts_service(reactor: Any, config: Config, current: Callable[[], Config]) -> MTASTSService:
    """The policy service for ``config.mta_sts.endpoint``; ``current()`` is the
    running configuration (after reloads).  Raises TLSConfigError for a bad
    certificate."""
    assert config.mta_sts.endpoint is not None
    return MTASTSService(reactor, config.mta_sts.endpoint, policy_tls(config), current)
