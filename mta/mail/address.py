"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 6531 §3.3).

Pure functions: text in, values or :class:`AddressError` out.  The server turns
an ``AddressError`` into a 501/553 reply; nothing here touches the network.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_PATH_OCTETS = 256  # RFC 5321 §4.5.3.1.3
MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 §4.5.3.1.2


class AddressError(ValueError):
    """The text is not a valid path or address.

    ``enhanced`` is the RFC 3463 code that fits: 5.1.3 for a bad mailbox syntax,
    5.1.7 for a bad sender, 5.1.8/5.1.2 for a bad domain (chosen by the caller).
    """

    def __init__(self, message: str, bad_domain: bool = False) -> None:
        super().__init__(message)
        self.bad_domain = bad_domain


class DuplicateParameter(AddressError):
    """An ESMTP parameter keyword appears twice in one MAIL or RCPT command."""

    def __init__(self, keyword: str) -> None:
        super().__init__(f"parameter {keyword} given more than once")
        self.keyword = keyword


@dataclass(frozen=True)
class Address:
    """A parsed mailbox. ``local`` keeps its original case; ``domain`` is normalised."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not str(self).isascii()


# RFC 5321 §4.1.2: atext plus, under RFC 6531, any UTF-8 non-ASCII character.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*)"\Z')
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


def logged_sender(sender: str) -> str:
    """An envelope sender as a log event's ``sender`` field holds it: the address,
    or ``<>`` for the null sender (never an empty string)."""
    return sender or "<>"


def quote_local(local: str) -> str:
    if _DOT_STRING.match(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def normalize_domain(domain: str) -> str:
    """Lower-case, IDNA-encode (A-labels) and check a domain name (RFC 5890/5891).

    Address literals (``[192.0.2.1]``) are kept as they are after a syntax check.
    """
    if not domain:
        raise AddressError("empty domain", bad_domain=True)
    if domain.startswith("[") and domain.endswith("]"):
        return _normalize_literal(domain)
    domain = domain.rstrip(".") if domain.endswith(".") and len(domain) > 1 else domain
    if not domain.isascii():
        domain = unicodedata.normalize("NFC", domain)
        try:
            labels = [
                lab.encode("idna").decode("ascii") if not lab.isascii() else lab
                for lab in domain.split(".")
            ]
        except UnicodeError:
            raise AddressError(f"invalid internationalised domain {domain!r}", bad_domain=True) from None
        domain = ".".join(labels)
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long", bad_domain=True)
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"invalid domain {domain!r}", bad_domain=True)
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise AddressError(f"invalid A-label {label!r}", bad_domain=True) from None
        elif label[2:4] == "--":
            # RFC 5891 §4.2.3.1: hyphens in the 3rd and 4th positions are reserved.
            raise AddressError(f"invalid domain label {label!r}", bad_domain=True)
    return domain


def _normalize_literal(literal: str) -> str:
    import ipaddress

    inner = literal[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"invalid address literal {literal!r}", bad_domain=True) from None


def parse_mailbox(text: str, smtputf8: bool = False) -> Address:
    """Parse ``local@domain`` (the part inside the angle brackets)."""
    if len(text.encode("utf-8")) > MAX_PATH_OCTETS:
        raise AddressError("address too long")
    if not smtputf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    m = _QUOTED.match(local)
    if m:
        local = re.sub(r"\\(.)", r"\1", m.group(1))
    elif not _DOT_STRING.match(local):
        raise AddressError(f"invalid local part {local!r}")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        raise AddressError("local part too long")
    if not smtputf8 and not local.isascii():
        raise AddressError("non-ASCII local part without SMTPUTF8")
    address = Address(local, normalize_domain(domain))
    # The limit holds for the form we store and send on, too (A-labels are longer).
    if len(str(address).encode("utf-8")) > MAX_PATH_OCTETS:
        raise AddressError("address too long")
    return address


def parse_path(text: str, smtputf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse ``<...>`` from MAIL FROM/RCPT TO; ``None`` is the null path ``<>``.

    A source route (``<@a,@b:user@c>``, RFC 5321 §4.1.2 and C.) is accepted
    and its hops ignored, as RFC 5321 §3.3 asks.
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("bad source route")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            normalize_domain(hop[1:])
        inner = inner[colon + 1 :]
    return parse_mailbox(inner, smtputf8)


def split_path_and_params(arg: str, strict: bool = True) -> tuple[str, dict[str, str | None]]:
    """Split ``<path> KEY=VALUE KEY`` into the path and an upper-cased parameter dict.

    The path ends at the ``>`` that closes it, respecting quoted local parts.

    With ``strict`` false, a path without angle brackets (``user@domain``, as
    scripts and old devices send it; Postfix's ``strict_rfc821_envelopes = no``)
    is the first word after the colon, and is returned inside brackets so that
    :func:`parse_path` reads it like any other.  The parameters still follow it
    (``user@domain SIZE=100``).  A quoted local part holding a space needs the
    brackets there, since the word ends at the first space; an empty path is
    refused either way (the null sender is ``<>``).

    A keyword given twice (in any case) raises :class:`DuplicateParameter`.
    """
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        if strict:
            raise AddressError("path must be enclosed in <>")
        word, _, rest = arg.partition(" ")
        if not word:
            raise AddressError("empty path")
        arg = f"<{word}> {rest}" if rest else f"<{word}>"
    in_quote = False
    escaped = False
    end = -1
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            end = i
            break
    if end < 0:
        raise AddressError("path must be enclosed in <>")
    path, rest = arg[: end + 1], arg[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after path")
    params: dict[str, str | None] = {}
    for word in rest.split():
        key, eq, value = word.partition("=")
        if not _PARAM.match(key):
            raise AddressError(f"bad parameter {word!r}")
        key = key.upper()
        if key in params:
            raise DuplicateParameter(key)
        params[key] = value if eq else None
    return path, params


def fold_local(local: str, drop: str = "", suffix_separators: str = "") -> str:
    """The form of a local part used to match users and aliases.

    Case-folded (RFC 6531 allows the server to treat local parts as it likes for
    its own domains), NFC-normalised, with ``drop`` characters removed and any
    suffix after the first separator cut (``user+tag`` → ``user``).
    """
    local = unicodedata.normalize("NFC", local).casefold()
    for i, ch in enumerate(local):
        if ch in suffix_separators and i > 0:
            local = local[:i]
            break
    for ch in drop:
        local = local.replace(ch, "")
    return local


# --- the EHLO/HELO name (RFC 5321 §4.1.1.1, §4.1.3) ----------------------------------

# A host name label as clients really send them: letters (any script), digits,
# hyphen and underscore.  The octet limits are checked separately.
_HELO_LABEL = re.compile(r"[\w-]+\Z")
MAX_LABEL_OCTETS = 63  # RFC 1035 §2.3.4


def helo_name_problem(name: str, strict: bool = False) -> str | None:
    """What is wrong with ``name`` as the argument of EHLO/HELO, or None.

    Accepted: an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), or a
    host name whose labels are 1-63 octets of letters, digits, hyphen and
    underscore, 255 octets at most, a trailing dot allowed, no empty label (a bare
    single label such as ``localhost`` too).  ``strict`` also wants a fully
    qualified LDH name (RFC 5321 §4.1.1.1: the FQDN or a literal), as Postfix's
    reject_invalid_helo_hostname + reject_non_fqdn_helo_hostname: a bare address
    must then be written as a literal.  Returns ``"invalid"`` or ``"not_fqdn"``.
    """
    if name.startswith("["):
        if not name.endswith("]"):
            return "invalid"
        try:
            _normalize_literal(name)
        except AddressError:
            return "invalid"
        return None
    host = name[:-1] if name.endswith(".") else name
    if not host or len(host.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return "invalid"
    labels = host.split(".")
    for label in labels:
        if not _HELO_LABEL.match(label) or len(label.encode("utf-8")) > MAX_LABEL_OCTETS:
            return "invalid"
    if strict:
        try:
            normalize_domain(host)
        except AddressError:
            return "invalid"
        if len(labels) < 2:
            return "not_fqdn"
        if labels[-1].isdigit():  # 192.0.2.1 without brackets: not a domain
            return "invalid"
    return None
