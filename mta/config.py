"""The MTA's configuration: one typed object, loaded from TOML and validated once.

Every other module receives the pieces it needs from here; nothing reads the
configuration file or the environment on its own.  A problem in the file raises
:class:`ConfigError` naming the key and what is wrong with it, which the plugin
prints instead of a traceback.
"""

from __future__ import annotations

import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import _parseServer, clientFromString  # type: ignore[attr-defined]

LISTENER_KINDS = ("mx", "submission", "submissions")
# Outbound SMTP stages with their own timeout (mta.delivery.client.Timeouts).
STAGES = ("greeting", "ehlo", "tls", "mail", "rcpt", "data_init", "data_block", "data_end", "quit")
# The SMTP session's built-in checks (mta.policy.checks), in the order they run
# by default; [checks] order may reorder them, leave some out or add others.
CHECKS = ("limits", "helo", "sender_binding", "user_rate", "spf", "recipient", "forged_authres",
          "loop", "submission_headers", "from_binding", "msgauth", "milter", "srs")
CHECK_ON_ERROR = ("tempfail", "accept")
# Built-in checks that run only when [checks] order names them (issue 17: DNS
# blocklists and greylisting, each with a section of its own; off by default).
OPTIONAL_CHECKS = ("dnsbl", "greylist")


