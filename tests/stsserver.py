"""An HTTPS server for MTA-STS policies (RFC 8461 §3.3) on loopback, for the tests.

``server = await start_policy_server(cert)`` listens on 127.0.0.1 (an
ephemeral port, ``server.port``; ``interface`` and ``port`` put a second one
beside it, as the fetcher connects to one configured port) with the ``trustme.LeafCert`` given (issue
it for every ``mta-sts.<domain>`` the test serves).  What each host answers
at ``/.well-known/mta-sts.txt`` is set per domain with
``server.serve(domain, text)`` or a :class:`Answer` (status, content type,
body, ``stall`` = never answer, ``redirect`` = a 301 elsewhere, ``chunked`` =
no Content-Length).  Every
request is counted in ``server.hits[domain]``.  ``await server.stop()`` closes
the port and every open connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.ssl import PrivateCertificate
from twisted.web import resource, server

WELL_KNOWN = b"/.well-known/mta-sts.txt"


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain"
    stall: bool = False  # send nothing at all (the client's timeout decides)
    redirect: str = ""  # answer 301 with this Location
    chunked: bool = False  # no Content-Length: the body in 16 KiB chunks


def policy_text(mode: str, mx: list[str], max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx], f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class _Policies(resource.Resource):
    isLeaf = True

    def __init__(self, owner: PolicyServer) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        host = (request.getHeader("host") or "").split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        self.owner.hits[domain] = self.owner.hits.get(domain, 0) + 1
        answer = self.owner.answers.get(domain)
        if request.path != WELL_KNOWN or answer is None:
            request.setResponseCode(404)
            return b"not found\n"
        if answer.stall:
            self.owner.stalled.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        if answer.redirect:
            request.setHeader("location", answer.redirect)
        request.setHeader("content-type", answer.content_type)
        if answer.chunked:
            for i in range(0, len(answer.body), 16384):
                request.write(answer.body[i:i + 16384])
            request.finish()
            return server.NOT_DONE_YET
        return answer.body


@dataclass
class PolicyServer:
    port: int = 0
    answers: dict[str, Answer] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    stalled: list[Any] = field(default_factory=list)
    _listening: Any = None
    _site: Any = None

    def serve(self, domain: str, answer: str | Answer) -> None:
        self.answers[domain] = Answer(answer.encode()) if isinstance(answer, str) else answer

    async def stop(self) -> None:
        for request in self.stalled:
            if request.channel is not None:  # else the client has closed it already
                request.channel.transport.abortConnection()
        self.stalled.clear()
        await maybeDeferred(self._listening.stopListening)
        # Give the reactor a turn for aborted connections to be reaped.
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


async def start_policy_server(cert: trustme.LeafCert, interface: str = "127.0.0.1",
                              port: int = 0) -> PolicyServer:
    owner = PolicyServer()
    site = server.Site(_Policies(owner))
    site.noisy = False
    site.timeOut = None  # no idle timer left in the reactor after a test
    pem = cert.private_key_and_cert_chain_pem.bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    owner._site = site
    owner._listening = reactor.listenSSL(port, site, options, interface=interface)
    owner.port = owner._listening.getHost().port
    return owner
