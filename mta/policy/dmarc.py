"""DMARC (RFC 7489): the author domain's policy and whether a message meets it.

The core is pure: :func:`header_from_domain` finds the author domain in the
header section, :func:`parse_record` reads a policy record, :func:`evaluate`
combines the SPF and DKIM results with the policy.  Only :func:`lookup` (and
:func:`check`, which strings everything together) does DNS, through an
asynchronous ``dns_txt(name) -> Deferred[list[bytes]]`` such as
:func:`mta.policy.dkim.make_dns_txt` returns.

Organizational domains (RFC 7489 §3.2) come from the Public Suffix List of
the ``publicsuffixlist`` package (which ships a copy of the list).  Without
that package a documented approximation is used: the last two labels, or
three when the last two are a well-known two-level public suffix
(:data:`TWO_LEVEL_SUFFIXES`, e.g. ``co.uk``).

Results (RFC 7489 §11.2 and RFC 8601): ``pass``, ``fail``, ``none`` (no
policy published), ``temperror`` (DNS failed), ``permerror`` (no usable
author domain: no From field, several, or several addresses in it — RFC
7489 §6.6.1 leaves such messages to local policy; the disposition stays
``none`` and the caller may reject).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mta.mail.address import AddressError, normalize_domain
from mta.policy.dkim import DKIMResult, DNSTempError

log = Logger()

RESULTS = ("pass", "fail", "none", "temperror", "permerror")
POLICIES = ("none", "quarantine", "reject")

# Used only when the publicsuffixlist package is missing (see the module docstring).
TWO_LEVEL_SUFFIXES = frozenset({
    "ac.uk", "co.uk", "gov.uk", "ltd.uk", "me.uk", "net.uk", "org.uk", "plc.uk", "sch.uk",
    "com.au", "net.au", "org.au", "edu.au", "gov.au", "co.nz", "net.nz", "org.nz",
    "co.jp", "ne.jp", "or.jp", "ac.jp", "go.jp", "co.kr", "or.kr", "com.br", "net.br",
    "org.br", "com.cn", "net.cn", "org.cn", "com.mx", "com.tr", "co.za", "co.in", "co.il",
    "com.sg", "com.hk", "com.tw", "com.ar", "co.id",
})


# --- organizational domain ------------------------------------------------------


@cache
def _psl() -> Any:
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:
        log.warn("publicsuffixlist is not installed; organizational domains are approximated")
        return None
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if shorter)."""
    domain = domain.lower().rstrip(".")
    psl = _psl()
    if psl is not None:
        return psl.privatesuffix(domain) or domain
    return approximate_organizational_domain(domain)


def approximate_organizational_domain(domain: str) -> str:
    """Without the Public Suffix List: two labels, three under a known two-level suffix."""
    labels = domain.lower().rstrip(".").split(".")
    keep = 3 if ".".join(labels[-2:]) in TWO_LEVEL_SUFFIXES else 2
    return ".".join(labels[-keep:])


