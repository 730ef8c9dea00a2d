"""SPF (RFC 7208) for the MAIL FROM identity, and the header text that reports it.

pyspf (module ``spf``) does the evaluation.  It is synchronous and does its own
DNS lookups, so :class:`SPFChecker` runs it in a worker thread
(``deferToThread``, injectable) and points its lookups at the MTA's configured
DNS servers through dnspython.  The reactor never waits: a Twisted-side
timeout turns a check that takes too long into ``temperror``.

How pyspf's DNS is redirected (the one global change, see
:func:`install_pyspf_dns_hook`): pyspf calls the module-level function
``spf.DNSLookup(name, qtype, tcpfallback, timeout)``.  We replace it, once,
with a dispatcher that uses the lookup function stored in a thread-local by
the check running on that thread, and pyspf's own lookup otherwise.  So
several checkers with different DNS settings (tests) can run at once, and
code that calls pyspf directly is unaffected.

Results and identities: RFC 7208 §2.6 results (``pass``, ``fail``,
``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``).  For a
null reverse-path the checked identity is ``postmaster@<HELO>`` (RFC 7208
§2.4), reported with identity ``helo``.

Headers: :func:`received_spf_header` builds the RFC 7208 §9.1 Received-SPF
field; :func:`authentication_results_spf` builds the ``spf=`` clause of an
RFC 8601 Authentication-Results field with the ``authres`` package::

    import authres
    clause = authentication_results_spf(result, sender="user@domain", helo="mail.domain")
    str(authres.AuthenticationResultsHeader(authserv_id="host.example", results=[clause]))
    # 'Authentication-Results: host.example; spf=pass smtp.mailfrom=user@domain'
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import authres
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mta.config import DNSConfig, SPFConfig
from mta.mail.headers import fold_header  # re-exported: callers fold Received-SPF with it
from mta.system.dns import RESOLV_CONF, nameservers

log = Logger()

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# Extra time the reactor side waits beyond pyspf's own total time limit
# (querytime) before answering temperror: the thread may have queued behind others.
THREAD_GRACE = 1.0

# pyspf's lookup signature: (name, qtype, tcpfallback, timeout) -> [((name, qtype), value)]
DNSLookup = Callable[[str, str, bool, float], list[tuple[tuple[str, str], Any]]]


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of RESULTS
    explanation: str  # printable ASCII, for logs and (for fail) the SMTP reply
    domain: str  # the domain whose policy was evaluated
    identity: str  # "mailfrom", or "helo" for a null reverse-path


# --- pyspf's DNS: the one place its global is replaced -------------------------------

_per_thread = threading.local()
_hook_lock = threading.Lock()
_pyspf_own_lookup: DNSLookup | None = None


def _dispatching_lookup(name: str, qtype: str, tcpfallback: bool = True,
                        timeout: float = 30.0) -> list[tuple[tuple[str, str], Any]]:
    """What pyspf calls as ``spf.DNSLookup`` once the hook is installed."""
    lookup: DNSLookup | None = getattr(_per_thread, "lookup", None)
    if lookup is None:
        assert _pyspf_own_lookup is not None
        return _pyspf_own_lookup(name, qtype, tcpfallback, timeout)
    return lookup(name, qtype, tcpfallback, timeout)


def install_pyspf_dns_hook() -> None:
    """Replace ``spf.DNSLookup`` with the per-thread dispatcher (idempotent).

    This is the only code in the MTA that changes pyspf's module state.
    """
    global _pyspf_own_lookup
    with _hook_lock:
        if spf.DNSLookup is not _dispatching_lookup:
            _pyspf_own_lookup = spf.DNSLookup
            spf.DNSLookup = _dispatching_lookup


def make_dns_lookup(dns_config: DNSConfig, resolv_conf: Path = RESOLV_CONF) -> DNSLookup:
    """A pyspf-compatible DNS lookup asking the configured servers with dnspython.

    It returns what pyspf's own ``DNSLookup_dnspython`` returns: a list of
    ``((name, qtype), value)`` where value is an address string (A/AAAA),
    ``(preference, exchange)`` (MX), a target name (PTR) or a tuple of bytes
    (TXT/SPF).  NXDOMAIN and "no data" give ``[]`` (a void lookup, RFC 7208
    §4.6.4); timeouts, SERVFAIL and other DNS failures raise ``spf.TempError``.
    dnspython retries over TCP by itself when a UDP answer is truncated, so
    pyspf's ``tcpfallback`` flag is not needed.  Runs in worker threads only.
    """
    servers = nameservers(dns_config, resolv_conf)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.timeout = dns_config.timeout / len(servers)  # per server try
    resolver.lifetime = dns_config.timeout
    resolver.cache = None  # pyspf keeps a per-check cache of its own

    def lookup(name: str, qtype: str, tcpfallback: bool = True,
               timeout: float = 30.0) -> list[tuple[tuple[str, str], Any]]:
        lifetime = max(0.05, min(float(timeout), dns_config.timeout))
        try:
            answer = resolver.resolve(name, qtype, lifetime=lifetime, search=False,
                                      raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel,
                dns.name.BadEscape):
            return []  # RFC 7208 §4.3: a malformed name has no SPF data
        except dns.exception.Timeout:
            raise spf.TempError(f"DNS timeout looking up {name} {qtype}") from None
        except dns.resolver.NoNameservers:
            raise spf.TempError(f"DNS server failure looking up {name} {qtype}") from None
        except dns.exception.DNSException as e:
            # Worded without the server's address: the text may reach the client.
            raise spf.TempError(f"DNS error looking up {name} {qtype}: "
                                f"{type(e).__name__}") from None
        if answer.rrset is None:
            return []
        return [((name, qtype), _rdata_value(qtype, rdata)) for rdata in answer.rrset]

    return lookup


def _rdata_value(qtype: str, rdata: Any) -> Any:
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if qtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return rdata.strings
    return rdata.to_text()


# --- the check --------------------------------------------------------------------


def _printable(text: str, limit: int = 300) -> str:
    """Explanations come from DNS (exp=): keep them printable ASCII, one line."""
    cleaned = re.sub(r"[^\x20-\x7e]+", " ", text)
    return " ".join(cleaned.split())[:limit]


def _is_checkable_domain(domain: str) -> bool:
    """RFC 7208 §4.3: a malformed or single-label domain gives ``none``."""
    labels = domain.split(".")
    if len(labels) < 2 or not all(0 < len(label) <= 63 for label in labels):
        return False
    if domain.startswith("["):
        return False
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        return True
    return False


def spf_identity(sender: str, helo: str) -> tuple[str, str, str]:
    """(identity, mailbox checked, domain) for a MAIL FROM and HELO (RFC 7208 §2.4)."""
    if not sender:
        domain = helo.lower().rstrip(".")
        return "helo", f"postmaster@{domain}", domain
    local, at, domain = sender.rpartition("@")
    if not at:
        local, domain = "postmaster", sender  # RFC 7208 §4.3: no local-part
    domain = domain.lower().rstrip(".")
    return "mailfrom", f"{local or 'postmaster'}@{domain}", domain


def run_pyspf(lookup: DNSLookup, client_ip: str, sender: str, helo: str,
              receiver: str, querytime: float) -> SPFResult:
    """Evaluate SPF synchronously with ``lookup`` as pyspf's DNS (worker thread)."""
    identity, mailbox, domain = spf_identity(sender, helo)
    _per_thread.lookup = lookup
    try:
        query = spf.query(i=client_ip, s=mailbox if identity == "mailfrom" else "", h=helo,
                          receiver=receiver, querytime=querytime)
        result, _code, explanation = query.check()
    finally:
        _per_thread.lookup = None
    if result not in RESULTS:  # pyspf's older vocabulary, just in case
        result = {"unknown": "permerror", "error": "temperror"}.get(result, "permerror")
    return SPFResult(result, _printable(explanation), domain, identity)


