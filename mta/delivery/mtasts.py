"""MTA-STS (RFC 8461): the policy a domain publishes for the mail sent to it.

:meth:`MTASTS.policy` answers "the STS policy for domain D" (a Deferred of an
:class:`STSPolicy` or ``None``) for the remote courier
(:mod:`mta.delivery.remote`), which then applies it to the domain's MX hosts:

* ``enforce``: an MX host whose name matches none of the policy's ``mx``
  patterns is not used (§4.1), and the session must use TLS with a
  certificate that verifies for the MX host name (§4.2: the ``verify`` TLS
  policy of :mod:`mta.delivery.tlspolicy`, RFC 6125 with service_identity);
  a recipient no such host takes is deferred (4xx) and retried, never sent in
  clear text;
* ``testing``: every MX host is used as without a policy, but a failure of
  either check is counted for the TLS report (§5, RFC 8460);
* ``none``: the domain withdrew its policy; the cached one is removed (§8.3).

Precedence, decided by the courier: a per-destination entry of the routing
table (``[delivery]`` route table, when configured) overrides both DANE and
MTA-STS for its domain; DANE (RFC 7672, :mod:`mta.delivery.dane` when
present) wins over MTA-STS for a domain that has usable TLSA records (RFC
8461 §2); MTA-STS applies to the rest.

How a policy is found (§3, §5.1):

1. the TXT record ``_mta-sts.D`` (``v=STSv1; id=...``, §3.1), asked through
   the configured resolver and remembered for its TTL (at most 5 minutes);
2. a cached, unexpired policy with the same ``id`` is used as it is;
3. otherwise the policy is fetched from ``https://mta-sts.D/.well-known/mta-sts.txt``
   (§3.3: the certificate verified for that name against the system trust
   store or the configured CA file, no redirects, only a 200, media type
   ``text/plain``, at most ``max_policy_size`` octets, the whole fetch within
   ``fetch_timeout`` seconds), parsed (§3.2) and cached on disk;
4. a failed fetch (counted for the TLS report: ``sts-policy-fetch-error``,
   ``sts-policy-invalid`` or ``sts-webpki-invalid``) leaves the cached
   policy in force until it expires (§5.1, "senders SHOULD continue to use
   the cached policy"); without one the domain is treated as having none;
5. no TXT record (or a DNS failure) with a cached unexpired policy: the
   cached policy applies (§3.1: only ``mode: none`` withdraws one).

One fetch per domain is in flight at a time: concurrent deliveries to the
domain wait for the same one, and deliveries to other domains never wait
for it.  After a failed fetch the same id is not fetched again for
:data:`FAILED_FETCH_MEMO` seconds (the cached policy, or none, applies
meanwhile), so a broken policy host does not delay every message.  A timer (``refresh_interval``, on the clock passed in) fetches again
every cached policy past half its ``max_age`` (§3.3: "proactively refresh"),
so a policy in use does not lapse between messages.

The cache is one JSON file per domain under ``data_dir/mta-sts/``: the
policy's text, id, mode, patterns, ``max_age`` and when it was fetched;
read at start, so it survives restarts.  With ``workers`` > 1 every process
has an MTASTS over the same files: each write goes to a temporary file of its
own (fsync, rename); a process whose copy is missing, stale or of another id
reads the file again before fetching (another process may have fetched it);
only the main process runs the refresh timer (mta.delivery.wiring).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.names import dns
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

log = Logger()

MODES = ("enforce", "testing", "none")
MAX_MAX_AGE = 31557600  # RFC 8461 §3.2: max_age at most 31557600 s (about a year)
MAX_POLICY_SIZE = 64 * 1024  # §3.3: "a maximum size of 64 KiB" is suggested
MAX_TXT_MEMO = 300.0  # the _mta-sts TXT answer is remembered at most this long
FAILED_FETCH_MEMO = 300.0  # after a failed fetch, the same id is not fetched again this long
MAX_REFRESH_PER_TICK = 100  # proactive refreshes started by one tick of the timer
MAX_CACHED = 100_000  # policies held (and read at start)
WELL_KNOWN = "/.well-known/mta-sts.txt"

# RFC 8460 §4.3.3 result types for the policy itself.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


# --- the policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class STSPolicy:
    """One domain's MTA-STS policy as fetched (RFC 8461 §3.2)."""

    domain: str
    id: str  # the TXT record's id when it was fetched (§3.1)
    mode: str  # enforce, testing or none
    mx: tuple[str, ...]  # patterns: "mx.example.net" or "*.example.net" (§4.1)
    max_age: int  # seconds the policy may be cached (§3.2)
    fetched_at: float  # POSIX time of the fetch
    text: str  # the policy as served (for the TLS report's policy-string)

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def matches(self, host: str) -> bool:
        """Whether the MX host name ``host`` matches one of the patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> list[str]:
        """The policy's lines, as RFC 8460 §4.4's ``policy-string``."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]