def aligned(domain: str, author_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): ``s`` exact, ``r`` same organizational domain."""
    a = domain.lower().rstrip(".")
    b = author_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


# --- the policy record --------------------------------------------------------------


class DMARCRecordError(ValueError):
    """The TXT record is not a usable DMARC record (RFC 7489 §6.6.3: ignore it)."""


@dataclass(frozen=True)
class DMARCPolicy:
    p: str  # none, quarantine, reject
    sp: str  # the policy for subdomains (defaults to p)
    adkim: str = "r"  # r (relaxed) or s (strict)
    aspf: str = "r"
    pct: int = 100
    domain: str = ""  # where the record was found (the author or organizational domain)


def _tags(text: str) -> list[tuple[str, str]]:
    """tag=value pairs (RFC 7489 §6.4), names lower-cased, whitespace trimmed."""
    out = []
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out.append((name.strip().lower(), value.strip()))
        elif part.strip():
            raise DMARCRecordError(f"not a tag=value pair: {part.strip()[:40]!r}")
    return out


def parse_record(txt: str | bytes, domain: str = "") -> DMARCPolicy:
    """A DMARC policy from a TXT record's text. Raises :class:`DMARCRecordError`.

    RFC 7489 §6.3/§6.6.3: ``v=DMARC1`` must come first; a missing or invalid
    ``p`` makes the record unusable unless ``rua`` is given, which then means
    ``p=none``; bad values of the other tags fall back to their defaults.
    """
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8", "replace")
    tags = _tags(txt)
    if not tags or tags[0] != ("v", "DMARC1"):
        raise DMARCRecordError("the record does not start with v=DMARC1")
    values = dict(reversed(tags))  # the first occurrence of a tag counts
    p = values.get("p", "").lower()
    if p not in POLICIES:
        if not values.get("rua"):
            raise DMARCRecordError(f"p={p or '(missing)'} is not none, quarantine or reject")
        p = "none"
    sp = values.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    adkim = values.get("adkim", "r").lower()
    aspf = values.get("aspf", "r").lower()
    pct_text = values.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and len(pct_text) <= 3 else 100
    return DMARCPolicy(
        p=p, sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=min(pct, 100),
        domain=domain,
    )


def _select(records: Iterable[bytes], domain: str) -> DMARCPolicy | None:
    """RFC 7489 §6.6.3 step 3: exactly one v=DMARC1 record, or no policy."""
    candidates = [r for r in records if re.match(rb"\s*v\s*=\s*DMARC1\s*(;|$)", r)]
    if len(candidates) != 1:
        if len(candidates) > 1:
            log.info("{domain} publishes {n} DMARC records; ignoring them", domain=domain,
                     n=len(candidates))
        return None
    try:
        return parse_record(candidates[0], domain)
    except DMARCRecordError as e:
        log.info("unusable DMARC record at {domain}: {err}", domain=domain, err=str(e))
        return None


async def lookup(from_domain: str,
                 dns_txt: Callable[[str], Deferred[list[bytes]]]) -> DMARCPolicy | None:
    """The policy for ``from_domain`` (RFC 7489 §6.6.3), or None if none is published.

    ``_dmarc.<from_domain>`` first, then ``_dmarc.<organizational domain>``.
    A DNS failure raises :class:`mta.policy.dkim.DNSTempError`.
    """
    domain = from_domain.lower().rstrip(".")
    policy = _select(await dns_txt(f"_dmarc.{domain}"), domain)
    if policy is not None:
        return policy
    org = organizational_domain(domain)
    if org == domain:
        return None
    return _select(await dns_txt(f"_dmarc.{org}"), org)


# --- the author domain (RFC5322.From) ------------------------------------------------


@dataclass(frozen=True)
class AuthorDomain:
    domain: str | None
    problem: str = ""  # why there is no domain


def _unfold(headers: Sequence[bytes]) -> list[tuple[str, str]]:
    """(lower-cased name, unfolded value) for raw header lines (folds included)."""
    fields: list[tuple[str, str]] = []
    for raw in headers:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value))
    return fields


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|\[[^\]]*\]?|[<>,:;@]|[^\s"<>,:;@()\[\]]+', re.S)


def _strip_comments(text: str) -> str:
    """Replace RFC 5322 comments (nested, with quoted pairs) by a space, outside quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif ch == '"' and not depth:
            quoted = not quoted
        elif ch == "(" and not quoted:
            depth += 1
            continue
        elif ch == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
            continue
        if not depth:
            out.append(ch)
    return "".join(out)


def _address_domain(value: str) -> AuthorDomain:
    """The domain of the single mailbox in a From field's value."""
    tokens = _TOKEN.findall(_strip_comments(value))
    if not tokens:
        return AuthorDomain(None, "empty From field")
    if ":" in tokens or ";" in tokens:
        return AuthorDomain(None, "group syntax in From")
    depth = 0
    for tok in tokens:
        if tok == "<":
            depth += 1
        elif tok == ">":
            depth -= 1
        elif tok == "," and depth == 0:
            return AuthorDomain(None, "several addresses in From")
    if "<" in tokens:
        start = tokens.index("<")
        try:
            end = tokens.index(">", start)
        except ValueError:
            return AuthorDomain(None, "unclosed <> in From")
        if "<" in tokens[end:] or ">" in tokens[end + 1:]:
            return AuthorDomain(None, "several <> in From")
        tokens = tokens[start + 1: end]
        # An obsolete route (RFC 5322 §4.4: <@a,@b:user@c>) was refused above with ":".
    if "@" not in tokens:
        return AuthorDomain(None, "From address has no domain")
    at = len(tokens) - 1 - tokens[::-1].index("@")
    domain_tokens = tokens[at + 1:]
    if len(domain_tokens) != 1 or at == 0:
        return AuthorDomain(None, "malformed From address")
    domain = domain_tokens[0]
    if domain.startswith("[") or domain.startswith('"'):
        return AuthorDomain(None, "From domain is not a domain name")
    try:
        return AuthorDomain(normalize_domain(domain))
    except AddressError as e:
        return AuthorDomain(None, f"bad From domain: {e}")