class ConfigError(Exception):
    """A configuration value is missing, has the wrong type or makes no sense."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Listener:
    """One listening socket: a Twisted server endpoint string and its role.

    ``kind`` is ``mx`` (port 25: mail for our domains, relay only after AUTH),
    ``submission`` (587: STARTTLS then AUTH required before MAIL) or
    ``submissions`` (465: implicit TLS, AUTH required).
    """

    name: str
    endpoint: str
    kind: str
    # The milters of this listener, in order (a list of [milters.NAME] names; [] for
    # none), overriding [milters] smtpd and the kind's list, as master.cf's
    # ``-o smtpd_milters=`` for one service; None: those lists apply.
    milters: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    # Optional directory of <hostname>/{fullchain.pem,privkey.pem} chosen by SNI.
    cert_dir: Path | None = None
    # Ask each TLS client for a certificate (never required, never verified:
    # Postfix's smtpd_tls_ask_ccert), for the milter macros {cert_subject} and
    # {cert_issuer}.
    ask_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 10
    max_line_length: int = 998  # RFC 5322 §2.1.1, octets without CRLF
    max_command_length: int = 2048  # RFC 5321 §4.5.3.1.4 says 512; extensions need more
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7
    session_timeout: float = 1800.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    max_received_headers: int = 50
    max_header_size: int = 1024 * 1024
    auth_failure_delay: float = 1.0  # before each 535; grows with each failure in a session
    max_auth_failures: int = 3  # per session, then 421 and close
    # Per client IP and per account: this many AUTH failures within auth_block_window
    # seconds block AUTH from that IP / for that account for auth_block_time seconds
    # (never extended; blocked attempts get 454 and are not counted; the rule is in
    # mta.policy.limits.AbuseLimits).
    auth_block_failures: int = 10
    auth_block_window: float = 600.0
    auth_block_time: float = 900.0
    # New connections per client IP per minute (0: no limit).
    connection_rate_per_ip: int = 120
    # Messages per authenticated user per hour (0: no limit).
    messages_per_user_per_hour: int = 1000
    # Seconds to wait before the greeting; a client that talks first is refused
    # (the "early talker" check). 0 turns the check off.
    greeting_delay: float = 0.0
    # On SIGTERM, how long a transaction in DATA may take to finish.
    shutdown_timeout: float = 30.0


@dataclass(frozen=True)
class SPFConfig:
    enabled: bool = True
    reject_fail: bool = True
    timeout: float = 10.0


@dataclass(frozen=True)
class DKIMConfig:
    verify: bool = True  # inbound mail from unauthenticated clients
    # Messages up to this size are held in memory at the end of DATA to be
    # verified or signed; larger ones are streamed to disk and neither.
    max_message_size: int = 1024 * 1024
    # (domain, selector, key file) for signing mail from our users.
    keys: tuple[tuple[str, str, Path], ...] = ()


@dataclass(frozen=True)
class DMARCConfig:
    enabled: bool = True
    reject: bool = False  # reject p=reject failures (off by default: record only)


@dataclass(frozen=True)
class DNSConfig:
    # Empty: use /etc/resolv.conf.
    servers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0
    # Keep MX and address answers for delivery up to this many seconds (and no
    # longer than their TTL); 0 asks the servers every time.
    cache_max_ttl: float = 3600.0


@dataclass(frozen=True)
class DANEConfig:
    """``[dane]``: DANE for MX delivery (RFC 7672; mta.delivery.dane)."""

    enabled: bool = False
    # The local validating resolver whose AD bit is trusted (loopback only);
    # empty: dns.servers (or resolv.conf), which must then be on loopback.
    resolvers: tuple[tuple[str, int], ...] = ()
    # Checked at start: this name must come back with the AD bit (it is signed)...
    check_name: str = "."
    # ...and this one, if set, with SERVFAIL (it is deliberately bogus).
    check_bogus: str = ""
    # A failed check refuses DANE; it is made again at most this often.
    recheck_interval: float = 60.0


@dataclass(frozen=True)
class AliasConfig:
    drop_characters: str = "."
    suffix_separators: str = "+"
    max_depth: int = 10


# --- the per-destination route table ([delivery.route."KEY"], issue 18) -------------
# TLS levels a route entry may name, as Postfix's smtp_tls_policy_maps spells them
# (mta.delivery.routes maps them to the client's policies).
ROUTE_TLS = ("none", "may", "encrypt", "verify", "dane", "mta-sts")


@dataclass(frozen=True)
class RouteEntry:
    """One ``[delivery.route."KEY"]`` entry; every value left out (None) falls back
    to the global setting.  ``key`` is a recipient domain (``example.com``), its
    subdomains (``.example.com``) or a next hop (``[relay.example.net]:587``, or
    ``[relay.example.net]`` for any port).  Resolution and precedence are in
    :mod:`mta.delivery.routes`."""

    key: str
    tls: str | None = None  # one of ROUTE_TLS
    port: int | None = None  # MX hosts' port, and a smarthost's without ":port"
    smarthost: str | None = None  # "[host]:port" (no MX lookup) or "host:port" (MX of host)
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed or logged
    bind_address: str | None = None  # IPv4 source address of the connection
    bind_address6: str | None = None  # IPv6 source address
    helo_name: str | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    # Smarthost as "host:port" strings; empty means MX delivery.
    smarthosts: tuple[str, ...] = ()
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    smarthost_tls: str = "opportunistic"  # "none", "opportunistic", "require", "verify"
    # For MX delivery: "opportunistic" or "verify", or with [dane] enabled "dane"
    # (DANE where the MX host has usable TLSA records, else opportunistic) or
    # "dane-only" (hosts without them are not used).
    tls_policy: str = "opportunistic"
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)
    retry_jitter: float = 0.1
    max_queue_lifetime: float = 5 * 24 * 3600.0
    delay_warning: float | None = None
    max_connections: int = 100
    max_connections_per_destination: int = 10
    connect_timeout: float = 30.0
    # Seconds an outbound connection is kept open after a delivery for the next
    # message to the same server (mta.delivery.cache); 0 closes each at once.
    connection_cache_time: float = 2.0
    # Test and benchmark hook: the TCP port MX hosts are contacted on.
    mx_port: int = 25
    mailbox_command: str | None = None
    lmtp: str | None = None
    pipe_timeout: float = 300.0
    # Per-relay settings, by the smarthost text ("host:port"): (text, tls, username, password);
    # a relay without an entry uses smarthost_tls / smarthost_username / smarthost_password.
    relays: tuple[tuple[str, str, str | None, str | None], ...] = ()
    # Per-stage client timeouts ([delivery.timeouts]: greeting, ehlo, tls, mail, rcpt,
    # data_init, data_block, data_end, quit); unset stages keep RFC 5321 §4.5.3.2 values.
    stage_timeouts: tuple[tuple[str, float], ...] = ()
    # The From: address of bounces and delay notices (their envelope sender is
    # always <>, RFC 5321 §4.5.5). Loading fills in MAILER-DAEMON@ the first local
    # domain (the host name without one); None here means MAILER-DAEMON@hostname.
    bounce_from: str | None = None
    # Outbound source addresses (Postfix's smtp_bind_address / smtp_bind_address6):
    # connections to IPv4 servers are made from bind_address, to IPv6 ones from
    # bind_address6; unset: the kernel chooses.  helo_name: the EHLO name sent
    # (Postfix's smtp_helo_name; unset: hostname).
    bind_address: str | None = None
    bind_address6: str | None = None
    helo_name: str | None = None
    # [delivery.route."KEY"] entries (mta.delivery.routes), in file order.
    routes: tuple[RouteEntry, ...] = ()


# --- MTA-STS for delivery, TLS reporting (mta.delivery.mtasts, mta.delivery.tlsrpt) ---


@dataclass(frozen=True)
class STSDeliveryConfig:
    """[delivery.mta_sts]: apply the MTA-STS policies of destination domains (RFC 8461;
    [mta_sts] is our own policy, served to others)."""

    enabled: bool = False
    # The whole HTTPS fetch of one policy (DNS, connect, TLS, headers, body).
    fetch_timeout: float = 10.0
    # Octets a policy may have (RFC 8461 §3.3 suggests 64 KiB).
    max_policy_size: int = 65536
    # How often cached policies past half their max_age are fetched again.
    refresh_interval: float = 3600.0
    # CA certificates (PEM) the policy host's certificate must chain to; unset:
    # the system trust store.
    ca_file: Path | None = None
    # Test hook: the port of https://mta-sts.<domain>/ (443).
    https_port: int = 443


@dataclass(frozen=True)
class TLSReportsConfig:
    """[tls_reports]: count outbound TLS outcomes and mail daily reports (RFC 8460)."""

    enabled: bool = False
    # The report's organization-name and contact-info; loading fills in the host
    # name and from_address when unset.
    organization: str = ""
    contact: str = ""
    # From: and envelope sender of the reports; loading fills in delivery.bounce_from.
    from_address: str = ""
    # Seconds after UTC midnight the previous day's reports are sent.
    send_delay: float = 900.0


def _delivery_sts(table: Any, base: Path) -> STSDeliveryConfig:
    prefix = "delivery.mta_sts."
    if not isinstance(table, dict):
        raise ConfigError("delivery.mta_sts", "must be a table")
    types = {"enabled": bool, "fetch_timeout": float, "max_policy_size": int,
             "refresh_interval": float, "ca_file": str, "https_port": int}
    cfg = _dataclass_from(table, STSDeliveryConfig, prefix, types)
    _positive(cfg.fetch_timeout, prefix + "fetch_timeout")
    _positive(cfg.refresh_interval, prefix + "refresh_interval")
    if not 1 <= cfg.max_policy_size <= 1024 * 1024:
        raise ConfigError(prefix + "max_policy_size", "must be from 1 to 1048576 octets")
    if not 0 < cfg.https_port < 65536:
        raise ConfigError(prefix + "https_port", "must be a port number")
    ca_file = _path(base, cfg.ca_file)
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(prefix + "ca_file", f"{ca_file} is not a file")
    return replace(cfg, ca_file=ca_file)


def _tls_reports(table: dict[str, Any], hostname: str, bounce_from: str | None) -> TLSReportsConfig:
    types = {"enabled": bool, "organization": str, "contact": str, "from_address": str,
             "send_delay": float}
    cfg = _dataclass_from(table, TLSReportsConfig, "tls_reports.", types)
    if not 0 <= cfg.send_delay < 86400:
        raise ConfigError("tls_reports.send_delay", "must be from 0 to 86399 seconds")
    from_address = cfg.from_address or bounce_from or f"MAILER-DAEMON@{hostname}"
    from mta.mail.address import AddressError, parse_mailbox

    try:
        from_address = str(parse_mailbox(from_address, smtputf8=True))
    except AddressError as e:
        raise ConfigError("tls_reports.from_address", f"{from_address!r} is not an address: {e}") \
            from None
    return replace(cfg, from_address=from_address, organization=cfg.organization or hostname,
                   contact=cfg.contact or from_address)


@dataclass(frozen=True)
class CheckSettings:
    """How the pipeline runs one check (mta.smtp.pipeline)."""

    # Seconds an asynchronous answer may take (a synchronous check is not timed).
    timeout: float = 120.0
    # A check that raises, fails or times out: "tempfail" (451 4.3.0, 421 at
    # connect) or "accept" (as if it had accepted).
    on_error: str = "tempfail"
    # A check that is not built in: "package.module:factory", called with the
    # server context (configuration and policy objects) to make the check.
    factory: str | None = None


@dataclass(frozen=True)
class ChecksConfig:
    order: tuple[str, ...] = CHECKS
    settings: tuple[tuple[str, CheckSettings], ...] = ()

    def settings_for(self, name: str) -> CheckSettings:
        for key, settings in self.settings:
            if key == name:
                return settings
        return _DEFAULT_CHECK_SETTINGS.get(name) or CheckSettings()


# The milter check bounds each milter step itself (MilterSettings' timeouts);
# the pipeline's limit on its whole stage is only a last resort (a 100 MB body).
_DEFAULT_CHECK_SETTINGS = {"milter": CheckSettings(timeout=3600.0)}


# --- operator tools (issue 21): Maildir layout, MTA-STS policy hosting -----------------

# The variables of maildir.template (Dovecot's mail_location names, doc/configuration).
MAILDIR_VARIABLES = {"u": "the full address (user@domain)", "n": "the local part",
                     "d": "the domain", "%": "a literal %"}
MTA_STS_MODES = ("enforce", "testing", "none")  # RFC 8461 §3.2


@dataclass(frozen=True)
class MaildirConfig:
    # Where a local mailbox's Maildir is, relative to mail_dir: %u the full address,
    # %n the local part, %d the domain, %% a %; other text is kept (a fixed folder).
    template: str = "%d/%n"


@dataclass(frozen=True)
class MTASTSConfig:
    """The MTA-STS policy of our domains (RFC 8461 §3.2) and where it is served.

    ``endpoint`` None: not served (``mta dns-check`` still shows the policy).
    The certificate is ``cert_file``/``key_file`` when given, else [tls]'s
    (with its ``cert_dir`` chosen by SNI: ``mta-sts.<domain>`` names).
    """

    endpoint: str | None = None
    mode: str = "testing"
    mx: tuple[str, ...] = ()  # empty: the hostname
    max_age: int = 604800  # one week; RFC 8461 §3.2 allows up to 31557600
    cert_file: Path | None = None
    key_file: Path | None = None


# --- [directory]: where users, aliases, identities, domains and DKIM keys live (issue 20) ---


DIRECTORY_BACKENDS = ("files", "sqlite", "postgresql")


@dataclass(frozen=True)
class DirectoryConfig:
    """``[directory]``: the files of today (default) or one SQL database.

    ``path`` is the SQLite file (default ``data_dir/directory.sqlite``); ``dsn``
    the PostgreSQL connection string (libpq), required for ``postgresql``;
    ``pool_size`` the connections (and lookup threads) a node keeps; lookups
    are cached ``cache_ttl`` seconds (answers "no" too), at most ``cache_size``
    entries; ``timeout`` bounds waiting for a connection and each statement.
    ``allow_pipes``: an alias row may name a ``| command`` (off: only the
    files may, since whoever can write the table could run commands as the MTA).
    """

    backend: str = "files"
    path: Path | None = None
    dsn: str | None = None
    pool_size: int = 4
    cache_ttl: float = 30.0
    cache_size: int = 10000
    timeout: float = 5.0
    allow_pipes: bool = False


def _directory(table: dict[str, Any], base: Path, data_dir: Path) -> DirectoryConfig:
    prefix = "directory."
    _check_keys(table, {"backend", "path", "dsn", "pool_size", "cache_ttl", "cache_size",
                        "timeout", "allow_pipes"}, prefix)
    backend = _get(table, "backend", str, prefix, "files")
    if backend not in DIRECTORY_BACKENDS:
        raise ConfigError(prefix + "backend", f"must be one of {', '.join(DIRECTORY_BACKENDS)}")
    dsn = _get(table, "dsn", str, prefix, None)
    if backend == "postgresql" and not dsn:
        raise ConfigError(prefix + "dsn", "is required for backend = \"postgresql\"")
    pool_size = _get(table, "pool_size", int, prefix, 4)
    if not 1 <= pool_size <= 100:
        raise ConfigError(prefix + "pool_size", "must be from 1 to 100")
    cache_ttl = _get(table, "cache_ttl", float, prefix, 30.0)
    if not 0 <= cache_ttl <= 3600:
        raise ConfigError(prefix + "cache_ttl", "must be from 0 to 3600 seconds")
    cache_size = _get(table, "cache_size", int, prefix, 10000)
    if not 0 <= cache_size <= 10_000_000:
        raise ConfigError(prefix + "cache_size", "must be from 0 to 10000000")
    path = _path(base, _get(table, "path", str, prefix, None))
    return DirectoryConfig(
        backend=backend,
        path=path or (data_dir / "directory.sqlite" if backend == "sqlite" else None),
        dsn=dsn, pool_size=pool_size, cache_ttl=cache_ttl, cache_size=cache_size,
        timeout=_positive(_get(table, "timeout", float, prefix, 5.0), prefix + "timeout"),
        allow_pipes=_get(table, "allow_pipes", bool, prefix, False),
    )


# --- issue 17: DNS blocklists ([dnsbl]) and greylisting ([greylist]) ---------------


@dataclass(frozen=True)
class DNSBLSite:
    """One ``[dnsbl] sites`` entry, as Postfix's postscreen_dnsbl_sites writes it:
    ``zone[=filter][*weight]``.  ``filter``: the allowed values of each octet of
    the A record (``127.0.0.[2..11]``, ``127.0.0.[2;4]``), None for any answer."""

    zone: str
    filter: tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int]] | None = None
    weight: int = 1
    text: str = ""


@dataclass(frozen=True)
class DNSBLConfig:
    sites: tuple[DNSBLSite, ...] = ()
    # A client whose summed weights reach this is refused (postscreen_dnsbl_threshold).
    threshold: int = 1
    # A client whose sum is at or below this (< 0; 0 = off) is allowlisted: it is
    # not greylisted (postscreen_dnsbl_allowlist_threshold).
    allowlist_threshold: int = 0
    # "connect": 554 greeting, then only QUIT; "rcpt": each RCPT refused with 554
    # except exempt_recipients.
    stage: str = "connect"
    # At RCPT: local parts (at any domain) or whole addresses always accepted.
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")
    # Answers are kept for their TTL, at most this long; at most max_cache_entries.
    cache_max_ttl: float = 3600.0
    max_cache_entries: int = 10000


@dataclass(frozen=True)
class GreylistConfig:
    db: Path | None = None  # loading fills in data_dir/greylist.sqlite
    delay: float = 300.0  # a retry passes this long after the first attempt...
    window: float = 2 * 86400.0  # ...and no later than this after it
    max_age: float = 35 * 86400.0  # a triplet not seen this long is forgotten
    auto_allow: int = 5  # successful retries after which a client network passes (0: never)
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


@dataclass(frozen=True)
class StatusConfig:
    """The read-only status page (issue 21, :mod:`mta.daemon.status`).

    ``endpoint`` None: not served.  ``local``: the endpoint listens on loopback
    (or a UNIX socket) only; otherwise a ``token`` (``Authorization: Bearer``)
    or a ``password`` (HTTP Basic with ``user``) is required at load.
    """

    endpoint: str | None = None
    local: bool = True
    token: str | None = None
    user: str = "status"
    password: str | None = None


@dataclass(frozen=True)
class Config:
    hostname: str
    listeners: tuple[Listener, ...]
    local_domains: tuple[str, ...]
    data_dir: Path
    queue_dir: Path
    mail_dir: Path
    domains_dir: Path
    control_socket: Path
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: Limits = field(default_factory=Limits)
    spf: SPFConfig = field(default_factory=SPFConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    aliases: AliasConfig = field(default_factory=AliasConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    dane: DANEConfig = field(default_factory=DANEConfig)
    milters: MiltersConfig = field(default_factory=lambda: MiltersConfig())
    delivery_sts: STSDeliveryConfig = field(default_factory=STSDeliveryConfig)
    tls_reports: TLSReportsConfig = field(default_factory=TLSReportsConfig)
    dnsbl: DNSBLConfig = field(default_factory=DNSBLConfig)  # issue 17
    greylist: GreylistConfig = field(default_factory=GreylistConfig)  # issue 17
    # Loopback is not trusted by default: these networks may relay without AUTH.
    relay_networks: tuple[str, ...] = ()
    # Authenticated users may only use their own address (and +suffixes) or the
    # identities listed in domains/<domain>/identities as envelope sender.
    sender_binding: bool = True
    # Also check the From header's addresses of authenticated mail the same way.
    sender_binding_from: bool = False
    # The EHLO/HELO name: "normal" a host name or address literal (single labels
    # and underscores allowed), "strict" also fully qualified, "off" any word.
    helo_check: str = "normal"
    # MAIL FROM/RCPT TO paths must be in angle brackets (RFC 5321 §4.1.2); false
    # also takes a bare ``user@domain``, as Postfix's strict_rfc821_envelopes = no.
    strict_envelopes: bool = False
    # Secret for SRS (forwarded mail); unset: generated once in data_dir/srs-secret.
    srs_secret: str | None = None
    metrics_endpoint: str | None = None
    log_json: Path | None = None
    fsync: bool = True
    # "fsync": each queue file and the directory are fsynced; "syncfs": a batch
    # of queue changes is made durable by one syncfs(2) of the queue's filesystem
    # (cheaper; best when the queue has a filesystem of its own).
    queue_sync: str = "fsync"
    # Processes accepting SMTP connections (mta.daemon.workers); the first one also delivers.
    workers: int = 1
    # With workers > 1: whether each worker makes the first delivery attempt of
    # what it accepted (True) or hands every message to the first process's
    # runner (False, the default: on the 2-core benchmark machine bench/ab.py
    # measured the worker-side delivery 8 % slower and 6 % more CPU a message).
    workers_deliver: bool = False
    maildir: MaildirConfig = field(default_factory=MaildirConfig)
    mta_sts: MTASTSConfig = field(default_factory=MTASTSConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    counters: CountersConfig = field(default_factory=lambda: CountersConfig())  # issue 20: Redis

    def users_file(self, domain: str) -> Path:
        return self.domains_dir / domain / "users"

    def aliases_file(self, domain: str) -> Path:
        return self.domains_dir / domain / "aliases"

    def identities_file(self, domain: str) -> Path:
        return self.domains_dir / domain / "identities"

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **changes)


# --- loading -----------------------------------------------------------------


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", "unknown key")


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], prefix: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float):
        raise ConfigError(prefix + key, f"must be a {kind.__name__}, not a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(prefix + key, f"must be a {names}, got {type(value).__name__}")
    return value


def _positive(value: float, key: str) -> float:
    if value <= 0:
        raise ConfigError(key, "must be greater than zero")
    return value


def _dataclass_from(table: dict[str, Any], cls: type, prefix: str, types: dict[str, Any]) -> Any:
    _check_keys(table, set(types), prefix)
    defaults = cls()
    values = {}
    for key, kind in types.items():
        values[key] = _get(table, key, kind, prefix, getattr(defaults, key))
    return cls(**values)


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def _host_port(value: str, key: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(key, f"{value!r}: port must be a number") from None
    if not 0 < number < 65536:
        raise ConfigError(key, f"{value!r}: port out of range")
    return host, number


def _validate_endpoint(endpoint: str, key: str) -> None:
    try:
        _parseServer(endpoint, None)
    except Exception as e:
        raise ConfigError(key, f"bad endpoint description {endpoint!r}: {e}") from None


def _validate_client_endpoint(endpoint: str, key: str) -> None:
    """A Twisted client endpoint description (``unix:/path``, ``tcp:host:port``)."""
    try:
        clientFromString(None, endpoint)  # parses only; nothing connects without a reactor
    except Exception as e:
        raise ConfigError(key, f"bad client endpoint description {endpoint!r}: {e}") from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the configuration file (or the embedded default)."""
    if path is None:
        from mta.defaults import DEFAULT_CONFIG, default_base

        raw = tomllib.loads(DEFAULT_CONFIG)
        base = default_base()
    else:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), f"not valid TOML: {e}") from None
        base = path.resolve().parent
    return config_from_dict(raw, base, overrides or {})


