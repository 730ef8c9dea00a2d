"""The Authentication-Results header field (RFC 8601): writing ours, removing forged ones.

:func:`authentication_results` builds ONE field, with the ``authres``
package, from the SPF result (:class:`mta.policy.spf.SPFResult`), the DKIM
results (:class:`mta.policy.dkim.DKIMResult`) and the DMARC result
(:class:`mta.policy.dmarc.DMARCResult`) of a message.  Clauses that were not
evaluated are left out; with none at all the field says ``none``.

:func:`strip_forged` removes the Authentication-Results fields that arrived
with a message and claim to come from us (RFC 8601 §5: a border MTA MUST
remove such fields, or a sender could forge our verdicts).  The authserv-id
is compared case-insensitively, with comments and folding skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import authres
import authres.dkim_b
import authres.dmarc

from mta.mail.headers import fold_header
from mta.policy.dkim import DKIMResult
from mta.policy.dmarc import DMARCResult
from mta.policy.spf import SPFResult, authentication_results_spf

FIELD_NAME = b"authentication-results"


def _comment(text: str) -> str | None:
    """Text safe inside an RFC 5322 comment (no parentheses, backslashes or controls)."""
    cleaned = " ".join(re.sub(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]+", " ", text).split())
    return cleaned[:120] or None


def _dkim_clause(result: DKIMResult) -> authres.dkim_b.DKIMAuthenticationResult:
    clause = authres.dkim_b.DKIMAuthenticationResult(
        result=result.result,
        result_comment=_comment(result.reason) if result.result != "pass" else None,
        header_d=result.domain or None,
        header_b=result.header_b or None,
    )
    # RFC 8601 §2.7.1: header.s and header.a are registered properties too.
    if result.selector:
        clause.header_s = result.selector
    if result.algorithm:
        clause.header_a = result.algorithm
    return clause


def _dmarc_clause(result: DMARCResult) -> authres.dmarc.DMARCAuthenticationResult:
    details = f"p={result.policy} dis={result.disposition}".upper()
    if result.result not in ("pass", "fail"):
        details = result.reason
    return authres.dmarc.DMARCAuthenticationResult(
        result=result.result,
        result_comment=_comment(details),
        header_from=result.from_domain or None,
    )


def dkim_clauses(results: Sequence[DKIMResult]) -> list[object]:
    """The ``dkim=...`` clauses; an empty list is reported as ``dkim=none``."""
    return [_dkim_clause(r) for r in results] or [
        _dkim_clause(DKIMResult("none", reason="message not signed"))]


def dmarc_clause(result: DMARCResult) -> object:
    """The ``dmarc=...`` clause."""
    return _dmarc_clause(result)


def results_field(authserv_id: str, clauses: Sequence[object]) -> bytes:
    """``Authentication-Results: <authserv_id>; <clause>; ...`` from authres clause
    objects (the SMTP session's checks hand them in their verdicts, in the
    order spf, dkim, dmarc).  Folded at spaces with CRLF, UTF-8, without the
    final CRLF; with no clause the field says ``none``."""
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=list(clauses))
    return fold_header(str(header)).encode("utf-8")


def authentication_results(authserv_id: str, *, spf: SPFResult | None = None,
                           sender: str = "", helo: str = "",
                           dkim: Sequence[DKIMResult] | None = None,
                           dmarc: DMARCResult | None = None) -> bytes:
    """``Authentication-Results: <authserv_id>; spf=...; dkim=...; dmarc=...``.

    ``sender`` (MAIL FROM, "" for ``<>``) and ``helo`` name SPF's identity
    (``smtp.mailfrom``, or ``smtp.helo`` for a null sender).  An empty
    ``dkim`` list is reported as ``dkim=none``.  Returns the field folded at
    spaces with CRLF, UTF-8, without the final CRLF.
    """
    clauses: list[object] = []
    if spf is not None:
        clauses.append(authentication_results_spf(spf, sender, helo))
    if dkim is not None:
        clauses += dkim_clauses(dkim)
    if dmarc is not None:
        clauses.append(_dmarc_clause(dmarc))
    return results_field(authserv_id, clauses)


# --- removing forged fields -------------------------------------------------------


def _skip_cfws(text: str, i: int) -> int:
    """Index of the first character after whitespace and (nested) comments."""
    depth = 0
    while i < len(text):
        ch = text[i]
        if depth and ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and ch not in " \t\r\n":
            return i
        i += 1
    return i


def authserv_id_of(value: str) -> str:
    """The authserv-id at the start of a field value (RFC 8601 §2.2), lower-cased."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == '"':
        m = re.match(r'"((?:[^"\\]|\\.)*)"', value[i:], re.S)
        if m:
            return re.sub(r"\\(.)", r"\1", m.group(1)).lower()
    m = re.match(r"[^\s;()]+", value[i:])
    return m.group(0).lower() if m else ""


def _field_value(lines: Sequence[bytes]) -> str:
    joined = b"".join(lines).decode("utf-8", "replace")
    return joined.partition(":")[2]


def strip_forged(headers: list[bytes], authserv_id: str) -> list[bytes]:
    """``headers`` without the Authentication-Results fields that claim ``authserv_id``.

    ``headers`` are raw header lines without CRLF, continuation lines included
    (what the DATA reader hands to ``on_headers``); every line of a removed
    field goes.  Fields for other authserv-ids are kept (RFC 8601 §5 lets a
    receiver keep them).
    """
    ours = authserv_id.lower().rstrip(".")
    out: list[bytes] = []
    group: list[bytes] = []

    def flush() -> None:
        if group and not _is_ours(group, ours):
            out.extend(group)
        group.clear()

    for line in headers:
        if line[:1] in (b" ", b"\t") and group:
            group.append(line)
            continue
        flush()
        group.append(line)
    flush()
    return out


def _is_ours(group: Sequence[bytes], ours: str) -> bool:
    name = group[0].split(b":", 1)[0].strip().lower()
    if name != FIELD_NAME or b":" not in group[0]:
        return False
    return authserv_id_of(_field_value(group)).rstrip(".") == ours
