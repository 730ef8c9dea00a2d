"""Wiring: builds the running MTA from a :class:`~mta.config.Config`.

Data flows one way: listeners → SMTP sessions (policy) → queue store →
queue runner → couriers (local Maildir, pipe, remote SMTP) → results back into
the queue's envelopes.  This module only connects those pieces; each piece is
built from the configuration and handed what it needs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from mta.config import Config
from mta.queue.store import QueueStore
from mta.smtp.server import ServerContext, SMTPFactory

log = Logger()


class StartupError(Exception):
    """Something named in the configuration cannot be used (file, certificate...)."""


def load_policies(config: Config) -> tuple[Any, Any]:
    """Read the users and aliases files. Raises a clear error naming the file."""
    from mta.policy.aliases import AliasResolver
    from mta.policy.auth import UserDB

    users = UserDB.load(config.domains_dir, config.local_domains)
    aliases = AliasResolver.load(config.domains_dir, config.local_domains, users, config.aliases)
    return users, aliases


def build_context(config: Config, reactor: Any) -> ServerContext:
    from mta.tls import TLSConfigError, server_tls

    try:
        tls = server_tls(config.tls)
    except TLSConfigError as e:
        raise StartupError(f"tls: {e}") from None
    users, aliases = load_policies(config)
    store = QueueStore(config.queue_dir, fsync=config.fsync)
    spf = None
    if config.spf.enabled:
        from mta.policy.spf import SPFChecker

        spf = SPFChecker(config.spf, config.dns, config.hostname)
    return ServerContext(config=config, store=store, users=users, aliases=aliases,
                         clock=reactor, tls=tls, spf=spf)


class MTAService(MultiService):
    """The whole MTA as one Twisted service: listeners plus the queue runner."""

    def __init__(self, config: Config, reactor: Any = None, runner: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.context = build_context(config, reactor)
        self.runner = runner if runner is not None else build_runner(config, self.context.store, reactor)
        self.ports: list[Any] = []
        self.listening: Deferred[None] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.runner is not None:
            self.runner.start()
        else:
            self.context.store.recover()
        self.listening = self._listen()

    @inlineCallbacks
    def _listen(self):
        for listener in self.config.listeners:
            endpoint = serverFromString(self.reactor, listener.endpoint)
            factory = SMTPFactory(self.context, listener)
            try:
                port = yield endpoint.listen(factory)
            except Exception as e:
                log.critical("cannot listen on {endpoint} ({name}): {err}",
                             endpoint=listener.endpoint, name=listener.name, err=e)
                if self.reactor.running:
                    self.reactor.stop()
                raise
            self.ports.append(port)
            log.info("listening on {endpoint} for {kind}", endpoint=listener.endpoint,
                     kind=listener.kind)

    @inlineCallbacks
    def stopService(self):  # noqa: N802
        self.context.accepting = False
        yield DeferredList([p.stopListening() for p in self.ports])
        self.ports = []
        for session in list(self.context.sessions):
            session.shutdown()
        if self.runner is not None:
            yield self.runner.stop()
        yield super().stopService()


def build_runner(config: Config, store: QueueStore, reactor: Any) -> Any:
    """The queue runner with its couriers, or None while delivery is not wired."""
    try:
        from mta.delivery.wiring import build_runner as build
    except ImportError:
        return None
    return build(config, store, reactor)