def config_from_dict(raw: dict[str, Any], base: Path, overrides: dict[str, Any] | None = None) -> Config:
    overrides = overrides or {}
    top = {
        "hostname", "local_domains", "data_dir", "queue_dir", "mail_dir", "domains_dir",
        "control_socket", "relay_networks", "metrics", "log_json", "fsync", "sender_binding", "sender_binding_from", "queue_sync",
        "workers", "workers_deliver", "helo_check", "strict_envelopes",
        "srs_secret",
        "listeners", "tls", "limits", "spf", "dns", "aliases", "delivery", "dkim", "dmarc",
        "checks", "dane",
        "maildir", "mta_sts", "tls_reports",
        "milters",  # issue 17: the milter client
        "directory",
        "dnsbl", "greylist",
        "status",
        "counters",  # issue 20: shared abuse counters (Redis)
    }
    _check_keys(raw, top, "")
    hostname = _get(raw, "hostname", str, "", None) or socket.getfqdn()
    data_dir = _path(base, _get(raw, "data_dir", str, "", "var"))
    assert data_dir is not None
    queue_dir = _path(base, overrides.get("queue_dir") or _get(raw, "queue_dir", str, "", None)) or data_dir / "queue"
    mail_dir = _path(base, _get(raw, "mail_dir", str, "", None)) or data_dir / "mail"
    domains_dir = _path(base, _get(raw, "domains_dir", str, "", None)) or base / "domains"
    control_socket = _path(base, _get(raw, "control_socket", str, "", None)) or data_dir / "control.sock"

    domains = _get(raw, "local_domains", list, "", [])
    local_domains = []
    for i, d in enumerate(domains):
        if not isinstance(d, str) or not d:
            raise ConfigError(f"local_domains[{i}]", "must be a non-empty string")
        from mta.mail.address import AddressError, normalize_domain

        try:
            local_domains.append(normalize_domain(d))
        except AddressError as e:
            raise ConfigError(f"local_domains[{i}]", str(e)) from None

    listeners_raw = _table(raw, "listeners")
    listeners = []
    for name, spec in listeners_raw.items():
        prefix = f"listeners.{name}."
        if not isinstance(spec, dict):
            raise ConfigError(f"listeners.{name}", "must be a table with endpoint and kind")
        _check_keys(spec, {"endpoint", "kind", "milters"}, prefix)
        endpoint = overrides.get("listen", {}).get(name) or _get(spec, "endpoint", str, prefix, None)
        if endpoint is None:
            raise ConfigError(prefix + "endpoint", "is required")
        kind = _get(spec, "kind", str, prefix, name)
        if kind not in LISTENER_KINDS:
            raise ConfigError(prefix + "kind", f"must be one of {', '.join(LISTENER_KINDS)}")
        endpoint = listen_endpoint(endpoint, prefix + "endpoint")
        _validate_endpoint(endpoint, prefix + "endpoint")
        listeners.append(Listener(name, endpoint, kind, _listener_milters(spec, prefix)))
    for name in overrides.get("listen", {}):
        if name not in listeners_raw:
            raise ConfigError(f"--listen {name}", "no listener of that name in the configuration")

    tls_raw = _table(raw, "tls")
    _check_keys(tls_raw, {"cert_file", "key_file", "cert_dir", "ask_client_cert"}, "tls.")
    tls = TLSConfig(
        cert_file=_path(base, _get(tls_raw, "cert_file", str, "tls.", None)),
        key_file=_path(base, _get(tls_raw, "key_file", str, "tls.", None)),
        cert_dir=_path(base, _get(tls_raw, "cert_dir", str, "tls.", None)),
        ask_client_cert=_get(tls_raw, "ask_client_cert", bool, "tls.", False),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("tls.key_file" if tls.key_file is None else "tls.cert_file",
                          "cert_file and key_file go together")
    for lst in listeners:
        if lst.kind == "submissions" and not tls.enabled:
            raise ConfigError(f"listeners.{lst.name}.kind", "submissions (implicit TLS) needs tls.cert_file")

    limits = _dataclass_from(_table(raw, "limits"), Limits, "limits.", {
        "max_message_size": int, "max_recipients": int, "max_errors": int,
        "max_line_length": int, "max_command_length": int, "command_timeout": float,
        "session_timeout": float, "max_connections": int, "max_connections_per_ip": int,
        "max_received_headers": int, "max_header_size": int, "auth_failure_delay": float,
        "max_auth_failures": int, "auth_block_failures": int, "auth_block_window": float,
        "auth_block_time": float, "connection_rate_per_ip": int, "messages_per_user_per_hour": int,
        "greeting_delay": float, "shutdown_timeout": float,
    })
    for key in ("max_message_size", "max_recipients", "max_errors", "command_timeout",
                "session_timeout", "max_connections", "max_connections_per_ip",
                "max_received_headers", "max_auth_failures"):
        _positive(getattr(limits, key), "limits." + key)
    for key in ("connection_rate_per_ip", "messages_per_user_per_hour", "greeting_delay",
                "auth_failure_delay", "shutdown_timeout", "auth_block_failures"):
        if getattr(limits, key) < 0:
            raise ConfigError("limits." + key, "must not be negative")
    if limits.max_command_length < 512:
        raise ConfigError("limits.max_command_length", "must be at least 512 (RFC 5321 §4.5.3.1.4)")
    if limits.max_line_length < 998:
        raise ConfigError("limits.max_line_length", "must be at least 998 (RFC 5322 §2.1.1)")

    spf = _dataclass_from(_table(raw, "spf"), SPFConfig, "spf.",
                          {"enabled": bool, "reject_fail": bool, "timeout": float})

    dns_raw = _table(raw, "dns")
    _check_keys(dns_raw, {"servers", "timeout", "cache_max_ttl"}, "dns.")
    servers = []
    for i, s in enumerate(overrides.get("dns_servers") or _get(dns_raw, "servers", list, "dns.", [])):
        if not isinstance(s, str):
            raise ConfigError(f"dns.servers[{i}]", "must be a string such as '127.0.0.1:53'")
        servers.append(_host_port(s, f"dns.servers[{i}]", 53))
    cache_max_ttl = _get(dns_raw, "cache_max_ttl", float, "dns.", 3600.0)
    if cache_max_ttl < 0:
        raise ConfigError("dns.cache_max_ttl", "must be a number of seconds >= 0")
    dns = DNSConfig(tuple(servers), _positive(_get(dns_raw, "timeout", float, "dns.", 5.0), "dns.timeout"),
                    float(cache_max_ttl))

    dkim_raw = dict(_table(raw, "dkim"))
    keys_raw = dkim_raw.pop("keys", [])
    dkim_cfg = _dataclass_from(dkim_raw, DKIMConfig, "dkim.", {"verify": bool, "max_message_size": int})
    if not isinstance(keys_raw, list):
        raise ConfigError("dkim.keys", "must be a list of tables with domain, selector, key_file")
    keys = []
    for i, entry in enumerate(keys_raw):
        prefix = f"dkim.keys[{i}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"dkim.keys[{i}]", "must be a table with domain, selector, key_file")
        _check_keys(entry, {"domain", "selector", "key_file"}, prefix)
        values = [_get(entry, k, str, prefix, None) for k in ("domain", "selector", "key_file")]
        for k, v in zip(("domain", "selector", "key_file"), values, strict=True):
            if not v:
                raise ConfigError(prefix + k, "is required")
        key_path = _path(base, values[2])
        assert key_path is not None
        keys.append((values[0].lower(), values[1], key_path))
    dkim_cfg = replace(dkim_cfg, keys=tuple(keys))
    dmarc_cfg = _dataclass_from(_table(raw, "dmarc"), DMARCConfig, "dmarc.",
                                {"enabled": bool, "reject": bool})

    aliases = _dataclass_from(_table(raw, "aliases"), AliasConfig, "aliases.",
                              {"drop_characters": str, "suffix_separators": str, "max_depth": int})

    dl = dict(_table(raw, "delivery"))
    sts_raw = dl.pop("mta_sts", {})  # [delivery.mta_sts]: STSDeliveryConfig
    relay_raw = dl.pop("relay", {})
    if not isinstance(relay_raw, dict):
        raise ConfigError("delivery.relay", 'must be a table of tables: [delivery.relay."host:port"]')
    relays = []
    for name, entry in relay_raw.items():
        prefix = f'delivery.relay."{name}".'
        if not isinstance(entry, dict):
            raise ConfigError(prefix[:-1], "must be a table with tls, username, password")
        _check_keys(entry, {"tls", "username", "password"}, prefix)
        relay_tls = _get(entry, "tls", str, prefix, "opportunistic")
        if relay_tls not in ("none", "opportunistic", "require", "verify"):
            raise ConfigError(prefix + "tls", "must be none, opportunistic, require or verify")
        relays.append((name, relay_tls, _get(entry, "username", str, prefix, None),
                       _get(entry, "password", str, prefix, None)))
    route_raw = dl.pop("route", {})
    stage_raw = dl.pop("timeouts", {})
    if not isinstance(stage_raw, dict):
        raise ConfigError("delivery.timeouts", "must be a table")
    stages = []
    for key, value in stage_raw.items():
        if key not in STAGES:
            raise ConfigError(f"delivery.timeouts.{key}", f"unknown stage; one of {', '.join(STAGES)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"delivery.timeouts.{key}", "must be a number of seconds > 0")
        stages.append((key, float(value)))
    types = {
        "smarthosts": list, "smarthost_username": str, "smarthost_password": str,
        "smarthost_tls": str, "tls_policy": str, "retry_schedule": list, "retry_jitter": float,
        "max_queue_lifetime": float, "delay_warning": float, "max_connections": int,
        "max_connections_per_destination": int, "connect_timeout": float, "mx_port": int,
        "connection_cache_time": float,
        "mailbox_command": str, "lmtp": str, "pipe_timeout": float,
        "bounce_from": str, "bind_address": str, "bind_address6": str, "helo_name": str,
    }
    delivery = _dataclass_from(dl, DeliveryConfig, "delivery.", types)
    delivery = replace(delivery, routes=_routes(route_raw, delivery))
    smarthosts = overrides.get("smarthosts") or delivery.smarthosts
    for i, s in enumerate(smarthosts):
        if not isinstance(s, str):
            raise ConfigError(f"delivery.smarthosts[{i}]", "must be a 'host:port' string")
        _host_port(s, f"delivery.smarthosts[{i}]", 25)
    schedule = tuple(float(_positive(x, "delivery.retry_schedule") if isinstance(x, int | float) and not isinstance(x, bool) else _bad("delivery.retry_schedule", "must be a list of seconds")) for x in delivery.retry_schedule)
    if not schedule:
        raise ConfigError("delivery.retry_schedule", "must not be empty")
    if delivery.connection_cache_time < 0:
        raise ConfigError("delivery.connection_cache_time", "must be a number of seconds >= 0")
    if delivery.smarthost_tls not in ("none", "opportunistic", "require", "verify"):
        raise ConfigError("delivery.smarthost_tls", "must be none, opportunistic, require or verify")
    if delivery.tls_policy not in ("opportunistic", "verify", "dane", "dane-only"):
        raise ConfigError("delivery.tls_policy", "must be opportunistic, verify, dane or dane-only")
    if delivery.lmtp is not None:
        if delivery.mailbox_command is not None:
            raise ConfigError("delivery.lmtp", "cannot be combined with delivery.mailbox_command: "
                              "local mail goes to one of them")
        _validate_client_endpoint(delivery.lmtp, "delivery.lmtp")
    mx_port = overrides.get("mx_port") or delivery.mx_port
    for name, *_ in relays:
        if name not in smarthosts:
            raise ConfigError(f'delivery.relay."{name}"', "is not one of delivery.smarthosts")
    delivery = replace(delivery, smarthosts=tuple(smarthosts), retry_schedule=schedule, mx_port=mx_port,
                       stage_timeouts=tuple(stages), relays=tuple(relays),
                       bounce_from=_bounce_from(delivery.bounce_from, local_domains, hostname))

    relay_networks = tuple(_get(raw, "relay_networks", list, "", []))
    import ipaddress

    for i, net in enumerate(relay_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except (ValueError, TypeError):
            raise ConfigError(f"relay_networks[{i}]", f"{net!r} is not a network") from None

    metrics = _get(raw, "metrics", str, "", None)
    if metrics is not None:
        metrics = listen_endpoint(metrics, "metrics")
        _validate_endpoint(metrics, "metrics")
    checks = _checks(_table(raw, "checks"))

    return Config(
        hostname=hostname,
        listeners=tuple(listeners),
        local_domains=tuple(local_domains),
        data_dir=data_dir,
        queue_dir=queue_dir,
        mail_dir=mail_dir,
        domains_dir=domains_dir,
        control_socket=control_socket,
        tls=tls,
        limits=limits,
        spf=spf,
        dns=dns,
        dkim=dkim_cfg,
        dmarc=dmarc_cfg,
        aliases=aliases,
        delivery=delivery,
        checks=checks,
        dane=_dane(_table(raw, "dane"), dns, delivery.tls_policy),
        milters=_milters_of_listeners(_milters(_table(raw, "milters")), listeners),
        delivery_sts=_delivery_sts(sts_raw, base),
        tls_reports=_tls_reports(_table(raw, "tls_reports"), hostname, delivery.bounce_from),
        dnsbl=_dnsbl(_table(raw, "dnsbl"), checks),
        greylist=_greylist(_table(raw, "greylist"), checks, base, data_dir),
        relay_networks=relay_networks,
        metrics_endpoint=metrics,
        log_json=_path(base, _get(raw, "log_json", str, "", None)),
        fsync=_get(raw, "fsync", bool, "", True),
        queue_sync=_choice(raw, "queue_sync", ("fsync", "syncfs"), "fsync"),
        workers=_workers(raw),
        workers_deliver=_get(raw, "workers_deliver", bool, "", False),
        sender_binding=_get(raw, "sender_binding", bool, "", True),
        sender_binding_from=_get(raw, "sender_binding_from", bool, "", False),
        helo_check=_choice(raw, "helo_check", ("strict", "normal", "off"), "normal"),
        strict_envelopes=_get(raw, "strict_envelopes", bool, "", False),
        srs_secret=_get(raw, "srs_secret", str, "", None),
        maildir=_maildir(_table(raw, "maildir")),
        mta_sts=_mta_sts(_table(raw, "mta_sts"), base, "cert_file" in _table(raw, "tls")),
        directory=_directory(_table(raw, "directory"), base, data_dir),
        status=_status(_table(raw, "status")),
        counters=_counters(_table(raw, "counters")),
    )


# --- operator tools (issue 21) --------------------------------------------------------------

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^]]+)\]|(?P<v4>[0-9.]+|\*)?):(?P<port>\d+)")


