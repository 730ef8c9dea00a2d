"""The DATA encoder on its own: CRLF line endings, dot-stuffing across chunk boundaries.

A reference encoder works on the whole message at once, line by line; the
streaming :class:`DotStuffer` must produce the same bytes for any chunking, and
un-stuffing its output (as a server does, RFC 5321 §4.5.2) must give back the
message with CRLF line endings.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.delivery.wire import DotStuffer


def normalize(message: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF as CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", message)


def reference(message: bytes) -> bytes:
    """Whole-message encoding: stuff each line, end with CRLF.CRLF."""
    text = normalize(message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")[:-1] if text else []
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return out + b".\r\n"


def unstuff(wire: bytes) -> bytes:
    """What a server keeps: the terminator removed, one leading dot per line dropped."""
    assert wire.endswith(b".\r\n") and (wire == b".\r\n" or wire.endswith(b"\r\n.\r\n"))
    body = wire[:-3]
    lines = body.split(b"\r\n")[:-1] if body else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def encode(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


# Messages built from the bytes that matter: dots, CR, LF and ordinary text.
messages = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"x.y", b" "]),
                    max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(message=messages, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_chunking_gives_the_reference_encoding(message: bytes, cuts: list[int]) -> None:
    wire = encode(split_at(message, cuts))
    assert wire == reference(message)


@settings(max_examples=300, deadline=None)
@given(message=messages, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_unstuffing_the_wire_gives_the_crlf_message(message: bytes, cuts: list[int]) -> None:
    wire = encode(split_at(message, cuts))
    expected = normalize(message)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(wire) == expected
    # Nothing on the wire but CRLF line endings, and no premature terminator.
    assert b"\r" not in wire.replace(b"\r\n", b"")
    assert b"\n" not in wire.replace(b"\r\n", b"")
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3


def test_dot_exactly_at_a_chunk_boundary_is_stuffed() -> None:
    first = b"x" * 16382 + b"\r\n"  # the next line starts exactly at 16 KiB
    assert encode([first, b".hidden\r\n"]) == first + b"..hidden\r\n.\r\n"


def test_dot_after_crlf_split_across_chunks() -> None:
    assert encode([b"a\r", b"\n.b\r\n"]) == b"a\r\n..b\r\n.\r\n"
    assert encode([b"a\r", b".b"]) == b"a\r\n..b\r\n.\r\n"  # a bare CR ends a line too


def test_bare_line_endings_become_crlf_never_cr_cr_lf() -> None:
    assert encode([b"one\ntwo\rthree\r\n"]) == b"one\r\ntwo\r\nthree\r\n.\r\n"
    assert encode([b"one\r", b"\r\n"]) == b"one\r\n\r\n.\r\n"


def test_message_starting_with_a_dot() -> None:
    assert encode([b".", b"\r\n"]) == b"..\r\n.\r\n"
    assert encode([b"", b".start"]) == b"..start\r\n.\r\n"


def test_empty_message_and_missing_final_newline() -> None:
    assert encode([]) == b".\r\n"
    assert encode([b"no newline"]) == b"no newline\r\n.\r\n"
    assert encode([b"ends with cr\r"]) == b"ends with cr\r\n.\r\n"


def test_a_lone_dot_line_cannot_end_the_data_early() -> None:
    wire = encode([b"before\r\n.\r\nafter\r\n"])
    assert wire == b"before\r\n..\r\nafter\r\n.\r\n"
