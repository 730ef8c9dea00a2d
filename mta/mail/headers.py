"""Writing header fields: the one place that folds and bounds every field the MTA writes.

RFC 5322 §2.1.1: a line MUST be no more than 998 octets (without its CRLF) and
SHOULD be no more than 78; §2.2.3: a field is folded by putting CRLF before
existing whitespace.  :func:`fold_header` folds at spaces so each physical
line is at most ``width`` octets where whitespace allows, and guarantees the
998-octet limit whatever the text: a run without whitespace too long for one
line (a client's 2000-character HELO name, say) is cut, ending in
:data:`TRUNCATED`.  Every header the MTA writes goes through it (Received,
Received-SPF, Authentication-Results, DKIM-Signature, the DSN's own header),
so no value a client sent can make a line a strict next hop refuses.
"""

from __future__ import annotations

MAX_LINE = 998  # octets, without the CRLF (RFC 5322 §2.1.1)
WIDTH = 78  # the recommended length (RFC 5322 §2.1.1)
TRUNCATED = "..."  # ends a word that had to be cut to fit MAX_LINE


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def _cut(line: str) -> str:
    """``line`` cut to MAX_LINE octets, ending in TRUNCATED (never inside a UTF-8 sequence)."""
    room = MAX_LINE - len(TRUNCATED)
    head = line.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return head + TRUNCATED


def _fold_line(line: str, width: int, out: list[str]) -> None:
    words = line.split(" ")
    current = words[0]
    size = _octets(current)
    for word in words[1:]:
        n = _octets(word)
        # An empty word (two spaces in a row) stays on its line: a continuation
        # line must not be whitespace only (RFC 5322 §3.2.2).
        if word and size + 1 + n > width:
            out.append(current if size <= MAX_LINE else _cut(current))
            current, size = " " + word, 1 + n
        else:
            current += " " + word
            size += 1 + n
    out.append(current if size <= MAX_LINE else _cut(current))


def fold_header(field: str, width: int = WIDTH) -> str:
    """``field`` ("Name: value", possibly already folded with CRLF + whitespace) with
    every physical line at most ``width`` octets where it can be folded at a space,
    and at most :data:`MAX_LINE` octets always.  Lines joined by CRLF, no final CRLF.

    Unfolding (removing the CRLFs) gives ``field`` back unless a word had to be cut.
    """
    if len(field) <= width and "\r" not in field:  # the usual case: nothing to do
        return field
    out: list[str] = []
    for line in field.split("\r\n"):
        if _octets(line) <= width:
            out.append(line)
        else:
            _fold_line(line, width, out)
    return "\r\n".join(out)


def fold_header_bytes(field: bytes, width: int = WIDTH) -> bytes:
    """:func:`fold_header` for a field already encoded (UTF-8)."""
    if len(field) <= width and b"\r" not in field:
        return field
    return fold_header(field.decode("utf-8", "surrogateescape"), width).encode("utf-8", "surrogateescape")


def unfold_headers(lines: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """Group raw header lines into (lower-cased field name, [its physical lines])."""
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            name = line.split(b":", 1)[0].strip().lower()
            fields.append((name, [line]))
    return fields