def listen_endpoint(value: str, key: str) -> str:
    """A listening address as the Twisted endpoint string it stands for.

    ``host:port`` (an IPv4 address, ``*`` or nothing for every address) and
    ``[v6]:port`` become ``tcp:`` / ``tcp6:`` strings; anything else is taken
    as a Twisted endpoint string already (``tcp:25:interface=...``, ``haproxy:...``,
    ``unix:...``) and checked by the caller.
    """
    import ipaddress

    m = _HOST_PORT.fullmatch(value.strip())
    if m is None:
        return value
    port = int(m["port"])
    if not 0 <= port < 65536:
        raise ConfigError(key, f"{value!r}: port out of range")
    if m["v6"] is not None:
        try:
            address = ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise ConfigError(key, f"{value!r}: {m['v6']!r} is not an IPv6 address") from None
        return f"tcp6:{port}:interface=" + str(address).replace(":", "\\:")
    host = m["v4"]
    if host in (None, "", "*"):
        return f"tcp:{port}"
    try:
        address4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(key, f"{value!r}: {host!r} is not an IPv4 address") from None
    return f"tcp:{port}:interface={address4}"


def _maildir(table: dict[str, Any]) -> MaildirConfig:
    """``[maildir]``: ``template`` checked: relative, no ``..``, known variables only."""
    cfg = _dataclass_from(table, MaildirConfig, "maildir.", {"template": str})
    problem = maildir_template_problem(cfg.template)
    if problem:
        raise ConfigError("maildir.template", f"{cfg.template!r}: {problem}")
    return cfg


