"""Wiring: builds the running MTA from a :class:`~mta.config.Config`.

Data flows one way: listeners → SMTP sessions (policy) → queue store →
queue runner → couriers (local Maildir, pipe, remote SMTP) → results back into
the queue's envelopes.  This module only connects those pieces; each piece is
built from the configuration and handed what it needs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mta.config import Config, ConfigError, load_config
from mta.daemon.logs import speed_up_text_log
from mta.queue.store import QueueStore, SpareOutlet
from mta.smtp.server import ServerContext, SMTPFactory
from mta.system import fastpoll
from mta.system.proxy import listening_endpoint

if TYPE_CHECKING:
    from mta.delivery.cache import ConnectionCache

log = Logger()


class StartupError(Exception):
    """Something named in the configuration cannot be used (file, certificate...)."""


@dataclass(frozen=True)
class Policies:
    """Everything a reload replaces at once: read from files, validated, then swapped in."""

    users: Any
    aliases: Any
    identities: Any
    tls: Any
    spf: Any
    authenticator: Any
    # The directory the three above come from (mta.policy.directory); closed when replaced.
    directory: Any = None


def load_policies(config: Config, reactor: Any = None) -> Policies:
    """Read users, aliases, identities and certificates. Raises StartupError naming the file."""
    from mta.policy.aliases import AliasFileError
    from mta.policy.auth import UsersFileError
    from mta.policy.directory import FilesDirectory
    from mta.policy.identities import IdentitiesFileError
    from mta.system.tls import TLSConfigError, server_tls

    try:
        tls = server_tls(config.tls)
        # The files (snapshots, errors name the file) or SQL (mta.policy.sqldirectory):
        # a database down at start is no error (the node answers 451 for what needs
        # it and recovers), one with an older schema is (mta directory migrate).
        if config.directory.backend == "files":
            directory = FilesDirectory.load(config)
        else:
            from mta.policy.sqldirectory import SQLDirectory

            directory = SQLDirectory.open(config, reactor)
    except (TLSConfigError, UsersFileError, AliasFileError, IdentitiesFileError, OSError) as e:
        raise StartupError(str(e)) from None
    except Exception as e:  # the SQL back end: a schema to migrate, a driver missing
        from mta.policy.sqldirectory import SchemaError

        if isinstance(e, SchemaError | ImportError):
            raise StartupError(f"directory: {e}") from None
        raise
    users, aliases, identities = directory.users, directory.aliases, directory.identities
    spf = None
    if config.spf.enabled:
        from mta.policy.spf import SPFChecker

        spf = SPFChecker(config.spf, config.dns, config.hostname)
    from mta.policy.dkim import DKIMKeyError
    from mta.policy.msgauth import build_authenticator

    # An SQL directory's DKIM keys (rows of dkim_keys: a PEM or a path), read at start and reload.
    extra_keys = [(d, s, pem.encode() if pem else path) for d, s, pem, path in
                  directory.dkim_keys()] if directory.blocking else []
    try:
        authenticator = build_authenticator(config, extra_keys)
    except DKIMKeyError as e:
        directory.close()
        raise StartupError(f"dkim: {e}") from None
    return Policies(users, aliases, identities, tls, spf, authenticator, directory)


def build_context(config: Config, reactor: Any, spare_outlet: SpareOutlet | None = None) -> ServerContext:
    """The SMTP sessions' shared context around a new queue store (which gives
    the files of finished messages to ``spare_outlet`` first, if any)."""
    from mta.daemon.counters import build_abuse_counters
    from mta.policy.srs import SRSRewriter, load_or_create_secret

    p = load_policies(config, reactor)
    store = QueueStore(config.queue_dir, fsync=config.fsync, reactor=reactor,
                       syncfs=config.queue_sync == "syncfs", spare_outlet=spare_outlet)
    secret = config.srs_secret or load_or_create_secret(config.data_dir / "srs-secret")
    return ServerContext(config=config, store=store, users=p.users, aliases=p.aliases,
                         directory=p.directory,
                         identities=p.identities, clock=reactor, tls=p.tls, spf=p.spf,
                         authenticator=p.authenticator,
                         abuse=build_abuse_counters(config, reactor), srs=SRSRewriter(secret))


class MTAService(MultiService):
    """The whole MTA as one Twisted service: listeners plus the queue runner.

    This is the composition root: it builds every part and hands each exactly
    the collaborators it uses (the worker pool, the control commands and the
    metrics see typed protocols of their own, never this service).
    """

    def __init__(self, config: Config, reactor: Any = None, runner: Any = None,
                 config_path: Path | None = None, overrides: dict[str, Any] | None = None,
                 install_signals: bool = False, loader: Callable[[], Config] | None = None,
                 worker_fds: list[tuple[str, int, int]] | None = None) -> None:
        super().__init__()
        overrides = overrides or {}
        # In a worker process (mta.daemon.workers): the listening sockets to adopt.
        self.worker_fds = worker_fds
        # How a reload reads the configuration again (tests give their own).
        self.loader = loader or (lambda: load_config(config_path, overrides))
        self.install_signals = install_signals
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        spares = None
        if worker_fds is None and config.workers > 1:
            from mta.daemon.workers import WorkerSpares

            spares = WorkerSpares(reactor)
        self.context = build_context(config, reactor, spare_outlet=spares)
        if config.counters.backend == "redis":  # issue 20: shared abuse counters
            from mta.daemon.counters import CountersService

            CountersService(self.context.abuse).setServiceParent(self)
        self.ports: list[Any] = []
        self.listening: Deferred[None] | None = None
        self.pool: Any = None
        # The remote courier's open connections (for the metrics), when we built it.
        self.connections: ConnectionCache | None = None
        # runner=False: no delivery at all (tests of the receiving side).
        if worker_fds is not None:
            # With workers_deliver, a worker delivers what it accepted, a first
            # pass each (so every process's core delivers), and hands what is
            # left to the main process (QueueRunner.hand_over, set by
            # mta.daemon.worker); without, it announces every message it
            # committed to the main process, which delivers them all.
            if runner is None and not config.workers_deliver:
                runner = False
            if runner is None:
                from mta.daemon.workers import tell_tls_count
                from mta.delivery.wiring import build_delivery

                # Its TLS report counts go to the main process's reporter (one
                # state file, one sender of the daily reports); the main process
                # alone refreshes the MTA-STS cache it shares with us.
                delivery = build_delivery(config, self.context.store, reactor,
                                          tls_forward=tell_tls_count, sts_refresh=False)
                runner, self.connections = delivery.runner, delivery.connections
            self.runner = None if runner is False else runner
            return
        tls_reports = None  # the TLS reporter the workers' counts go to
        if runner is None:
            from mta.delivery.wiring import build_delivery

            # The TLS reports are DKIM-signed as SMTP submissions are (RFC 8460 §3).
            signer = getattr(self.context.authenticator, "signer", None)
            delivery = build_delivery(config, self.context.store, reactor, report_signer=signer)
            runner, self.connections = delivery.runner, delivery.connections
            tls_reports = delivery.tlsrpt
        self.runner = None if runner is False else runner
        if spares is not None:
            from mta.daemon.workers import WorkerPool

            self.pool = WorkerPool(
                reactor, config.workers,
                {"config": str(config_path) if config_path else None, "overrides": overrides},
                listeners=[listener.name for listener in config.listeners], spares=spares,
                runner=self.runner, files=self.context.store,
                session_timeout=lambda: self.config.limits.session_timeout,
                tls_reports=tls_reports, deliver=config.workers_deliver)
        self.addService(build_control(self))
        if config.log_json is not None:
            from mta.daemon.logs import json_log_service

            json_log = json_log_service(config.log_json)
            json_log.setName("json-log")
            json_log.setServiceParent(self)
        if config.metrics_endpoint is not None:
            metrics = build_metrics(self, config.metrics_endpoint)
            metrics.setName("metrics")
            metrics.setServiceParent(self)
        if config.mta_sts.endpoint is not None:  # issue 21: MTA-STS policy hosting
            build_mta_sts(self).setServiceParent(self)
        if config.status.endpoint is not None:  # issue 21: the status page
            build_status(self, config.status.endpoint).setServiceParent(self)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        fastpoll.install(self.reactor)
        if self.worker_fds is None:
            # twistd's text log: the same lines, time stamps cached, one flush per turn
            speed_up_text_log(self.reactor)
        if self.runner is not None:
            self.runner.start(recover=self.worker_fds is None)  # a worker: only its new messages
        elif self.worker_fds is None:
            self.context.store.recover()
        self.context.store.prepare_spares()
        if not self.ports:  # not bound by privilegedStartService (no twistd --uid)
            self.listening = self._listen()
        if self.pool is not None and self.listening is not None:
            self.listening.addCallback(lambda _: self.pool.spawn_all(self.ports))
        if self.install_signals:
            signal.signal(signal.SIGHUP, self._sighup)

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind the listening ports while still root.

        ``twistd --uid mta --gid mta`` calls this, then drops privileges, then
        calls startService: ports below 1024 can only be bound here.
        """
        super().privilegedStartService()
        failed: list[Any] = []
        self.listening = self._listen()
        self.listening.addErrback(failed.append)
        if failed:  # endpoint.listen is synchronous for tcp: we know now
            raise SystemExit(f"mta: {failed[0].getErrorMessage()}")

    def _sighup(self, signum: int, frame: Any) -> None:
        if self.pool is not None:
            self.pool.signal_all("HUP")
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        if "json-log" in self.namedServices:
            self.getServiceNamed("json-log").reopen()  # SIGHUP after logrotate
        try:
            self.reload()
        except StartupError:
            pass  # already logged; the old configuration stays

    def reload(self) -> Config:
        """Re-read the configuration and every policy file; swap them in only if all load.

        Sessions in progress finish with what they started with; new sessions
        see the new users, aliases, identities, certificates and limits.
        Listeners and the queue location are not changed by a reload.
        """
        try:
            config = self.loader()
            policies = load_policies(config, self.reactor)
            from mta.smtp.pipeline import build_pipeline

            try:
                pipeline = build_pipeline(config, self.context, self.reactor)  # new sessions' checks
            except ConfigError:
                policies.directory.close()  # an SQL directory's threads: not kept
                raise
        except (ConfigError, StartupError) as e:
            log.error("reload failed, keeping the running configuration: {err}", err=e,
                      event="reload", result="failed")
            raise StartupError(str(e)) from None
        if config.listeners != self.config.listeners or config.queue_dir != self.config.queue_dir:
            log.warn("listeners and queue_dir changes need a restart; they were not applied")
            config = config.with_overrides(listeners=self.config.listeners, queue_dir=self.config.queue_dir)
        ctx = self.context
        ctx.config = config
        ctx.users, ctx.aliases, ctx.identities = policies.users, policies.aliases, policies.identities
        old_directory, ctx.directory = getattr(ctx, "directory", None), policies.directory
        if old_directory is not None and old_directory is not policies.directory:
            old_directory.close()  # an SQL directory's threads and connections
        ctx.tls, ctx.spf, ctx.authenticator = policies.tls, policies.spf, policies.authenticator
        ctx.pipeline = pipeline
        ctx.abuse.reconfigure(config.limits) if hasattr(ctx.abuse, "reconfigure") else None
        self.config = config
        log.info("configuration reloaded", event="reload", result="ok")
        return config

    @inlineCallbacks
    def _listen(self):
        if self.worker_fds is not None:
            self._adopt()
            return
        for listener in self.config.listeners:
            endpoint = listening_endpoint(self.reactor, listener.endpoint)
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

    def _adopt(self) -> None:
        """Worker process: take over the main process's listening sockets."""
        import os
        import socket

        from mta.system.proxy import PREFIX, StartAfterHeaderFactory

        by_name = {listener.name: listener for listener in self.config.listeners}
        for name, fd, family in self.worker_fds or ():
            listener = by_name[name]
            factory: Any = SMTPFactory(self.context, listener)
            if listener.endpoint.startswith(PREFIX):
                factory = StartAfterHeaderFactory(factory)
            self.ports.append(self.reactor.adoptStreamPort(fd, socket.AddressFamily(family), factory))
            os.close(fd)  # the reactor has its own duplicate

    @inlineCallbacks
    def stopService(self):  # noqa: N802
        """Graceful stop: no new connections; idle sessions get 421 at once, a
        transaction in DATA may finish (bounded by limits.shutdown_timeout) and
        then gets 421; deliveries in flight are waited for (bounded) by the runner."""
        self.context.accepting = False
        # maybeDeferred: a port that is closed already answers None (a worker's
        # adopted port, once the reactor began its shutdown).
        yield DeferredList([maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        workers_done = self.pool.stop() if self.pool is not None else None
        for session in list(self.context.sessions):
            session.shutdown()
        deadline = self.reactor.seconds() + self.config.limits.shutdown_timeout
        while self.context.sessions and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.05, lambda: None)
        for session in list(self.context.sessions):
            session.force_close()
        if workers_done is not None:
            yield workers_done
        if self.runner is not None:
            yield self.runner.stop()
        self.context.store.discard_spares()
        if self.context.directory is not None:
            self.context.directory.close()  # an SQL directory's threads and connections
        yield super().stopService()


def _submit_with_sql(context: Any, sender: str, recipients: list[str], data: bytes,
                     submitter: Any) -> Deferred[str]:
    """Local submission with an SQL directory: the recipients are looked up in its
    threads first (mta.policy.relay.Answers), then queued on the reactor thread;
    the database down is a temporary refusal (the sendmail caller retries)."""
    from mta.intake.submit import TEMPORARY, SubmitError
    from mta.policy.directory import DirectoryUnavailable
    from mta.policy.relay import Answers

    directory = context.directory
    domains = directory.local_domains()
    if domains is None:
        return fail(SubmitError("the directory cannot be reached; try again later", TEMPORARY))

    def unavailable(failure: Any) -> Any:
        failure.trap(DirectoryUnavailable)
        raise SubmitError("the directory cannot be reached; try again later", TEMPORARY)

    d = directory.defer(Answers, context.aliases, list(recipients))
    d.addErrback(unavailable)
    return d.addCallback(lambda answers: _local_submit(context)(
        context.store, context.config, answers, sender, recipients, data, submitter,
        srs=context.srs, local_domains=domains))


def _local_submit(context: Any) -> Any:
    """submit_message, or with [milters] local (Postfix's non_smtpd_milters, issue 17)
    submit_filtered through those milters."""
    from functools import partial

    from mta.intake.submit import submit_filtered, submit_message
    from mta.policy.milter.check import MilterCheck

    if not context.config.milters.local:
        return submit_message
    return partial(submit_filtered, MilterCheck(context))


def build_control(mta: MTAService) -> IService:
    """The control channel of ``mta`` (a child service): the commands get the
    running state, the queue, the runner, a bound submission and the reload."""
    from mta.daemon.control import ControlCommands, ControlService, max_request_size

    context = mta.context

    def submit(sender: str, recipients: list[str], data: bytes, submitter: Any) -> Deferred[str]:
        directory = context.directory
        if directory is not None and directory.blocking:
            return _submit_with_sql(context, sender, recipients, data, submitter)
        return _local_submit(context)(context.store, context.config, context.aliases, sender,
                                      recipients, data, submitter, srs=context.srs)

    commands = ControlCommands(context, context.store, mta.runner, submit, mta.reload, mta.reactor)
    return ControlService(mta.config.control_socket, commands, mta.reactor,
                          max_request_size(mta.config))


def build_mta_sts(mta: MTAService) -> IService:
    """The MTA-STS policy over HTTPS (a child service), reading ``mta``'s running
    configuration at each request. Raises StartupError for a bad certificate."""
    from mta.daemon.mtasts import mta_sts_service
    from mta.system.tls import TLSConfigError

    try:
        service = mta_sts_service(mta.reactor, mta.config, lambda: mta.config)
    except (TLSConfigError, OSError) as e:
        raise StartupError(f"mta_sts: {e}") from None
    service.setName("mta-sts")
    return service


def build_status(mta: MTAService, endpoint: str) -> IService:
    """The status page on ``endpoint`` (a child service): the queue's envelopes, and
    the running configuration's ``[status]`` credentials and host name."""
    from mta.daemon.status import status_service

    service = status_service(mta.reactor, endpoint, queue=mta.context.store,
                             settings=lambda: mta.config.status,
                             hostname=lambda: mta.config.hostname, clock=mta.reactor.seconds,
                             held=lambda: getattr(mta.runner, "held", ()))
    service.setName("status")
    return service


def build_metrics(mta: MTAService, endpoint: str) -> IService:
    """The metrics of ``mta`` served on ``endpoint`` (a child service): the queue
    listing, the sessions, the reply hook, the runner and the open connections."""
    from mta.daemon import metrics

    context = mta.context
    return metrics.metrics_service(mta.reactor, endpoint, queue=context.store,
                                   sessions=context.sessions, replies=context,
                                   deliveries=mta.runner, connections=mta.connections,
                                   checks=context)
