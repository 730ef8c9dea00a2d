"""Builds the queue runner and its couriers from the configuration.

Routing by recipient kind: ``local`` → Maildir (or the configured LMTP
server, or the configured delivery agent command), ``pipe`` → pipe alias commands, ``remote`` → SMTP via MX or
the smarthosts.  Kept apart from :mod:`mta.daemon.service` so tests can build the
same runner around their own store and reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.config import Config
from mta.delivery.cache import ConnectionCache
from mta.delivery.client import Timeouts
from mta.delivery.dane import DanePolicy, TLSReport
from mta.delivery.lmtp import LMTPCourier
from mta.delivery.local import CommandCourier, MaildirCourier, PipeCourier
from mta.delivery.mx import MXResolver
from mta.delivery.remote import RemoteCourier
from mta.queue.runner import QueueRunner, Router
from mta.queue.store import QueueStore
from mta.system.dns import (
    CachingResolver,
    ValidatingResolver,
    loopback_servers,
    make_resolver,
    nameservers,
)


def build_dane(config: Config, reactor: Any, report: TLSReport | None = None) -> DanePolicy | None:
    """The DANE policy over the configured validating resolver (``[dane]``), its
    check started; None when DANE is off."""
    if not config.dane.enabled:
        return None
    servers = list(config.dane.resolvers) or nameservers(config.dns)
    untrusted = "" if loopback_servers(servers) else (
        f"the resolver {servers[0][0]} is not on loopback: its AD bit cannot be trusted")
    dane = DanePolicy(ValidatingResolver(servers, config.dns.timeout, reactor), reactor,
                      check_name=config.dane.check_name, check_bogus=config.dane.check_bogus,
                      recheck_interval=config.dane.recheck_interval, report=report,
                      required=config.delivery.tls_policy == "dane-only", untrusted=untrusted)
    dane.start()
    return dane


def build_couriers(config: Config, reactor: Any, trust_root: Any = None,
                   store: QueueStore | None = None,
                   tls_forward: Callable[[bytes], None] | None = None,
                   sts_refresh: bool = True, report_signer: Any = None) -> dict[str, Any]:
    d = config.delivery
    if d.lmtp:
        local: Any = LMTPCourier(d.lmtp, reactor, config.hostname,
                                 Timeouts(connect=d.connect_timeout))
    elif d.mailbox_command:
        local = CommandCourier(d.mailbox_command, d.pipe_timeout, reactor)
    else:
        local = MaildirCourier(config.mail_dir, config.hostname, fsync=config.fsync,
                               template=config.maildir.template)
    resolver: Any = make_resolver(config.dns, reactor)
    plain_resolver = resolver  # TXT lookups (the cache below keeps MX, A and AAAA only)
    if config.dns.cache_max_ttl > 0:
        resolver = CachingResolver(resolver, reactor, max_ttl=config.dns.cache_max_ttl)
    mx = MXResolver(resolver, own_names=(config.hostname,))
    tls = build_tls_policies(config, reactor, plain_resolver, resolver, store, tls_forward,
                             sts_refresh, report_signer)
    return {
        "local": local,
        "pipe": PipeCourier(d.pipe_timeout, reactor),
        "remote": RemoteCourier(config, mx, reactor, trust_root=trust_root,
                                dane=build_dane(config, reactor, report=tls.get("tlsrpt")),
                                **tls),
    }


def build_tls_policies(config: Config, reactor: Any, txt_resolver: Any, resolver: Any,
                       store: QueueStore | None,
                       tls_forward: Callable[[bytes], None] | None = None,
                       sts_refresh: bool = True, report_signer: Any = None) -> dict[str, Any]:
    """MTA-STS (``[delivery.mta_sts]``) and TLS reporting (``[tls_reports]``, which needs the
    queue ``store`` its reports enter): the remote courier's ``sts`` and
    ``tlsrpt``, started; nothing when neither is enabled.  ``tls_forward`` (a
    worker process): the TLS counts go there, one line each, to the main
    process's reporter (mta.delivery.tlsrpt.ForwardedCounts), instead of a
    reporter of this process's own.  ``sts_refresh`` False (a worker): no
    proactive MTA-STS refresh timer here (the main process's refreshes the
    shared cache files, which this process reads when its copy is stale), so
    N processes do not fetch every policy N times.  ``report_signer``: DKIM-signs
    the report mail (RFC 8460 §3; mta.policy.dkim.DKIMSigner, the one the SMTP
    side signs with, handed down by the daemon); None: unsigned."""
    parts: dict[str, Any] = {}
    if config.tls_reports.enabled and tls_forward is not None:
        from mta.delivery.tlsrpt import ForwardedCounts

        parts["tlsrpt"] = ForwardedCounts(tls_forward)
    elif config.tls_reports.enabled and store is not None:
        from mta.delivery.tlsrpt import ReportSettings, TLSReporter

        r = config.tls_reports
        settings = ReportSettings(submitter=config.hostname, organization=r.organization,
                                  contact=r.contact, from_address=r.from_address,
                                  send_delay=r.send_delay)
        local_domains = frozenset(config.local_domains)
        parts["tlsrpt"] = TLSReporter(store, txt_resolver, reactor, config.data_dir / "tlsrpt",
                                      settings, is_local=local_domains.__contains__,
                                      signer=report_signer)
        parts["tlsrpt"].start()
    if config.delivery_sts.enabled:
        from mta.delivery.mtasts import MTASTS, PolicyCache, PolicyFetcher, load_trust_root

        s = config.delivery_sts
        trust = load_trust_root(s.ca_file) if s.ca_file is not None else None
        fetcher = PolicyFetcher(reactor, resolver, port=s.https_port, trust_root=trust,
                                timeout=s.fetch_timeout, max_size=s.max_policy_size)
        parts["sts"] = MTASTS(txt_resolver, fetcher, PolicyCache(config.data_dir / "mta-sts"),
                              reactor, recorder=parts.get("tlsrpt"),
                              refresh_interval=s.refresh_interval if sts_refresh else 0,
                              trust_root=trust)
        parts["sts"].start()
    return parts


@dataclass(frozen=True)
class Delivery:
    """The delivery side as the daemon wires it: the runner, and the remote
    courier's open connections (read by the metrics)."""

    runner: QueueRunner
    connections: ConnectionCache
    # The TLS report counter (mta.delivery.tlsrpt.TLSReporter), where the
    # workers' counts go (mta.daemon.workers); None when not configured.
    tlsrpt: Any = None


def build_delivery(config: Config, store: QueueStore, reactor: Any, trust_root: Any = None,
                   tls_forward: Callable[[bytes], None] | None = None,
                   sts_refresh: bool = True, report_signer: Any = None) -> Delivery:
    """The runner and its couriers; ``tls_forward``, ``sts_refresh``, ``report_signer``:
    see build_tls_policies."""
    couriers = build_couriers(config, reactor, trust_root, store=store, tls_forward=tls_forward,
                              sts_refresh=sts_refresh, report_signer=report_signer)
    router = Router(couriers, smarthost=bool(config.delivery.smarthosts))
    local_domains = frozenset(config.local_domains)
    runner = QueueRunner(store, router, reactor, config.delivery, config.hostname,
                         is_local=local_domains.__contains__)
    return Delivery(runner, couriers["remote"].cache, couriers["remote"].tlsrpt)


def build_runner(config: Config, store: QueueStore, reactor: Any, trust_root: Any = None) -> QueueRunner:
    return build_delivery(config, store, reactor, trust_root).runner