def maildir_template_problem(template: str) -> str | None:
    """Why ``template`` cannot be a Maildir path template, or None."""
    if not template.strip():
        return "must not be empty"
    if template.startswith(("/", "~")):
        return "must be relative to mail_dir (no leading / or ~)"
    if "\x00" in template or any(ord(c) < 0x20 for c in template):
        return "must not contain control characters"
    i = 0
    while i < len(template):
        if template[i] == "%":
            if i + 1 >= len(template) or template[i + 1] not in MAILDIR_VARIABLES:
                names = ", ".join("%" + k for k in MAILDIR_VARIABLES)
                return f"unknown variable at offset {i} (known: {names})"
            i += 2
        else:
            i += 1
    for part in template.split("/"):
        if part in ("", ".", ".."):
            return "no empty, '.' or '..' path components"
        if part.startswith(".") and "%" not in part:
            return f"component {part!r} starts with a dot"
    return None


_STS_MX = re.compile(r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")


def _mta_sts(table: dict[str, Any], base: Path, server_tls: bool) -> MTASTSConfig:
    """``[mta_sts]``: the policy (mode, mx patterns, max_age) and its HTTPS endpoint."""
    prefix = "mta_sts."
    _check_keys(table, {"endpoint", "mode", "mx", "max_age", "cert_file", "key_file"}, prefix)
    endpoint = _get(table, "endpoint", str, prefix, None)
    if endpoint is not None:
        endpoint = listen_endpoint(endpoint, prefix + "endpoint")
        _validate_endpoint(endpoint, prefix + "endpoint")
    mode = _get(table, "mode", str, prefix, "testing")
    if mode not in MTA_STS_MODES:
        raise ConfigError(prefix + "mode", f"must be one of {', '.join(MTA_STS_MODES)}")
    mx = _get(table, "mx", list, prefix, [])
    for i, pattern in enumerate(mx):
        if not isinstance(pattern, str) or not _STS_MX.fullmatch(pattern):
            raise ConfigError(f"{prefix}mx[{i}]", "must be a host name or *.domain pattern "
                              "(RFC 8461 §3.2)")
    max_age = _get(table, "max_age", int, prefix, 604800)
    if not 0 <= max_age <= 31557600:
        raise ConfigError(prefix + "max_age", "must be from 0 to 31557600 seconds (RFC 8461 §3.2)")
    cert_file = _path(base, _get(table, "cert_file", str, prefix, None))
    key_file = _path(base, _get(table, "key_file", str, prefix, None))
    if (cert_file is None) != (key_file is None):
        raise ConfigError(prefix + ("key_file" if key_file is None else "cert_file"),
                          "cert_file and key_file go together")
    if endpoint is not None and cert_file is None and not server_tls:
        raise ConfigError(prefix + "endpoint", "needs a certificate: mta_sts.cert_file and "
                          "key_file, or tls.cert_file (the policy is served over HTTPS only)")
    return MTASTSConfig(endpoint, mode, tuple(p.lower() for p in mx), max_age, cert_file, key_file)


def _routes(table: Any, delivery: DeliveryConfig) -> tuple[RouteEntry, ...]:
    """``[delivery.route."KEY"]``, each entry checked, and the global source addresses
    and HELO name; one line per problem, naming the key."""
    _source_addresses("delivery.", delivery.bind_address, delivery.bind_address6, delivery.helo_name)
    if not isinstance(table, dict):
        raise ConfigError("delivery.route", 'must be a table of tables: [delivery.route."example.com"]')
    types = {"tls": str, "port": int, "smarthost": str, "username": str, "password": str,
             "bind_address": str, "bind_address6": str, "helo_name": str}
    entries = []
    seen: set[str] = set()
    for name, raw in table.items():
        prefix = f'delivery.route."{name}".'
        if not isinstance(raw, dict):
            raise ConfigError(prefix[:-1], "must be a table (tls, port, smarthost, username, "
                              "password, bind_address, bind_address6, helo_name)")
        _check_keys(raw, set(types), prefix)
        key = _route_key(name, prefix[:-1])
        if key in seen:
            raise ConfigError(prefix[:-1], f"{key} is listed twice")
        seen.add(key)
        values = {k: _get(raw, k, kind, prefix, None) for k, kind in types.items()}
        entry = RouteEntry(key, **values)
        if entry.tls is not None and entry.tls not in ROUTE_TLS:
            raise ConfigError(prefix + "tls", f"must be one of {', '.join(ROUTE_TLS)}")
        if entry.port is not None and not 0 < entry.port < 65536:
            raise ConfigError(prefix + "port", "must be a port number from 1 to 65535")
        next_hop = key.startswith("[")
        if entry.smarthost is not None:
            if next_hop:
                raise ConfigError(prefix + "smarthost", "a next-hop entry cannot name another smarthost")
            _route_smarthost(entry.smarthost, prefix + "smarthost")
        if next_hop and entry.port is not None:
            raise ConfigError(prefix + "port", "a next-hop entry's port is in its key ([host]:port)")
        if (entry.username is None) != (entry.password is None):
            raise ConfigError(prefix + ("password" if entry.password is None else "username"),
                              "username and password go together")
        if entry.username is not None:
            if not next_hop and entry.smarthost is None:
                # Never hand a password to whatever host a domain's MX records name.
                raise ConfigError(prefix + "username", "credentials need a smarthost (or a "
                                  "next-hop key); they are never sent to MX hosts")
            if entry.tls in ("none", "may"):
                raise ConfigError(prefix + "tls", "credentials need encrypt or verify (AUTH is "
                                  "never sent in clear)")
        if entry.tls in ("dane", "mta-sts") and (entry.smarthost is not None or next_hop
                                                 or delivery.smarthosts):
            raise ConfigError(prefix + "tls", f"{entry.tls} applies to MX delivery, not to a "
                              "smarthost (use verify)")
        _source_addresses(prefix, entry.bind_address, entry.bind_address6, entry.helo_name)
        entries.append(entry)
    return tuple(entries)


def _route_key(name: str, key: str) -> str:
    """A route entry's key, normalized: ``example.com``, ``.example.com`` or ``[host]:port``."""
    from mta.mail.address import AddressError, normalize_domain

    if name.startswith("["):
        host, port = _route_smarthost(name, key)
        return f"[{host}]" if port is None else f"[{host}]:{port}"
    try:
        if name.startswith("."):
            return "." + normalize_domain(name[1:])
        return normalize_domain(name)
    except AddressError as e:
        raise ConfigError(key, f"not a domain, .domain or [host]:port: {e}") from None


def _route_smarthost(text: str, key: str) -> tuple[str, int | None]:
    """``[host]:port``, ``[host]``, ``host:port`` or ``host`` (Postfix relayhost syntax):
    (host, port or None); the host a domain name or, in brackets, an IP address."""
    import ipaddress

    from mta.mail.address import AddressError, normalize_domain

    bracketed = text.startswith("[")
    if bracketed:
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"{text!r}: expected [host] or [host]:port")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(key, f"{text!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
        if not bracketed:
            raise ConfigError(key, f"{text!r}: an IP address goes in brackets ([{host}])")
        return host, port
    except ValueError:
        pass
    try:
        return normalize_domain(host), port
    except AddressError as e:
        raise ConfigError(key, f"{text!r}: {e}") from None


def _source_addresses(prefix: str, v4: str | None, v6: str | None, helo: str | None) -> None:
    import ipaddress

    from mta.mail.address import AddressError, normalize_domain

    for name, value, version in (("bind_address", v4, 4), ("bind_address6", v6, 6)):
        if value is None:
            continue
        try:
            ok = ipaddress.ip_address(value).version == version
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(prefix + name, f"{value!r} is not an IPv{version} address")
    if helo is not None:
        try:
            normalize_domain(helo)
        except AddressError as e:
            raise ConfigError(prefix + "helo_name", f"{helo!r}: {e}") from None


STATUS_MIN_SECRET = 16  # characters of a status token or password


def _status(table: dict[str, Any]) -> StatusConfig:
    """``[status]``: the status page's endpoint (a bare port listens on 127.0.0.1)
    and its credentials, required unless the endpoint is loopback-only."""
    prefix = "status."
    _check_keys(table, {"endpoint", "token", "user", "password"}, prefix)
    endpoint = _get(table, "endpoint", str, prefix, None)
    if endpoint is not None:
        if endpoint.strip().isdigit():
            endpoint = "127.0.0.1:" + endpoint.strip()  # loopback by default
        endpoint = listen_endpoint(endpoint, prefix + "endpoint")
        _validate_endpoint(endpoint, prefix + "endpoint")
    token = _get(table, "token", str, prefix, None)
    user = _get(table, "user", str, prefix, "status")
    password = _get(table, "password", str, prefix, None)
    for key, secret in (("token", token), ("password", password)):
        if secret is not None and (len(secret) < STATUS_MIN_SECRET
                                   or any(ord(c) < 0x21 or ord(c) > 0x7e for c in secret)):
            raise ConfigError(prefix + key, f"must be at least {STATUS_MIN_SECRET} printable "
                              "ASCII characters without spaces")
    if not user or ":" in user or any(ord(c) < 0x21 or ord(c) > 0x7e for c in user):
        raise ConfigError(prefix + "user", "must be printable ASCII without spaces or ':'")
    local = endpoint is None or endpoint_is_local(endpoint)
    if not local and token is None and password is None:
        raise ConfigError(prefix + "endpoint", "is not loopback: set status.token or "
                          "status.password (the page shows addresses and replies)")
    return StatusConfig(endpoint, local, token, user, password)


def endpoint_is_local(endpoint: str) -> bool:
    """Whether a server endpoint string only listens on loopback or a UNIX socket."""
    import ipaddress

    _, args, kwargs = _parseServer(endpoint, None)
    kind = endpoint.partition(":")[0].strip().lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False  # haproxy:, systemd: and others: cannot tell, so not local
    interface = kwargs.get("interface") or (args[1] if len(args) > 1 else "")
    try:
        return ipaddress.ip_address(str(interface).strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every address) or a name


def _bounce_from(value: str | None, local_domains: list[str], hostname: str) -> str:
    """``delivery.bounce_from`` checked, or its default: MAILER-DAEMON at the primary
    (first) local domain, where replies to a bounce can be read, else the host name."""
    from mta.mail.address import AddressError, parse_mailbox

    if value is None:
        return f"MAILER-DAEMON@{local_domains[0] if local_domains else hostname}"
    try:
        return str(parse_mailbox(value, smtputf8=True))
    except AddressError as e:
        raise ConfigError("delivery.bounce_from", f"{value!r} is not an address: {e}") from None


_CHECK_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _checks(table: dict[str, Any]) -> ChecksConfig:
    """``[checks]``: ``order`` (names, each once, ``recipient`` among them) and one
    table per check with ``timeout``, ``on_error`` and, for a check that is not
    built in, ``factory``."""
    order = _get(table, "order", list, "checks.", list(CHECKS))
    for i, name in enumerate(order):
        if not isinstance(name, str) or not _CHECK_NAME.fullmatch(name):
            raise ConfigError(f"checks.order[{i}]", "must be a check name (lower-case letters, digits, _)")
        if name in order[:i]:
            raise ConfigError(f"checks.order[{i}]", f"{name} is listed twice")
    if "recipient" not in order:
        raise ConfigError("checks.order", "must include recipient (it decides where each recipient goes)")
    settings = []
    for name, raw in table.items():
        if name == "order":
            continue
        prefix = f"checks.{name}."
        if not isinstance(raw, dict):
            raise ConfigError(f"checks.{name}", "must be a table with timeout, on_error or factory")
        if name not in order:
            raise ConfigError(f"checks.{name}", "is not in checks.order")
        one = _dataclass_from(raw, CheckSettings, prefix,
                              {"timeout": float, "on_error": str, "factory": str})
        _positive(one.timeout, prefix + "timeout")
        if one.on_error not in CHECK_ON_ERROR:
            raise ConfigError(prefix + "on_error", f"must be one of {', '.join(CHECK_ON_ERROR)}")
        if name == "recipient" and one.on_error != "tempfail":
            # Accepted without its lookup, a recipient would have nowhere to go: lost mail.
            raise ConfigError(prefix + "on_error", "must be tempfail for recipient")
        if one.factory is not None and not _FACTORY.fullmatch(one.factory):
            raise ConfigError(prefix + "factory", f"{one.factory!r}: must be 'package.module:name'")
        if one.factory is not None and name in CHECKS + OPTIONAL_CHECKS:
            raise ConfigError(prefix + "factory", f"{name} is a built-in check")
        settings.append((name, one))
    for i, name in enumerate(order):
        if name not in CHECKS + OPTIONAL_CHECKS and not any(key == name and s.factory
                                                             for key, s in settings):
            raise ConfigError(f"checks.order[{i}]", f"unknown check {name!r}: built in are "
                              f"{', '.join(CHECKS + OPTIONAL_CHECKS)}; others need "
                              f"checks.{name}.factory")
    return ChecksConfig(tuple(order), tuple(settings))


def _dane(table: dict[str, Any], dns: DNSConfig, tls_policy: str) -> DANEConfig:
    """``[dane]``: the AD bit is trusted only from a resolver on loopback (as Postfix)."""
    _check_keys(table, {"enabled", "resolvers", "check_name", "check_bogus",
                        "recheck_interval"}, "dane.")
    enabled = _get(table, "enabled", bool, "dane.", False)
    resolvers = []
    for i, s in enumerate(_get(table, "resolvers", list, "dane.", [])):
        if not isinstance(s, str):
            raise ConfigError(f"dane.resolvers[{i}]", "must be a string such as '127.0.0.1:53'")
        resolvers.append(_host_port(s, f"dane.resolvers[{i}]", 53))
    import ipaddress

    for i, (host, _port) in enumerate(resolvers or (dns.servers if enabled else ())):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            key = f"dane.resolvers[{i}]" if resolvers else f"dns.servers[{i}]"
            raise ConfigError(key, f"{host} is not a loopback address: the AD bit is only "
                              "trusted from a local validating resolver")
    if tls_policy in ("dane", "dane-only") and not enabled:
        raise ConfigError("delivery.tls_policy", f"{tls_policy} needs [dane] enabled = true")
    interval = _get(table, "recheck_interval", float, "dane.", 60.0)
    return DANEConfig(enabled, tuple(resolvers), _get(table, "check_name", str, "dane.", "."),
                      _get(table, "check_bogus", str, "dane.", ""),
                      float(_positive(interval, "dane.recheck_interval")))
# --- issue 17: [dnsbl] and [greylist] -------------------------------------------------

_DNS_ZONE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)+"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SITE = re.compile(r"(?P<zone>[^=*]+)(?:=(?P<filter>[^*]+))?(?:\*(?P<weight>-?\d{1,4}))?")
_FILTER = re.compile(r"(\[[^\]]*\]|[^.\[\]]+)\.(\[[^\]]*\]|[^.\[\]]+)\."
                     r"(\[[^\]]*\]|[^.\[\]]+)\.(\[[^\]]*\]|[^.\[\]]+)")
