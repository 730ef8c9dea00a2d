"""The outcome of an outbound session's TLS policy: one log event per new
connection, which :mod:`mta.daemon.metrics` counts.

:func:`log_tls_outcome` is the one way to report it; the route table's
policies (:mod:`mta.delivery.routes`) and DANE / MTA-STS use the same event,
with their own ``source``.  The event (``event="tls_outcome"``, namespace
``mta.delivery.tlsoutcome``) has:

``domain``   the recipient domain ("" for the global smarthosts' group);
``server``   the server as logged elsewhere (``mx1.example.com[192.0.2.1]``);
``policy``   the TLS level that applied: ``none``, ``may``, ``encrypt``,
             ``verify``, ``dane``, ``mta-sts`` (:data:`mta.config.ROUTE_TLS`);
``source``   where it came from: ``table``, ``relay``, ``default``, ``dane``,
             ``mta-sts`` (:data:`mta.delivery.routes.SOURCES`);
``origin``   the configuration key or the record that set it;
``result``   ``verified`` (TLS, certificate checked), ``encrypted`` (TLS, not
             checked), ``cleartext`` (no TLS, and the policy allowed it), or
             the failure: one of :data:`FAILURES`, RFC 8460 §4.3's result types
             for a session the policy did not let through;
``tls``      protocol and cipher (``TLSv1.3 TLS_AES_256_GCM_SHA384``) or "";
``error``    the session's error text when it failed ("" otherwise).

Counted as ``mta_outbound_tls_policy_total{policy,source,result}``.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()

RESULTS = ("verified", "encrypted", "cleartext")
# RFC 8460 §4.3.2.1 (negotiation) and §4.3.2.3 (general) result types; DANE and
# MTA-STS add theirs (§4.3.2.2: tlsa-invalid, dnssec-invalid, dane-required,
# sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid).
FAILURES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
            "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
            "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")


def handshake_failure(error: str, verify: bool) -> str:
    """RFC 8460's name for a failed TLS handshake, from the error the client saw.

    Only a verifying policy checks the certificate; any other handshake failure
    (and one whose reason is not recognised) is ``validation-failure``.
    """
    text = error.lower()
    if verify:
        if "expired" in text:
            return "certificate-expired"
        if "verificationerror" in text or "hostname" in text or "not valid for" in text:
            return "certificate-host-mismatch"
        if "certificate verify failed" in text or "unable to get" in text \
                or "self-signed" in text or "self signed" in text:
            return "certificate-not-trusted"
    return "validation-failure"


def result_of(tls: str, verified: bool, failure: str) -> str:
    if failure:
        return failure
    if not tls:
        return "cleartext"
    return "verified" if verified else "encrypted"


def log_tls_outcome(*, domain: str, server: str, policy: str, source: str, origin: str, tls: str,
                    verified: bool, failure: str = "", error: str = "") -> None:
    """Log one new outbound session's TLS outcome (the ``tls_outcome`` event)."""
    result = result_of(tls, verified, failure)
    log.info("TLS to {server} for {domain}: {result} (policy {policy} from {origin}){why}",
             event="tls_outcome", domain=domain or "-", server=server, policy=policy,
             source=source, origin=origin, result=result, tls=tls, error=error,
             why=f": {error}" if failure and error else "")
