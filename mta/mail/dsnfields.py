"""DSN fields as the envelope stores them (RFC 3461 §4), in the forms both sides
write: xtext coding (§4), the MAIL/RCPT parameters for a next hop, and the
Original-Recipient value of a report (RFC 3464 §2.3.1).

The SMTP session parses what a client sends (:mod:`mta.smtp.dsnparams`, which
answers bad values with replies); delivery writes the parameters again and the
DSN builder writes the report field from here.  Pure functions.
"""

from __future__ import annotations

import re

# RFC 3461 §4: hexchar is "+" and two *upper case* hexadecimal digits.
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")


class XtextError(ValueError):
    pass


def xtext_decode(text: str, *, allow_unicode: bool = False) -> str:
    """The text an xtext stands for (RFC 3461 §4).

    An xchar is ``!`` to ``~`` except ``+`` and ``=``; anything else must come
    as ``+XX``.  ``allow_unicode`` also admits non-ASCII characters as they are
    (the utf-8-addr-unitext of RFC 6533 §3, in an SMTPUTF8 transaction).
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:  # bounded: every turn consumes at least one character
        c = text[i]
        if c == "+":
            m = _HEXCHAR.match(text, i)
            if m is None:
                raise XtextError("'+' must be followed by two upper-case hex digits")
            out.append(chr(int(m.group(1), 16)))
            i += 3
            continue
        if c == "=" or not ("!" <= c <= "~" or (allow_unicode and c > "\x7f")):
            raise XtextError(f"character {c!r} must be encoded as +XX")
        out.append(c)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """``text`` as xtext: ``+``, ``=``, controls and space as ``+XX`` (RFC 3461 §4).

    Only for ASCII text (callers turn Unicode into RFC 6533 escapes first).
    """
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


# --- writing them again (for a next hop, and for the report) -------------------------------


def _escape_utf8(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: non-ASCII, controls, '+', '=' and '\\' as \\x{HEX}."""
    return "".join(c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                   for c in address)


def report_orcpt(orcpt: str) -> str:
    """An ORCPT as stored, as the Original-Recipient field's value (RFC 3464 §2.3.1):
    ``type;address``, ASCII (a ``utf-8`` address in its escaped form)."""
    addr_type, _, address = orcpt.partition(";")
    if addr_type == "utf-8":
        return f"utf-8;{_escape_utf8(address)}"
    return f"{addr_type};{address}"


def mail_params(ret: str, envid: str) -> list[str]:
    """MAIL parameters carrying ``ret`` and ``envid`` on to a next hop ("" = leave out)."""
    params = []
    if ret:
        params.append(f"RET={ret}")
    if envid:
        params.append(f"ENVID={xtext_encode(envid)}")
    return params


def rcpt_params(notify: str, orcpt: str, original: str) -> str:
    """RCPT parameters for a next hop: NOTIFY as given and ORCPT as given, or, when
    only NOTIFY was, the RCPT address we received (RFC 3461 §4.2: an ORCPT a
    relay adds MUST be that address).  "" when the recipient had neither."""
    if not notify and not orcpt:
        return ""
    if not orcpt:
        orcpt = f"rfc822;{original}" if original.isascii() else f"utf-8;{original}"
    parts = [f"NOTIFY={notify}"] if notify else []
    addr_type, _, address = report_orcpt(orcpt).partition(";")
    parts.append(f"ORCPT={addr_type};{xtext_encode(address)}")
    return " ".join(parts)