def author_domain(headers: Sequence[bytes]) -> AuthorDomain:
    """The RFC5322.From domain of a header section, or why there is none (RFC 7489 §6.6.1).

    ``headers`` are the raw header lines without CRLF, continuation lines
    included (what :class:`mta.mail.reader.DataReader` hands to ``on_headers``).
    """
    values = [value for name, value in _unfold(headers) if name == "from"]
    if not values:
        return AuthorDomain(None, "no From field")
    if len(values) > 1:
        return AuthorDomain(None, "several From fields")
    return _address_domain(values[0])


def header_from_domain(headers: Sequence[bytes]) -> str | None:
    """The author domain (lower case, A-labels); None if there is not exactly one."""
    return author_domain(headers).domain


# --- evaluation ----------------------------------------------------------------


@dataclass(frozen=True)
class DMARCResult:
    result: str  # one of RESULTS
    policy: str = "none"  # the p (or sp) the domain asks for; "none" without a policy
    disposition: str = "none"  # what to do: none, quarantine, reject
    from_domain: str = ""
    reason: str = ""  # for logs and the A-R comment


def _downgrade(disposition: str) -> str:
    # RFC 7489 §6.6.4: a message not sampled by pct gets the next weaker treatment.
    return {"reject": "quarantine", "quarantine": "none"}.get(disposition, "none")


def evaluate(from_domain: str | None, spf_result: str, spf_domain: str,
             dkim_results: Sequence[DKIMResult], policy: DMARCPolicy | None, *,
             sample: float = 0.0, problem: str = "") -> DMARCResult:
    """The DMARC result for one message (RFC 7489 §3.1, §6.6.2, §6.6.4).

    ``spf_domain`` is the domain SPF checked (MAIL FROM's, or HELO's for a
    null sender).  ``sample`` in [0, 1) is compared with ``pct``: pass
    ``random.random()``; the default 0.0 always applies the policy.  A
    ``from_domain`` of None gives ``permerror`` (``problem`` says why).
    """
    if from_domain is None:
        return DMARCResult("permerror", reason=problem or "no usable From domain")
    if policy is None:
        return DMARCResult("none", from_domain=from_domain, reason="no DMARC policy")
    if from_domain != policy.domain and organizational_domain(from_domain) == policy.domain:
        requested = policy.sp  # RFC 7489 §6.3 sp=: the organizational domain's subdomains
    else:
        requested = policy.p
    dkim_ok = [r.domain for r in dkim_results
               if r.result == "pass" and aligned(r.domain, from_domain, policy.adkim)]
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, policy.aspf)
    if dkim_ok or spf_ok:
        how = f"DKIM d={dkim_ok[0]}" if dkim_ok else f"SPF {spf_domain}"
        return DMARCResult("pass", requested, "none", from_domain, f"aligned {how}")
    disposition = requested
    if sample * 100 >= policy.pct:
        disposition = _downgrade(requested)
    return DMARCResult("fail", requested, disposition, from_domain,
                       "no aligned SPF or DKIM pass")


async def check(headers: Sequence[bytes], spf_result: str, spf_domain: str,
                dkim_results: Sequence[DKIMResult],
                dns_txt: Callable[[str], Deferred[list[bytes]]], *,
                sample: float = 0.0) -> DMARCResult:
    """Everything at once: author domain, policy lookup, evaluation; never raises."""
    author = author_domain(headers)
    if author.domain is None:
        return evaluate(None, spf_result, spf_domain, dkim_results, None,
                        problem=author.problem)
    try:
        policy = await lookup(author.domain, dns_txt)
    except DNSTempError as e:
        return DMARCResult("temperror", from_domain=author.domain,
                           reason=f"policy lookup failed: {e}")
    except Exception as e:
        log.failure("DMARC lookup for {domain} failed", domain=author.domain)
        return DMARCResult("temperror", from_domain=author.domain,
                           reason=f"policy lookup failed: {type(e).__name__}")
    return evaluate(author.domain, spf_result, spf_domain, dkim_results, policy, sample=sample)