_OCTET_ITEM = re.compile(r"(\d{1,3})(?:\.\.(\d{1,3}))?")


def _octet_values(text: str, key: str, site: str) -> frozenset[int]:
    """One octet of a reply filter: ``2``, or ``[2..11]``, ``[2;4]``, ``[1;3..5]``."""
    items = text[1:-1].split(";") if text.startswith("[") and text.endswith("]") else [text]
    values: set[int] = set()
    for item in items:
        m = _OCTET_ITEM.fullmatch(item)
        low = int(m.group(1)) if m else 256
        high = int(m.group(2)) if m and m.group(2) else low
        if not m or not low <= high <= 255:
            raise ConfigError(key, f"{site!r}: {text!r} is not an octet filter (N, [N..M], [N;M])")
        values.update(range(low, high + 1))
    return frozenset(values)


def dnsbl_site(text: str, key: str) -> DNSBLSite:
    """Parse ``zone[=filter][*weight]`` (Postfix's postscreen_dnsbl_sites syntax)."""
    m = _SITE.fullmatch(text.strip())
    if m is None or not _DNS_ZONE.fullmatch(m.group("zone").rstrip(".")):
        raise ConfigError(key, f"{text!r}: must be zone[=filter][*weight], e.g. "
                          "'zen.spamhaus.org=127.0.0.[2..11]*2'")
    weight = int(m.group("weight")) if m.group("weight") else 1
    if weight == 0:
        raise ConfigError(key, f"{text!r}: a weight of 0 counts nothing")
    octets: Any = None
    if m.group("filter"):
        parts = _FILTER.fullmatch(m.group("filter"))
        if parts is None:
            raise ConfigError(key, f"{text!r}: the filter must have four octets, each N, "
                              "[N..M] or [N;M] (127.0.0.[2..11])")
        octets = tuple(_octet_values(p, key, text) for p in parts.groups())
    return DNSBLSite(m.group("zone").rstrip(".").lower(), octets, weight, text.strip())