class SPFChecker:
    """Checks the MAIL FROM identity (or HELO for ``MAIL FROM:<>``) of a session.

    ``defer_to_thread`` runs pyspf off the reactor (``threads.deferToThread``
    by default); ``clock`` times the reactor-side guard.
    """

    def __init__(self, config: SPFConfig, dns: DNSConfig, hostname: str, *,
                 defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread,
                 clock: Any = None, resolv_conf: Path = RESOLV_CONF) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._config = config
        self._hostname = hostname
        self._defer_to_thread = defer_to_thread
        self._clock = clock
        self._lookup = make_dns_lookup(dns, resolv_conf)
        install_pyspf_dns_hook()

    def check(self, client_ip: str, sender: str, helo: str) -> Deferred[SPFResult]:
        """The SPF result for a client; never fails (errors become temperror)."""
        identity, _mailbox, domain = spf_identity(sender, helo)
        skip = self._skip_reason(client_ip, domain)
        if skip is not None:
            return defer.succeed(SPFResult("none", skip, domain, identity))
        d = self._defer_to_thread(run_pyspf, self._lookup, client_ip, sender, helo,
                                  self._hostname, self._config.timeout)

        def timed_out(_result: Any, _timeout: float) -> SPFResult:
            log.warn("SPF check for {domain} took longer than {t}s", domain=domain,
                     t=self._config.timeout)
            return SPFResult("temperror", "SPF check timed out", domain, identity)

        d.addTimeout(self._config.timeout + THREAD_GRACE, self._clock,
                     onTimeoutCancel=timed_out)

        def failed(failure: Any) -> SPFResult:
            log.failure("SPF check for {domain} crashed", failure, domain=domain)
            return SPFResult("temperror", "SPF check failed", domain, identity)

        d.addErrback(failed)
        return d

    def _skip_reason(self, client_ip: str, domain: str) -> str | None:
        if not self._config.enabled:
            return "SPF checking is disabled"
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return "no client IP address to check"
        if not _is_checkable_domain(domain):
            return f"{domain or 'empty domain'} is not a domain SPF can check"
        return None


