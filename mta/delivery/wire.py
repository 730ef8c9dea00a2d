"""The outbound client's wire encoding: replies in, message data out.

* :class:`ReplyParser` turns received bytes into complete :class:`ServerReply`
  objects (multi-line replies, code consistency, bounded line length and line
  count; RFC 5321 §4.2).  Nothing is acted upon before a reply is complete.
* :class:`Capabilities` is what an EHLO (or LHLO) reply offered.
* :class:`DotStuffer` is the pure DATA encoder: CRLF line endings, dot-stuffing
  with its state carried across chunks (RFC 5321 §4.5.2), the final
  ``CRLF.CRLF``; :func:`bdat_command` frames a BDAT chunk (RFC 3030 §2).

No I/O here: :mod:`mta.delivery.protocol` feeds and sends these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mta.delivery.outbound import RecipientReply
from mta.queue.courier import Outcome

MAX_REPLY_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512; real servers send longer lines
MAX_REPLY_LINES = 100


# --- replies -----------------------------------------------------------------------------


class ReplyError(Exception):
    """The server sent something that is not an SMTP reply."""


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)(.*)\Z", re.S)
# RFC 3463 §2 / RFC 2034: class.subject.detail at the start of the text.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |\Z)")


@dataclass(frozen=True)
class ServerReply:
    """A complete reply of the server we talk to (not our own replies, which are
    :class:`mta.mail.replies.Reply`)."""

    code: int
    lines: tuple[str, ...]  # the text of each line, after "NNN-" / "NNN "

    @property
    def enhanced(self) -> str:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m is None or m.group(1) != str(self.code)[0]:
            return ""
        return m.group(0).strip()

    @property
    def text(self) -> str:
        enhanced = self.enhanced
        parts = []
        for line in self.lines:
            if enhanced and line.startswith(enhanced):
                line = line[len(enhanced):].lstrip(" ")
            parts.append(line)
        return " ".join(p for p in parts if p)

    @property
    def kind(self) -> int:
        return self.code // 100

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)

    def as_recipient_reply(self, outcome: Outcome) -> RecipientReply:
        return RecipientReply(self.code, self.enhanced, self.text, outcome)


class ReplyParser:
    """Bytes in, complete replies out (RFC 5321 §4.2, §4.2.1 multi-line replies)."""

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._buffer = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []
        self._max_line = max_line
        self._max_lines = max_lines

    @property
    def pending(self) -> bool:
        """True if part of a reply has been received."""
        return bool(self._buffer) or bool(self._lines)

    def feed(self, data: bytes) -> list[ServerReply]:
        self._buffer += data
        replies = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise ReplyError(f"reply line longer than {self._max_line} octets")
                return replies
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> ServerReply | None:
        if len(line) > self._max_line:
            raise ReplyError(f"reply line longer than {self._max_line} octets")
        m = _REPLY_LINE.match(line)
        if m is None:
            raise ReplyError(f"malformed reply line {line[:80]!r}")
        code = int(m.group(1))
        if self._code is not None and code != self._code:
            raise ReplyError(f"multi-line reply mixes codes {self._code} and {code}")
        self._code = code
        self._lines.append(m.group(3).decode("utf-8", "replace"))
        if len(self._lines) > self._max_lines:
            raise ReplyError(f"reply longer than {self._max_lines} lines")
        if m.group(2) == b"-":
            return None
        reply = ServerReply(code, tuple(self._lines))
        self._code, self._lines = None, []
        return reply


@dataclass(frozen=True)
class Capabilities:
    """What the EHLO reply offered (RFC 5321 §4.1.1.1); HELO offers nothing."""

    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: ServerReply) -> Capabilities:
        keywords: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            key = words[0].upper()
            if key.startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                key, words = "AUTH", ["AUTH", words[0][5:], *words[1:]]
            keywords[key] = tuple(words[1:])
        return cls(keywords)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size_limit(self) -> int:
        """RFC 1870 §4: the declared maximum size, 0 when none is fixed."""
        params = self.keywords.get("SIZE", ())
        return int(params[0]) if params and params[0].isdigit() else 0

    @property
    def auth_mechanisms(self) -> set[str]:
        return {m.upper() for m in self.keywords.get("AUTH", ())}


# --- the DATA encoder --------------------------------------------------------------------


class DotStuffer:
    """Turns message bytes, chunk by chunk, into the DATA stream (RFC 5321 §4.5.2).

    Every line ending becomes CRLF (a bare CR or bare LF too, never CR CR LF), a
    ``.`` at the start of any line is doubled wherever that line starts, also
    right at a chunk boundary, and :meth:`finish` adds ``CRLF`` if needed and the
    terminating ``.CRLF``.  The output of any chunking of the same input is the
    same bytes.
    """

    def __init__(self) -> None:
        self._at_line_start = True  # the DATA command's CRLF precedes the first line
        self._pending_cr = False  # a CR ended the last chunk: CRLF or bare CR, not known yet

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        out = b""
        if self._pending_cr:
            out, self._pending_cr, self._at_line_start = b"\r\n", False, True
        if not self._at_line_start:
            out += b"\r\n"
        self._at_line_start = True
        return out + b".\r\n"


def bdat_command(chunk: bytes, last: bool) -> bytes:
    """``BDAT <size> [LAST]`` and the chunk: the size is exactly the chunk's (RFC 3030 §2)."""
    return b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if last else b"", chunk)