def _dnsbl(table: dict[str, Any], checks: ChecksConfig) -> DNSBLConfig:
    """``[dnsbl]``: sites, thresholds, the stage, the exempt recipients, the cache."""
    prefix = "dnsbl."
    _check_keys(table, {"sites", "threshold", "allowlist_threshold", "stage",
                        "exempt_recipients", "cache_max_ttl", "max_cache_entries"}, prefix)
    d = DNSBLConfig()
    sites = _get(table, "sites", list, prefix, [])
    parsed = []
    for i, text in enumerate(sites):
        if not isinstance(text, str):
            raise ConfigError(f"dnsbl.sites[{i}]", "must be a string")
        parsed.append(dnsbl_site(text, f"dnsbl.sites[{i}]"))
    named = "dnsbl" in checks.order
    if named and not parsed:
        raise ConfigError("dnsbl.sites", "is empty, but checks.order names dnsbl")
    if parsed and not named:
        raise ConfigError("dnsbl.sites", "are set, but checks.order does not name dnsbl "
                          "(they would never be asked)")
    threshold = _get(table, "threshold", int, prefix, d.threshold)
    if threshold < 1:
        raise ConfigError("dnsbl.threshold", "must be 1 or more")
    allow = _get(table, "allowlist_threshold", int, prefix, d.allowlist_threshold)
    if allow > 0:
        raise ConfigError("dnsbl.allowlist_threshold", "must be 0 (off) or negative")
    stage = _get(table, "stage", str, prefix, d.stage)
    if stage not in ("connect", "rcpt"):
        raise ConfigError("dnsbl.stage", "must be connect or rcpt")
    exempt = _get(table, "exempt_recipients", list, prefix, list(d.exempt_recipients))
    for i, entry in enumerate(exempt):
        if not isinstance(entry, str) or not entry or " " in entry or entry.count("@") > 1:
            raise ConfigError(f"dnsbl.exempt_recipients[{i}]",
                              "must be a local part (postmaster) or an address")
    max_ttl = _get(table, "cache_max_ttl", float, prefix, d.cache_max_ttl)
    if max_ttl < 0:
        raise ConfigError("dnsbl.cache_max_ttl", "must be 0 (no cache) or more")
    entries = _get(table, "max_cache_entries", int, prefix, d.max_cache_entries)
    if not 1 <= entries <= 10_000_000:
        raise ConfigError("dnsbl.max_cache_entries", "must be from 1 to 10000000")
    return DNSBLConfig(tuple(parsed), threshold, allow, stage,
                       tuple(e.lower() for e in exempt), max_ttl, entries)


def _greylist(table: dict[str, Any], checks: ChecksConfig, base: Path, data_dir: Path) -> GreylistConfig:
    """``[greylist]``: the SQLite file, delay, window, expiry, auto-allow, prefixes."""
    prefix = "greylist."
    g = _dataclass_from(table, GreylistConfig, prefix, {
        "db": str, "delay": float, "window": float, "max_age": float, "auto_allow": int,
        "ipv4_prefix": int, "ipv6_prefix": int})
    if table and "greylist" not in checks.order:
        raise ConfigError("greylist", "is configured, but checks.order does not name greylist")
    if g.delay < 0:
        raise ConfigError("greylist.delay", "must be 0 or more seconds")
    if g.window <= g.delay:
        raise ConfigError("greylist.window", "must be longer than greylist.delay")
    if g.max_age < g.window:
        raise ConfigError("greylist.max_age", "must be at least greylist.window")
    if not 0 <= g.auto_allow <= 1000:
        raise ConfigError("greylist.auto_allow", "must be from 0 (off) to 1000")
    if not 8 <= g.ipv4_prefix <= 32:
        raise ConfigError("greylist.ipv4_prefix", "must be from 8 to 32")
    if not 16 <= g.ipv6_prefix <= 128:
        raise ConfigError("greylist.ipv6_prefix", "must be from 16 to 128")
    db = _path(base, g.db) if g.db is not None else data_dir / "greylist.sqlite"
    return replace(g, db=db)


def _workers(raw: dict[str, Any]) -> int:
    workers = _get(raw, "workers", int, "", 1)
    if not 1 <= workers <= 64:
        raise ConfigError("workers", "must be from 1 to 64")
    return workers


def _choice(table: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = _get(table, key, str, "", default)
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}")
    return value


