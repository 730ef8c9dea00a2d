"""The message-authentication stage at the end of DATA: SPF, DKIM, DMARC, and signing.

For inbound mail (not authenticated, not from ``relay_networks``) it verifies
every DKIM signature, evaluates DMARC with the SPF result from MAIL FROM, and
returns their Authentication-Results clauses (RFC 8601), plus a rejection
when DMARC says reject and the configuration allows rejecting; the session
writes them, after the SPF clause of MAIL FROM, in one field
(:func:`results_header`).  For mail from our own users it returns the
DKIM-Signature headers to prepend.  (The check that runs it at the end of a
message is :class:`mta.policy.checks.MessageAuthCheck`.)

It works on the whole message held in memory (dkimpy needs it whole), so the
session only calls it for messages up to ``dkim.max_message_size``; larger
ones get an Authentication-Results header with SPF only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mta.config import Config
from mta.mail.replies import Reply
from mta.policy import dkim, dmarc
from mta.policy.authresults import dkim_clauses, dmarc_clause, results_field

log = Logger()


@dataclass(frozen=True)
class Verification:
    """The DKIM and DMARC outcome of one inbound message."""

    clauses: list[object]  # authres clauses: dkim=... (when verifying), dmarc=... (when enabled)
    dmarc: Any = None  # mta.policy.dmarc.DMARCResult, or None
    reject: Reply | None = None


def dmarc_reject(domain: str) -> Reply:
    # RFC 7489 §6.6.3 suggests 550 5.7.1 for p=reject.
    return Reply(550, "5.7.1", f"Message rejected by the DMARC policy of {domain}")


class MessageAuthenticator:
    def __init__(self, config: Config, dns_txt: Any = None, signer: Any = None,
                 rng: random.Random | None = None, defer_to_thread: Any = deferToThread) -> None:
        self.config = config
        self.dns_txt = dns_txt if dns_txt is not None else dkim.make_dns_txt(config.dns)
        self.signer = signer
        self.rng = rng or random.Random()
        self.defer_to_thread = defer_to_thread

    async def verify(self, message: bytes, header_lines: list[bytes], spf: Any) -> Verification:
        """Verify the DKIM signatures of ``message`` and evaluate DMARC with ``spf``
        (the SPF result of MAIL FROM, or None when SPF did not run)."""
        clauses: list[object] = []
        dkim_results = []
        if self.config.dkim.verify:
            dkim_results = await dkim.verify(message, self.dns_txt, defer_to_thread=self.defer_to_thread)
            clauses += dkim_clauses(dkim_results)
        dmarc_result = None
        if self.config.dmarc.enabled:
            dmarc_result = await dmarc.check(
                header_lines, spf.result if spf is not None else "none",
                spf.domain if spf is not None else "", dkim_results, self.dns_txt,
                sample=self.rng.random())
            clauses.append(dmarc_clause(dmarc_result))
        reject = None
        if (dmarc_result is not None and dmarc_result.disposition == "reject"
                and self.config.dmarc.reject):
            reject = dmarc_reject(dmarc_result.from_domain)
        return Verification(clauses, dmarc_result, reject)

    def signing_domain(self, header_lines: list[bytes]) -> str | None:
        if self.signer is None:
            return None
        author = dmarc.header_from_domain(header_lines)
        return self.signer.signing_domain(author) if author else None

    async def sign(self, message: bytes, domain: str) -> list[bytes]:
        try:
            return await self.defer_to_thread(self.signer.sign, message, domain)
        except dkim.DKIMSignError as e:
            log.warn("not signing for {domain}: {err}", domain=domain, err=e)
            return []


def build_authenticator(config: Config, extra_keys: Any = ()) -> MessageAuthenticator | None:
    """From the configuration; None when DKIM, DMARC and signing are all off.
    ``extra_keys``: more ``(domain, selector, key path or PEM bytes)`` (an SQL directory's)."""
    signer = None
    if config.dkim.keys or extra_keys:
        table: dict[str, list[tuple[str, Any]]] = {}
        for domain, selector, key_file in (*config.dkim.keys, *extra_keys):
            table.setdefault(domain, []).append((selector, key_file))
        signer = dkim.DKIMSigner(table)
    if not (config.spf.enabled or config.dkim.verify or config.dmarc.enabled or signer):
        return None
    return MessageAuthenticator(config, signer=signer)


def results_header(authserv_id: str, clauses: list[object], dmarc_result: Any = None,
                   log_it: bool = True) -> bytes:
    """The one Authentication-Results field of a message from the clauses of all its
    checks; logged (event ``msgauth``) when ``log_it``: for a message that was verified."""
    header = results_field(authserv_id, clauses)
    if log_it:
        # Unfolded (RFC 5322 §2.2.3) for the log: one line, as the header reads.
        log.info("message authentication: {header}",
                 header=header.replace(b"\r\n", b"").decode("utf-8", "replace"),
                 event="msgauth", dmarc=dmarc_result.result if dmarc_result else "none")
    return header