class PolicyError(Exception):
    """A policy that could not be had or used; ``result_type`` is its RFC 8460
    §4.3.3 name for the TLS report."""

    def __init__(self, text: str, result_type: str = FETCH_ERROR) -> None:
        super().__init__(text)
        self.result_type = result_type


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: a literal name matches itself; ``*.example.net`` matches one
    more label on the left (``mx.example.net``, not ``a.b.example.net`` nor
    ``example.net``).  Case-insensitive, trailing dots ignored."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # §3.2: sts-key = 1*32(ALPHA / DIGIT / "_" / "-" / ".")
_MX_PATTERN = re.compile(r"(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}\.?")


def parse_txt(records: Iterable[str]) -> str:
    """The policy id of the ``_mta-sts`` TXT records (RFC 8461 §3.1).

    Only records that begin with ``v=STSv1`` count; exactly one must remain
    (else :class:`PolicyError`, as if there were none), its fields
    ``key=value`` separated by ``;``, an ``id`` of 1 to 32 letters and digits.
    """
    mine = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if len(mine) != 1:
        raise PolicyError(f"{len(mine)} TXT records begin with v=STSv1 (one is required)",
                          POLICY_INVALID)
    fields: dict[str, str] = {}
    for part in mine[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise PolicyError(f"TXT field {part[:40]!r} is not key=value", POLICY_INVALID)
        fields.setdefault(key, value)
    policy_id = fields.get("id", "")
    if not _TXT_ID.fullmatch(policy_id):
        raise PolicyError(f"TXT id {policy_id[:40]!r} is not 1-32 letters and digits",
                          POLICY_INVALID)
    return policy_id


def parse_policy(text: str, domain: str, policy_id: str, fetched_at: float) -> STSPolicy:
    """Parse a policy body (RFC 8461 §3.2); raises :class:`PolicyError`
    (``sts-policy-invalid``) for anything that is not a usable policy.

    Lines end in LF or CRLF; ``key: value``; unknown keys are ignored; ``version``
    must be ``STSv1``, ``mode`` one of enforce/testing/none, ``max_age`` an
    integer 0..31557600, and ``mx`` (one line per pattern, at least one unless
    the mode is ``none``) a host name or a ``*.`` wildcard of one.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not colon or not _KEY.fullmatch(key):
            raise PolicyError(f"line {number} is not 'key: value'", POLICY_INVALID)
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyError(f"mx pattern {value[:60]!r} is not a host name", POLICY_INVALID)
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1", POLICY_INVALID)
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode {mode[:20]!r} is not enforce, testing or none", POLICY_INVALID)
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_MAX_AGE:
        raise PolicyError(f"max_age {age[:20]!r} is not a number of seconds up to {MAX_MAX_AGE}",
                          POLICY_INVALID)
    if not mx and mode != "none":
        raise PolicyError("no mx pattern", POLICY_INVALID)
    return STSPolicy(domain, policy_id, mode, tuple(mx), int(age), fetched_at, text)


# --- the on-disk cache -----------------------------------------------------------------


_DOMAIN_FILE = re.compile(r"[a-z0-9.-]{1,253}")


class PolicyCache:
    """Policies kept on disk, one readable JSON file per domain in ``directory``
    (written to a temporary name and renamed, so a crash leaves the old one)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, domain: str) -> Path | None:
        if not _DOMAIN_FILE.fullmatch(domain) or domain.startswith("."):
            return None  # not a name we would write a file for
        return self.directory / f"{domain}.json"

    def load(self, domain: str) -> STSPolicy | None:
        """``domain``'s cached policy as on disk now (another process, a worker,
        may have written it since we read it), or None (missing or damaged)."""
        path = self._path(domain)
        if path is None:
            return None
        try:
            return self._read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("ignoring damaged MTA-STS cache file {path}: {error}", path=str(path),
                     error=e)
            return None

    @staticmethod
    def _read(path: Path) -> STSPolicy:
        raw = json.loads(path.read_text("utf-8"))
        return STSPolicy(domain=str(raw["domain"]), id=str(raw["id"]), mode=str(raw["mode"]),
                         mx=tuple(str(m) for m in raw["mx"]), max_age=int(raw["max_age"]),
                         fetched_at=float(raw["fetched_at"]), text=str(raw["text"]))

    def load_all(self, limit: int = MAX_CACHED) -> dict[str, STSPolicy]:
        """Every readable cached policy; a damaged file is logged and skipped."""
        found: dict[str, STSPolicy] = {}
        try:
            names = sorted(os.listdir(self.directory))[:limit]
        except FileNotFoundError:
            return found
        for name in names:
            if not name.endswith(".json"):
                continue
            path = self.directory / name
            try:
                policy = self._read(path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn("ignoring damaged MTA-STS cache file {path}: {error}", path=str(path),
                         error=e)
                continue
            found[policy.domain] = policy
        return found

    def save(self, policy: STSPolicy) -> None:
        path = self._path(policy.domain)
        if path is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # A temporary name of this write's own (every process of ``workers`` > 1
        # writes here): another writer's half-written file is never taken.
        tmp = self.directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        data = dict(asdict(policy), mx=list(policy.mx))
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    def remove(self, domain: str) -> None:
        path = self._path(domain)
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


# --- fetching over HTTPS ---------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    """TLS to ``host``:``port``, the host's address asked through our own resolver
    (the one delivery uses), the certificate verified for ``host``."""

    def __init__(self, reactor: Any, resolver: Any, host: str, port: int, trust_root: Any,
                 timeout: float) -> None:
        self.reactor, self.resolver, self.host, self.port = reactor, resolver, host, port
        self.trust_root, self.timeout = trust_root, timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        addresses: list[tuple[type, str]] = []
        for lookup, kind, endpoint in ((self.resolver.lookupAddress, dns.A, TCP4ClientEndpoint),
                                       (self.resolver.lookupIPV6Address, dns.AAAA,
                                        TCP6ClientEndpoint)):
            try:
                answers, _auth, _add = await lookup(self.host)
            except Exception:
                continue
            addresses += [(endpoint, rr.payload.dottedQuad() if kind == dns.A
                           else _ipv6(rr.payload.address)) for rr in answers if rr.type == kind]
        if not addresses:
            raise PolicyError(f"no address for {self.host}")
        endpoint_class, address = addresses[0]
        tcp = endpoint_class(self.reactor, address, self.port, timeout=self.timeout)
        creator = optionsForClientTLS(self.host, trustRoot=self.trust_root)
        return await wrapClientTLS(creator, tcp).connect(factory)


def _ipv6(packed: bytes) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, packed)


class _EndpointFactory:
    def __init__(self, reactor: Any, resolver: Any, port: int, trust_root: Any,
                 timeout: float) -> None:
        self.reactor, self.resolver, self.port = reactor, resolver, port
        self.trust_root, self.timeout = trust_root, timeout

    def endpointForURI(self, uri: Any) -> _ResolvedTLSEndpoint:  # noqa: N802
        return _ResolvedTLSEndpoint(self.reactor, self.resolver, uri.host.decode("ascii"),
                                    self.port, self.trust_root, self.timeout)


class _LimitedBody(TwistedProtocol):
    """Collects a response body up to ``limit`` octets; more aborts the transfer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(PolicyError(f"policy larger than {self.limit} octets"))
            self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(PolicyError(f"policy transfer failed: {reason.getErrorMessage()}"))

    def abort(self) -> None:
        """Time is up: stop a transfer under way (one not begun has no reader)."""
        if self.transport is not None and not self.done.called:
            self.done.errback(PolicyError("policy transfer timed out"))
            self.transport.stopProducing()


class PolicyFetcher:
    """GET ``https://mta-sts.D/.well-known/mta-sts.txt`` with treq (RFC 8461 §3.3).

    ``port``: 443, or a test's HTTPS port; ``trust_root``: None for the
    platform's trust store, else a Twisted trust root (a configured CA file).
    The whole fetch (DNS, connect, TLS, headers and body) is bounded by
    ``timeout`` seconds on ``clock``; the body by ``max_size`` octets.
    """

    def __init__(self, reactor: Any, resolver: Any, *, clock: Any = None, port: int = 443,
                 trust_root: Any = None, timeout: float = 10.0,
                 max_size: int = MAX_POLICY_SIZE) -> None:
        import treq.client

        self.clock = clock or reactor
        self.timeout = timeout
        self.max_size = max_size
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(reactor, resolver, port, trust_root, timeout), pool=pool)
        self._http = treq.client.HTTPClient(agent)

    def fetch(self, domain: str) -> Deferred[str]:
        """The policy text; fails with :class:`PolicyError` (its ``result_type``
        ``sts-webpki-invalid`` for a certificate that does not verify)."""
        return Deferred.fromCoroutine(self._fetch(domain))

    async def _fetch(self, domain: str) -> str:
        url = f"https://mta-sts.{domain}{WELL_KNOWN}"
        body = _LimitedBody(self.max_size)
        request = self._http.get(url, allow_redirects=False, headers={"Accept": ["text/plain"]})
        expired = []

        def expire() -> None:
            expired.append(True)
            request.cancel()
            body.abort()

        timer = self.clock.callLater(self.timeout, expire)
        try:
            try:
                response = await request
            except PolicyError:
                raise
            except Exception as e:
                if expired or isinstance(e, CancelledError):  # also inside twisted.web's wrapper
                    raise PolicyError(f"no answer from mta-sts.{domain} within "
                                      f"{self.timeout:g}s") from None
                raise _fetch_error(domain, e) from None
            if response.code != 200:
                # §3.3: "only a 200 OK"; a redirect (3xx) is not followed.
                _discard(response)
                raise PolicyError(f"mta-sts.{domain} answered HTTP {response.code}")
            ctype = (response.headers.getRawHeaders("content-type") or [""])[0]
            if ctype.split(";")[0].strip().lower() != "text/plain":
                _discard(response)
                raise PolicyError(f"mta-sts.{domain} served {ctype[:40]!r}, not text/plain",
                                  POLICY_INVALID)
            if response.length is not UNKNOWN_LENGTH and response.length > self.max_size:
                _discard(response)
                raise PolicyError(f"policy of {domain} is {response.length} octets "
                                  f"(at most {self.max_size})")
            response.deliverBody(body)
            data = await body.done
        finally:
            if timer.active():
                timer.cancel()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"policy of {domain} is not UTF-8", POLICY_INVALID) from None