def _bad(key: str, problem: str) -> Any:
    raise ConfigError(key, problem)


# --- milters (issue 17) -----------------------------------------------------------

MILTER_DEFAULT_ACTIONS = ("tempfail", "accept")
# [milters] keys that are lists of milter names: Postfix's smtpd_milters (every
# listener) and one override per listener kind (as master.cf's -o smtpd_milters=).
MILTER_LISTS = ("smtpd", *LISTENER_KINDS)
# [milters] local: Postfix's non_smtpd_milters, for local submission (sendmail);
# never smtpd's (a list of its own, as Postfix's).
MILTER_LOCAL = "local"


@dataclass(frozen=True)
class MilterSettings:
    """One ``[milters.NAME]`` table: where the milter listens and how long to wait
    (Postfix's milter_connect_timeout, milter_command_timeout,
    milter_content_timeout) and what a failed one means (milter_default_action)."""

    name: str
    socket: str  # "unix:/path", "inet:host:port" or a Twisted client endpoint string
    connect_timeout: float = 30.0  # connecting and the negotiation
    command_timeout: float = 30.0  # each of CONNECT, HELO, MAIL, RCPT, DATA
    content_timeout: float = 300.0  # each header, body chunk and the end of message
    default_action: str = "tempfail"


@dataclass(frozen=True)
class MiltersConfig:
    """``[milters]``: the milters, and which listeners use them, in order."""

    milters: tuple[MilterSettings, ...] = ()
    smtpd: tuple[str, ...] = ()
    by_kind: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def get(self, name: str) -> MilterSettings:
        for m in self.milters:
            if m.name == name:
                return m
        raise KeyError(name)

    def for_kind(self, kind: str) -> tuple[str, ...]:
        """The milters of a listener kind: its own list if given, else ``smtpd``."""
        for key, names in self.by_kind:
            if key == kind:
                return names
        return self.smtpd

    # The named listeners' own lists ([[listeners]] ``milters``), by listener name.
    by_listener: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Local submission's (``[milters] local``, Postfix's non_smtpd_milters).
    local: tuple[str, ...] = ()

    def for_listener(self, name: str, kind: str) -> tuple[str, ...]:
        """The milters of the listener ``name`` (of ``kind``): its own ``milters``
        if it has the key, else :meth:`for_kind`'s."""
        for key, names in self.by_listener:
            if key == name:
                return names
        return self.for_kind(kind)


def _milters(table: dict[str, Any]) -> MiltersConfig:
    """``[milters.NAME]`` tables (a ``socket`` each) and the lists ``smtpd``, ``mx``,
    ``submission``, ``submissions`` naming them."""
    milters = []
    lists: dict[str, tuple[str, ...]] = {}
    for name, raw in table.items():
        if name in MILTER_LISTS or name == MILTER_LOCAL:
            if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
                raise ConfigError(f"milters.{name}", "must be a list of milter names")
            lists[name] = tuple(raw)
            continue
        prefix = f"milters.{name}."
        if not isinstance(raw, dict):
            raise ConfigError(f"milters.{name}", "must be a table with socket (or be one of "
                              f"{', '.join(MILTER_LISTS)}: a list of milter names)")
        if not _CHECK_NAME.fullmatch(name):
            raise ConfigError(f"milters.{name}", "a milter name is lower-case letters, digits, _")
        _check_keys(raw, {"socket", "connect_timeout", "command_timeout", "content_timeout",
                          "default_action"}, prefix)
        socket_ = _get(raw, "socket", str, prefix, None)
        if not socket_:
            raise ConfigError(prefix + "socket", 'is required: "unix:/path", "inet:host:port" '
                              "or a Twisted client endpoint")
        _validate_milter_socket(socket_, prefix + "socket")
        one = MilterSettings(
            name=name, socket=socket_,
            connect_timeout=_positive(float(_get(raw, "connect_timeout", (int, float), prefix, 30.0)),
                                      prefix + "connect_timeout"),
            command_timeout=_positive(float(_get(raw, "command_timeout", (int, float), prefix, 30.0)),
                                      prefix + "command_timeout"),
            content_timeout=_positive(float(_get(raw, "content_timeout", (int, float), prefix, 300.0)),
                                      prefix + "content_timeout"),
            default_action=_choice(raw, "default_action", MILTER_DEFAULT_ACTIONS, "tempfail"),
        )
        milters.append(one)
    known = {m.name for m in milters}
    for key, names in lists.items():
        for i, n in enumerate(names):
            if n not in known:
                raise ConfigError(f"milters.{key}[{i}]", f"no [milters.{n}] table")
            if n in names[:i]:
                raise ConfigError(f"milters.{key}[{i}]", f"{n} is listed twice")
    local = lists.pop(MILTER_LOCAL, ())
    return MiltersConfig(tuple(milters), lists.pop("smtpd", ()), tuple(lists.items()), local=local)


def _listener_milters(spec: dict[str, Any], prefix: str) -> tuple[str, ...] | None:
    """A [listeners.NAME] table's ``milters``: a list of milter names, or None."""
    raw = spec.get("milters")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ConfigError(prefix + "milters", "must be a list of milter names")
    for i, n in enumerate(raw):
        if n in raw[:i]:
            raise ConfigError(f"{prefix}milters[{i}]", f"{n} is listed twice")
    return tuple(raw)


def _milters_of_listeners(milters: MiltersConfig, listeners: list[Listener]) -> MiltersConfig:
    """``milters`` with the listeners' own lists (each name checked against the
    [milters.NAME] tables)."""
    known = {m.name for m in milters.milters}
    own = []
    for lst in listeners:
        if lst.milters is None:
            continue
        for i, n in enumerate(lst.milters):
            if n not in known:
                raise ConfigError(f"listeners.{lst.name}.milters[{i}]", f"no [milters.{n}] table")
        own.append((lst.name, lst.milters))
    return replace(milters, by_listener=tuple(own)) if own else milters


def _validate_milter_socket(value: str, key: str) -> None:
    if value.startswith("unix:") and "=" not in value:
        if not value[5:].startswith("/"):
            raise ConfigError(key, f"{value!r}: unix: needs an absolute path")
        return
    if value.startswith(("inet:", "inet6:")):
        _, _, port = value.split(":", 1)[1].rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(key, f"{value!r}: inet:host:port needs a port")
        return
    _validate_client_endpoint(value, key)


# --- shared abuse counters (issue 20) -------------------------------------------------


@dataclass(frozen=True)
class CountersConfig:
    """``[counters]``: where the abuse counters of ``[limits]`` are kept.

    ``backend = "local"`` (the default): in this process's memory, as always.
    ``"redis"``: in one Redis server shared by every node (mta.policy.rediscounters),
    at ``url`` (``redis://[:password@]host[:port][/db]``) or ``host``/``port``/
    ``password``/``db``; keys begin with ``prefix``; each Redis call waits at most
    ``timeout`` seconds (connecting, too), and while Redis cannot be reached the
    node counts locally and tries again every ``retry_interval`` seconds.  The
    password and the URL are never logged (``repr=False``).
    """

    backend: str = "local"
    url: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = field(default=None, repr=False)
    db: int = 0
    prefix: str = "mta:"
    timeout: float = 0.5
    retry_interval: float = 5.0
    max_connections: int = 8


def _counters(table: dict[str, Any]) -> CountersConfig:
    p = "counters."
    _check_keys(table, {"backend", "url", "host", "port", "password", "db", "prefix", "timeout",
                        "retry_interval", "max_connections"}, p)
    url = _get(table, "url", str, p, None)
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(p + "url", "must begin with redis://, rediss:// or unix://")
    port = _get(table, "port", int, p, 6379)
    if not 0 < port < 65536:
        raise ConfigError(p + "port", "must be between 1 and 65535")
    db = _get(table, "db", int, p, 0)
    if db < 0:
        raise ConfigError(p + "db", "must be 0 or more")
    prefix = _get(table, "prefix", str, p, "mta:")
    if len(prefix) > 64 or any(c.isspace() for c in prefix):
        raise ConfigError(p + "prefix", "at most 64 characters, no spaces")
    max_connections = _get(table, "max_connections", int, p, 8)
    if not 1 <= max_connections <= 256:
        raise ConfigError(p + "max_connections", "must be between 1 and 256")
    return CountersConfig(
        backend=_counters_backend(table),
        url=url,
        host=_get(table, "host", str, p, "127.0.0.1"),
        port=port,
        password=_get(table, "password", str, p, None),
        db=db,
        prefix=prefix,
        timeout=_positive(float(_get(table, "timeout", (int, float), p, 0.5)), p + "timeout"),
        retry_interval=_positive(float(_get(table, "retry_interval", (int, float), p, 5.0)),
                                 p + "retry_interval"),
        max_connections=max_connections,
    )


def _counters_backend(table: dict[str, Any]) -> str:
    backend = _get(table, "backend", str, "counters.", "local")
    if backend not in ("local", "redis"):
        raise ConfigError("counters.backend", 'must be "local" or "redis"')
    return backend
