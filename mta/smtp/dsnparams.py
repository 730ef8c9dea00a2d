"""The DSN extension's parameters (RFC 3461 §4): parsing what a client sends,
checked and kept canonical; writing them again is in :mod:`mta.mail.dsnfields`.

MAIL takes ``RET=FULL|HDRS`` (§4.3) and ``ENVID=<xtext>`` (§4.4); RCPT takes
``NOTIFY=NEVER`` or a comma list of ``SUCCESS``, ``FAILURE`` and ``DELAY``
(§4.1) and ``ORCPT=<addr-type>;<xtext>`` (§4.2).  Values are kept decoded and
canonical, as the envelope stores them:

* RET: ``"FULL"`` or ``"HDRS"``; ENVID: the decoded identifier;
* NOTIFY: ``"NEVER"`` or the keywords in the order SUCCESS, FAILURE, DELAY,
  joined by commas (``"SUCCESS,DELAY"``);
* ORCPT: ``"<addr-type>;<address>"``, the type in lower case and the address
  decoded; for the ``utf-8`` type of RFC 6533 §3 its ``\\x{HEX}`` escapes are
  decoded too, so the address is the Unicode text.

The empty string means "not given" everywhere.  Pure functions; a bad value is
answered with the matching reply from :mod:`mta.mail.replies`.
"""

from __future__ import annotations

import re

from mta.mail import replies as R
from mta.mail.dsnfields import XtextError, xtext_decode
from mta.mail.replies import Reply

MAX_ENVID = 100  # RFC 3461 §4.4
# RFC 3461 §4 lets NOTIFY and ORCPT add 500 characters to a RCPT line.
MAX_ORCPT = 500
MAX_ADDR_TYPE = 64

NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")  # the canonical order

# RFC 5322 §3.2.3 atom, the syntax of addr-type (RFC 3461 §4.2).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*/=?^_`{|}~+\-]+\Z")
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _printable_ascii(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


# --- MAIL ------------------------------------------------------------------------------


def parse_ret(value: str | None) -> str | Reply:
    """RFC 3461 §4.3: ``FULL`` or ``HDRS`` (any case)."""
    if value is None or value.upper() not in ("FULL", "HDRS"):
        return R.BAD_RET
    return value.upper()


def parse_envid(value: str | None) -> str | Reply:
    """RFC 3461 §4.4: xtext of at most 100 characters (as sent; the decoded text
    is never longer) standing for printable US-ASCII."""
    if not value or len(value) > MAX_ENVID:
        return R.BAD_ENVID
    try:
        envid = xtext_decode(value)
    except XtextError:
        return R.BAD_ENVID
    return envid if _printable_ascii(envid) else R.BAD_ENVID


# --- RCPT ------------------------------------------------------------------------------


def parse_notify(value: str | None) -> str | Reply:
    """RFC 3461 §4.1: ``NEVER`` alone, or SUCCESS/FAILURE/DELAY, each at most once."""
    if not value:
        return R.BAD_NOTIFY
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if len(set(words)) != len(words) or not all(w in NOTIFY_KEYWORDS for w in words):
        return R.BAD_NOTIFY
    return ",".join(k for k in NOTIFY_KEYWORDS if k in words)


def parse_orcpt(value: str | None, smtputf8: bool = False) -> str | Reply:
    """RFC 3461 §4.2: ``addr-type;xtext``; the result is ``type;address`` (see module doc).

    The address must be printable US-ASCII (§4.2), except for the ``utf-8``
    type (RFC 6533 §3), whose escapes are decoded and which may carry UTF-8
    as it is in an SMTPUTF8 transaction.
    """
    if not value or len(value) > MAX_ORCPT:
        return R.BAD_ORCPT
    addr_type, sep, encoded = value.partition(";")
    if not sep or not encoded or len(addr_type) > MAX_ADDR_TYPE or not _ATOM.match(addr_type):
        return R.BAD_ORCPT
    addr_type = addr_type.lower()
    utf8 = addr_type == "utf-8"
    try:
        address = xtext_decode(encoded, allow_unicode=utf8 and smtputf8)
    except XtextError:
        return R.BAD_ORCPT
    if utf8:
        try:
            address = _UTF8_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), address)
        except (ValueError, OverflowError):  # beyond U+10FFFF
            return R.BAD_ORCPT
        if not address.isprintable():
            return R.BAD_ORCPT
    elif not _printable_ascii(address):
        return R.BAD_ORCPT
    return f"{addr_type};{address}"


def parse_rcpt_params(params: dict[str, str | None], smtputf8: bool) -> tuple[str, str] | Reply:
    """(notify, orcpt) from a RCPT command's parameters, or the reply refusing them.

    Any parameter other than NOTIFY and ORCPT is refused as unsupported (555).
    """
    notify = orcpt = ""
    for key, value in params.items():
        if key == "NOTIFY":
            parsed = parse_notify(value)
        elif key == "ORCPT":
            parsed = parse_orcpt(value, smtputf8)
        else:
            return R.PARAM_UNKNOWN
        if isinstance(parsed, Reply):
            return parsed
        if key == "NOTIFY":
            notify = parsed
        else:
            orcpt = parsed
    return notify, orcpt