# --- headers -----------------------------------------------------------------------

_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _value(text: str) -> str:
    """RFC 7208 §9.1: a key-value is a dot-atom or a quoted-string."""
    text = re.sub(r"[\x00-\x1f\x7f]", "", text)
    if _DOT_ATOM.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    return re.sub(r"[()\\\x00-\x1f\x7f]", "", text)


def _comment(result: SPFResult, client_ip: str, mailbox: str) -> str:
    r = result.result
    if r == "pass":
        return f"domain of {mailbox} designates {client_ip} as permitted sender"
    if r == "fail":
        return f"domain of {mailbox} does not designate {client_ip} as permitted sender"
    if r == "softfail":
        return (f"domain of transitioning {mailbox} does not designate {client_ip} "
                "as permitted sender")
    if r == "neutral":
        return f"{client_ip} is neither permitted nor denied by domain of {mailbox}"
    if r == "none":
        return f"domain of {mailbox} does not designate permitted sender hosts"
    if r == "temperror":
        return f"error in processing during lookup of {mailbox}: {result.explanation}"
    return f"permanent error in processing domain of {result.domain}: {result.explanation}"


def received_spf_header(result: SPFResult, client_ip: str, sender: str, helo: str,
                        receiver_hostname: str) -> str:
    """``Received-SPF: ...`` (RFC 7208 §9.1), one unfolded line without CRLF.

    ``envelope-from`` is left out for a null reverse-path, which has no mailbox.
    """
    _identity, mailbox, _domain = spf_identity(sender, helo)
    comment = _comment_text(f"{receiver_hostname}: {_comment(result, client_ip, mailbox)}")
    pairs = [("client-ip", client_ip)]
    if sender:
        pairs.append(("envelope-from", sender))
    pairs += [("helo", helo), ("receiver", receiver_hostname), ("identity", result.identity)]
    values = "; ".join(f"{key}={_value(value)}" for key, value in pairs)
    return f"Received-SPF: {result.result} ({comment}) {values}"


def authentication_results_spf(result: SPFResult, sender: str, helo: str,
                               comment: str | None = None) -> authres.SPFAuthenticationResult:
    """The ``spf=...`` clause for an RFC 8601 Authentication-Results header.

    The property is ``smtp.mailfrom`` (the sender) for the MAIL FROM identity
    and ``smtp.helo`` for a null reverse-path (RFC 8601 §2.7.2).  Put it in
    ``authres.AuthenticationResultsHeader(authserv_id=..., results=[...])``.
    """
    if result.identity == "mailfrom" and sender:
        return authres.SPFAuthenticationResult(result=result.result, result_comment=comment,
                                               smtp_mailfrom=sender)
    return authres.SPFAuthenticationResult(result=result.result, result_comment=comment,
                                           smtp_helo=helo)



def trace_headers(result: SPFResult, client_ip: str, sender: str, helo: str,
                  receiver_hostname: str) -> list[bytes]:
    """The header fields the SMTP server prepends: Received-SPF and Authentication-Results.

    Each is folded, UTF-8 encoded, without the final CRLF.  The
    Authentication-Results field (RFC 8601) carries only the SPF clause, with
    ``receiver_hostname`` as authserv-id.
    """
    received = received_spf_header(result, client_ip, sender, helo, receiver_hostname)
    clause = authentication_results_spf(result, sender, helo)
    results = str(authres.AuthenticationResultsHeader(authserv_id=receiver_hostname,
                                                      results=[clause]))
    return [fold_header(received).encode("utf-8"), fold_header(results).encode("utf-8")]
