"""The DATA reader: turns the bytes after ``354`` into the stored message.

Rules (RFC 5321 §4.1.1.4, §4.5.2, §2.3.8):

* The message ends only at ``CRLF . CRLF``.  ``LF . LF``, ``CR . CR`` and the
  other smuggling variants are ordinary (invalid) content, never an end.
* A bare CR or bare LF anywhere is recorded as an error; the message is then
  refused after the terminator, so nothing with ambiguous line ends is stored.
* A line starting with ``.`` has that dot removed (dot-unstuffing).
* Lines over the limit (998 octets, RFC 5322 §2.1.1), a header section over its
  limit, and a message over the SIZE limit are recorded as errors while the
  reader keeps scanning for the terminator, so the session stays in step.
* Memory is bounded: only the header section and one partial line are kept.

:class:`ChunkReader` is the same reader for BDAT (RFC 3030): it takes the
raw octets of the chunks (no terminator, no dot-unstuffing) and applies the
same limits and header hooks; under BODY=BINARYMIME only the header section is
read as lines, the body is stored as it came.

The reader works on whole chunks with ``bytes`` methods (split, count, find)
rather than one Python call per line, and hands the stored bytes to ``sink``
as it goes.  Header lines are collected and handed to ``on_headers`` once,
which returns the header lines to store (so the session can add, remove or
count headers).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from typing import Any

CRLF = b"\r\n"


class DataError(Enum):
    BARE_LINE_ENDING = "bare line ending"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "too big"
    HEADER_TOO_BIG = "header too big"


# A header field line (RFC 5322 §2.2) or a continuation line (folding, §2.2.3).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


class DataReader:
    """Feed it raw bytes; it says when the message has ended and what came after."""

    # Dot-unstuffing (RFC 5321 §4.5.2): DATA only, never for BDAT octets.
    _unstuff = True
    binary = False  # ChunkReader under BODY=BINARYMIME: a body without line rules

    def __init__(
        self,
        sink: Callable[[bytes], None],
        on_headers: Callable[[list[bytes]], list[bytes]],
        max_size: int,
        max_line_length: int = 998,
        max_header_size: int = 1024 * 1024,
    ) -> None:
        self._sink = sink
        self._on_headers = on_headers
        self.max_size = max_size
        self.max_line = max_line_length
        self.max_header_size = max_header_size
        self.size = 0  # octets of message stored (after unstuffing)
        self.errors: list[DataError] = []
        self.eight_bit = False
        self._pending = b""  # an incomplete line (at most max_line + 2 octets)
        self._overlong = False  # the pending line is the tail of an over-long line
        self._in_headers = True
        self._headers: list[bytes] = []
        self._header_size = 0
        self.done = False

    # --- errors ------------------------------------------------------------

    def _error(self, error: DataError) -> None:
        if error not in self.errors:
            self.errors.append(error)

    @property
    def error(self) -> DataError | None:
        """The error to report: the first one found."""
        return self.errors[0] if self.errors else None

    # --- input -------------------------------------------------------------

    def feed(self, data: bytes) -> bytes | None:
        """Consume ``data``. Returns None while the message goes on, else the bytes
        that followed the terminating ``CRLF.CRLF`` (pipelined commands)."""
        assert not self.done
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = data.rfind(CRLF)
        if end < 0:
            self._keep_partial(data)
            return None
        complete, rest = data[: end + 2], data[end + 2 :]
        lines = complete.split(CRLF)
        lines.pop()  # the empty string after the final CRLF
        skip_first = self._overlong
        self._overlong = False
        terminator = self._find_terminator(lines, skip_first)
        # ``complete[:text_end]`` is the lines that stay, joined by their CRLFs.
        text_end = len(complete) - 2
        if terminator is not None:
            # Everything after the "." line belongs to the next command.
            consumed = sum(map(len, lines[: terminator + 1])) + 2 * (terminator + 1)
            rest = complete[consumed:] + rest
            lines = lines[:terminator]
            text_end = consumed - 5 if lines else 0  # before the CRLF and the ".\r\n"
        self._check_line_endings(complete, text_end, len(lines))
        if skip_first and lines:
            lines = lines[1:]  # the tail of an over-long line: already an error, not stored
        self._store(lines)
        if terminator is not None:
            self._finish()
            return rest
        self._keep_partial(rest)
        return None

    def _find_terminator(self, lines: list[bytes], skip_first: bool) -> int | None:
        start = 1 if skip_first else 0
        try:
            return lines.index(b".", start)
        except ValueError:
            return None

    def _keep_partial(self, data: bytes) -> None:
        if len(data) > self.max_line + 1:
            # Keep only the last octet (it may be the CR of a CRLF); the line is lost.
            self._error(DataError.LINE_TOO_LONG)
            self._overlong = True
            self._check_line_endings(data, len(data) - 1, 1)
            data = data[-1:]
        self._pending = data

    def _check_line_endings(self, data: bytes, end: int, count: int) -> None:
        """``data[:end]`` is ``count`` lines split at CRLF, with the CRLFs between
        them: every CR and LF in it must be part of one of those ``count - 1``
        CRLFs (counted in place, not one Python call per line)."""
        if DataError.BARE_LINE_ENDING in self.errors or not count:
            return
        separators = count - 1
        if data.count(b"\r", 0, end) != separators or data.count(b"\n", 0, end) != separators:
            self._error(DataError.BARE_LINE_ENDING)

    def _store(self, lines: list[bytes]) -> None:
        if not lines:
            return
        if self._in_headers:
            lines = self._take_headers(lines)
            if not lines:
                return
        # A binary body (ChunkReader under BINARYMIME) has no line length rule.
        if not (self.binary and not self._in_headers) and max(map(len, lines)) > self.max_line:
            self._error(DataError.LINE_TOO_LONG)
        lines.append(b"")
        block = CRLF.join(lines)
        if self._unstuff:
            # RFC 5321 §4.5.2: remove the first "." of a line that starts with one
            # (every element of ``lines`` starts a line; the block ends with CRLF).
            if block[:1] == b".":
                block = block[1:]
            if b"\r\n." in block:
                block = block.replace(b"\r\n.", b"\r\n")
        self._write(block)

    def _write(self, block: bytes) -> None:
        if not self.eight_bit and not block.isascii():
            self.eight_bit = True
        self.size += len(block)
        if self.size > self.max_size:
            self._error(DataError.TOO_BIG)
        if not self.errors:
            self._sink(block)

    def _take_headers(self, lines: list[bytes]) -> list[bytes]:
        """Collect header lines; return the body lines that follow the header section."""
        for i, line in enumerate(lines):
            if line == b"":
                self._end_headers()
                return lines[i:]  # the blank line is part of what is stored
            if line[:1] in (b" ", b"\t") and self._headers:
                pass  # folded continuation of the previous field
            elif not _FIELD.match(line):
                # Not a header: the body starts here without a blank line.
                self._end_headers()
                return lines[i:]
            if line[:1] == b"." and self._unstuff:
                line = line[1:]
            self._header_size += len(line) + 2
            if self._header_size > self.max_header_size:
                self._error(DataError.HEADER_TOO_BIG)
                self._end_headers()
                return []
            if len(line) > self.max_line:
                self._error(DataError.LINE_TOO_LONG)
            self._headers.append(line)
        return []

    def _end_headers(self) -> None:
        self._in_headers = False
        headers = self._on_headers(self._headers)
        self._headers = []
        if headers:
            headers.append(b"")
            self._write(CRLF.join(headers))

    def _finish(self) -> None:
        if self._in_headers:
            self._end_headers()
        self.done = True


class ChunkReader(DataReader):
    """The BDAT reader (RFC 3030 §2): the message is the octets of its chunks, exactly.

    :meth:`feed` takes any part of any chunk; :meth:`end` is called after the
    LAST chunk.  There is no terminator to look for and nothing is
    un-stuffed: ``CRLF.CRLF`` or ``LF.LF`` inside a chunk is plain content.
    The checks are DataReader's (size, header size, header hooks; line
    length and bare CR/LF), except that with ``binary`` (BODY=BINARYMIME,
    RFC 3030 §3) the body after the header section is binary: no line rules
    apply to it and it is stored octet for octet.  The header section is
    still read as lines (its size bounded, each line bounded).

    A text message whose last line lacks its CRLF gets one (RFC 5322 §2.1:
    lines end in CRLF; DATA can only ever store such messages); a binary body
    is kept exactly as sent.
    """

    _unstuff = False

    def __init__(self, *args: Any, binary: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.binary = binary

    def feed(self, data: bytes) -> None:  # type: ignore[override]
        """Consume octets of a chunk (never the end of the message: see :meth:`end`)."""
        assert not self.done
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if self.binary and not self._in_headers:
            self._write(data)
            return
        end = data.rfind(CRLF)
        if end < 0:
            self._keep_partial(data)
            return
        complete, rest = data[: end + 2], data[end + 2 :]
        lines = complete.split(CRLF)
        lines.pop()  # the empty string after the final CRLF
        skip_first = self._overlong
        self._overlong = False
        if not self.binary:
            self._check_line_endings(complete, len(complete) - 2, len(lines))
        if skip_first and lines:
            lines = lines[1:]  # the tail of an over-long line: already an error, not stored
        self._store(lines)
        if self.binary and not self._in_headers:
            if rest:
                self._write(rest)
            return
        self._keep_partial(rest)


    def _keep_partial(self, data: bytes) -> None:
        if self.binary and len(data) > self.max_line + 1:
            # Binary content with no line end in sight: not a header line, so the
            # body starts here (as for any line that is not a header field).
            self._end_headers()
            self._write(data)
            return
        super()._keep_partial(data)

    def end(self) -> None:
        """The LAST chunk has been read: store what is pending and close the header section."""
        if self._pending:
            if self.binary and not self._in_headers:
                self._write(self._pending)
                self._pending = b""
            else:
                self.feed(CRLF)  # completes the last line (or the over-long one's tail)
        self._finish()