def _discard(response: Any) -> None:
    """Read no further: the body of an answer we refuse is dropped with its connection."""
    body = _LimitedBody(0)
    body.done.addErrback(lambda _: None)
    response.deliverBody(body)


def load_trust_root(path: Path) -> Any:
    """The CA certificates of a PEM file as a Twisted trust root."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    text = path.read_text("ascii")
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    return trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])


def _fetch_error(domain: str, error: BaseException) -> PolicyError:
    """A connection-level failure, as RFC 8460 §4.3.3 names it."""
    text = _describe(error)
    webpki = any(word in text for word in ("certificate", "VerificationError", "verify failed",
                                           "Mismatch"))
    return PolicyError(f"fetching the policy of {domain} failed: {text}",
                       WEBPKI_INVALID if webpki else FETCH_ERROR)


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)  # twisted.web's ResponseNeverReceived & co
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return f"{type(error).__name__}: {error}"[:300]


# --- the policy source -------------------------------------------------------------------


class Recorder(Protocol):
    """Where failures to get a policy are counted (mta.delivery.tlsrpt.TLSReporter)."""

    def record(self, domain: str, policy_type: str, result: str, mx: str = "",
               details: dict[str, str] | None = None, *, policy_string: Sequence[str] = (),
               mx_patterns: Sequence[str] = ()) -> None: ...


class MTASTS:
    """The STS policy of each destination domain, fetched, cached and refreshed.

    ``txt_resolver`` asks the ``_mta-sts`` TXT record (``lookupText``);
    ``fetcher`` is a :class:`PolicyFetcher` (``fetch(domain)``); ``cache`` a
    :class:`PolicyCache`; ``clock`` gives the time and runs the refresh timer
    (every ``refresh_interval`` seconds, from :meth:`start` to :meth:`stop`);
    ``trust_root``: the configured CA file's certificates (``mta_sts.ca_file``),
    which the policy host's and, under a policy, the MX hosts' certificates
    must chain to; None leaves the system trust store (and the courier's).
    """

    def __init__(self, txt_resolver: Any, fetcher: Any, cache: PolicyCache, clock: Any, *,
                 recorder: Recorder | None = None, refresh_interval: float = 3600.0,
                 now: Callable[[], float] | None = None, trust_root: Any = None) -> None:
        self.txt_resolver = txt_resolver
        self.fetcher = fetcher
        self.cache = cache
        self.clock = clock
        self.recorder = recorder
        self.refresh_interval = refresh_interval
        # What MX certificates under a policy must chain to (None: the courier's).
        self.trust_root = trust_root
        self._now = now or (lambda: clock.seconds())
        self.policies: dict[str, STSPolicy] = cache.load_all()
        self._txt: dict[str, tuple[float, str | None]] = {}  # domain -> (until, id or None)
        self._fetching: dict[str, list[Deferred[STSPolicy | None]]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # domain -> (until, policy id)
        self._timer: Any = None
        self.fetches = 0  # HTTPS fetches started (for tests and metrics)

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._timer is None and self.refresh_interval > 0:
            self._timer = self.clock.callLater(self.refresh_interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        self.refresh_due()
        self.start()

    def refresh_due(self) -> list[str]:
        """Start a fetch of every cached policy past half its max_age (at most
        MAX_REFRESH_PER_TICK); expired ones are dropped.  Returns the domains."""
        now = self._now()
        due = []
        for domain, policy in list(self.policies.items()):
            if not policy.fresh(now) or now >= policy.fetched_at + policy.max_age / 2:
                policy = self._from_disk(domain, policy, now) or policy
            if not policy.fresh(now):
                self._forget(domain, "expired")
            elif now >= policy.fetched_at + policy.max_age / 2 and domain not in self._fetching:
                due.append(domain)
        due = due[:MAX_REFRESH_PER_TICK]
        for domain in due:
            self._txt.pop(domain, None)
            self._refetch(domain, self.policies[domain].id, background=True)
        return due

    # --- the question ---------------------------------------------------------------

    def cached(self, domain: str) -> STSPolicy | None:
        """The cached, unexpired policy of ``domain`` without any lookup (for
        ``mta route explain``: its ``fetched_at`` gives the policy's age)."""
        policy = self.policies.get(domain.lower().rstrip("."))
        return policy if policy is not None and policy.fresh(self._now()) else None

    def policy(self, domain: str) -> Deferred[STSPolicy | None]:
        """The policy in force for ``domain`` (mode enforce or testing), or None.
        Never fails."""
        return Deferred.fromCoroutine(self._policy(domain.lower().rstrip(".")))

    async def _policy(self, domain: str) -> STSPolicy | None:
        if domain.startswith("[") or "." not in domain:
            return None  # an address literal or a bare name publishes no policy
        now = self._now()
        cached = self.policies.get(domain)
        if cached is not None and not cached.fresh(now):
            # Another process (the main one's refresh) may have a newer copy on disk.
            cached = self._from_disk(domain, cached, now)
            if cached is None:
                self._forget(domain, "expired")
        policy_id = await self._txt_id(domain, now)
        if policy_id is None:
            return cached  # §3.1: no TXT record does not withdraw a cached policy
        if cached is not None and cached.id == policy_id:
            return cached
        # Not known here, or a new id: another process may have fetched it already.
        known = self._from_disk(domain, cached, now)
        if known is not None and known.id == policy_id:
            return known
        failed = self._failed.get(domain)
        if failed is not None and failed[0] > now and failed[1] == policy_id:
            return cached  # fetched in vain a moment ago: no new wait for every message
        return await self._refetch(domain, policy_id)

    async def _txt_id(self, domain: str, now: float) -> str | None:
        memo = self._txt.get(domain)
        if memo is not None and memo[0] > now:
            return memo[1]
        ttl = 60.0
        try:
            answers, _auth, _add = await self.txt_resolver.lookupText(f"_mta-sts.{domain}")
            records = [b"".join(rr.payload.data).decode("utf-8", "replace")
                       for rr in answers if rr.type == dns.TXT]
            ttl = min((rr.ttl for rr in answers if rr.type == dns.TXT), default=60)
            policy_id: str | None = parse_txt(records) if records else None
        except PolicyError as e:
            if domain in self.policies:
                log.info("MTA-STS TXT record of {domain} unusable ({error}); the cached "
                         "policy stays", domain=domain, error=e, event="mta_sts",
                         result="txt_invalid")
            policy_id = None
        except Exception:
            # NXDOMAIN (no MTA-STS) and DNS failures alike: no (new) policy now.
            policy_id = None
        if len(self._txt) >= MAX_CACHED:
            self._txt.clear()
        self._txt[domain] = (now + min(float(ttl), MAX_TXT_MEMO), policy_id)
        return policy_id

    def _refetch(self, domain: str, policy_id: str,
                 background: bool = False) -> Deferred[STSPolicy | None]:
        """Fetch ``domain``'s policy, or wait for the fetch in flight."""
        d: Deferred[STSPolicy | None] = Deferred()
        waiting = self._fetching.get(domain)
        if waiting is not None:
            waiting.append(d)
            return d
        self._fetching[domain] = [d]

        def done(result: STSPolicy | None) -> None:
            for waiter in self._fetching.pop(domain, []):
                waiter.callback(result)

        Deferred.fromCoroutine(self._fetch(domain, policy_id, background)).addCallback(done)
        return d

    async def _fetch(self, domain: str, policy_id: str, background: bool) -> STSPolicy | None:
        self.fetches += 1
        cached = self.policies.get(domain)
        started = time.monotonic()
        try:
            text = await self.fetcher.fetch(domain)
            policy = parse_policy(text, domain, policy_id, self._now())
        except PolicyError as e:
            self._note_failure(domain, policy_id)
            log.warn("MTA-STS policy of {domain} not fetched: {error}{keeping}", domain=domain,
                     error=e, keeping="; the cached policy stays" if cached else "",
                     event="mta_sts", result=e.result_type)
            if self.recorder is not None and not background:
                self.recorder.record(domain, "sts", e.result_type, "", {"failure-reason-code":
                                                                        str(e)[:200]})
            return cached if cached is not None and cached.fresh(self._now()) else None
        except Exception as e:  # a bug or an unexpected error: as a fetch error
            self._note_failure(domain, policy_id)
            log.failure("MTA-STS fetch of {domain} failed unexpectedly", domain=domain)
            if self.recorder is not None and not background:
                self.recorder.record(domain, "sts", FETCH_ERROR, "", {"failure-reason-code":
                                                                      type(e).__name__})
            return cached if cached is not None and cached.fresh(self._now()) else None
        self._failed.pop(domain, None)
        if policy.mode == "none":
            self._forget(domain, "mode none")
            return None
        self.policies[domain] = policy
        try:
            self.cache.save(policy)
        except OSError as e:
            log.error("cannot write the MTA-STS cache for {domain}: {error}", domain=domain,
                      error=e)
        log.info("MTA-STS policy of {domain}: mode {mode}, mx {mx}, max_age {max_age} "
                 "(id {id}, {ms:.0f} ms)", domain=domain, mode=policy.mode,
                 mx=" ".join(policy.mx), max_age=policy.max_age, id=policy.id,
                 ms=(time.monotonic() - started) * 1000, event="mta_sts", result="fetched")
        return policy

    def _from_disk(self, domain: str, cached: STSPolicy | None, now: float) -> STSPolicy | None:
        """The cache file's policy for ``domain`` when it is fresh and newer than
        ``cached`` (written by another process of ``workers`` > 1: each has its
        own copy in memory), kept from now on; else ``cached`` while fresh."""
        on_disk = self.cache.load(domain)
        if on_disk is not None and on_disk.fresh(now) and (
                cached is None or on_disk.fetched_at > cached.fetched_at):
            self.policies[domain] = on_disk
            return on_disk
        return cached if cached is not None and cached.fresh(now) else None

    def _note_failure(self, domain: str, policy_id: str) -> None:
        if len(self._failed) >= MAX_CACHED:
            self._failed.clear()
        self._failed[domain] = (self._now() + FAILED_FETCH_MEMO, policy_id)

    def _forget(self, domain: str, why: str) -> None:
        if self.policies.pop(domain, None) is not None:
            log.info("MTA-STS policy of {domain} removed ({why})", domain=domain, why=why,
                     event="mta_sts", result="removed")
        try:
            self.cache.remove(domain)
        except OSError:
            pass

