"""The DATA reader on its own: terminator, unstuffing, errors, and any chunking.

The property tests feed the same stream cut at random places and check the
stored bytes and the verdict do not depend on where the cuts fall.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.mail.reader import DataError, DataReader


def read(stream: bytes, cuts: list[int] | None = None, max_size: int = 10**6):
    stored: list[bytes] = []
    headers_seen: list[list[bytes]] = []

    def on_headers(lines):
        headers_seen.append(list(lines))
        return lines

    reader = DataReader(stored.append, on_headers, max_size=max_size)
    pieces = []
    last = 0
    for c in sorted(set(cuts or [])):
        if 0 < c < len(stream):
            pieces.append(stream[last:c])
            last = c
    pieces.append(stream[last:])
    rest = None
    for i, piece in enumerate(pieces):
        rest = reader.feed(piece)
        if rest is not None:
            rest += b"".join(pieces[i + 1 :])
            break
    return b"".join(stored), reader, rest, headers_seen


def test_simple_message_and_leftover():
    stored, reader, rest, headers = read(b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert stored == b"Subject: a\r\n\r\nbody\r\n"
    assert rest == b"QUIT\r\n"
    assert reader.error is None
    assert headers == [[b"Subject: a"]]


def test_empty_message():
    stored, reader, rest, _ = read(b".\r\n")
    assert stored == b"" and rest == b"" and reader.error is None


def test_dot_unstuffing():
    stored, _, _, _ = read(b"A: b\r\n\r\n..one\r\n...two\r\n.\r\n")
    assert stored == b"A: b\r\n\r\n.one\r\n..two\r\n"


def test_body_without_headers():
    stored, _, _, headers = read(b"just text\r\nmore\r\n.\r\n")
    assert stored == b"just text\r\nmore\r\n"
    assert headers == [[]]


def test_folded_header_kept():
    stored, _, _, headers = read(b"Subject: a\r\n b\r\nX: y\r\n\r\nz\r\n.\r\n")
    assert headers == [[b"Subject: a", b" b", b"X: y"]]
    assert stored.startswith(b"Subject: a\r\n b\r\nX: y\r\n\r\n")


def test_bare_lf_and_cr_flagged():
    for bad in (b"a\nb", b"a\rb", b"a\r", b"\nz"):
        _, reader, rest, _ = read(b"S: x\r\n\r\n" + bad + b"\r\n.\r\n")
        assert reader.error is DataError.BARE_LINE_ENDING, bad
        assert rest == b""


def test_line_too_long_flagged_and_stream_still_ends():
    _, reader, rest, _ = read(b"S: x\r\n\r\n" + b"a" * 999 + b"\r\nok\r\n.\r\nNOOP\r\n")
    assert reader.error is DataError.LINE_TOO_LONG
    assert rest == b"NOOP\r\n"


def test_overlong_line_ending_in_dot_is_not_a_terminator():
    stream = b"S: x\r\n\r\n" + b"a" * 5000 + b".\r\nstill body\r\n.\r\nNOOP\r\n"
    _, reader, rest, _ = read(stream, cuts=[100, 2000, 4000])
    assert reader.error is DataError.LINE_TOO_LONG
    assert rest == b"NOOP\r\n"


def test_size_limit():
    _, reader, rest, _ = read(b"S: x\r\n\r\n" + b"a" * 100 + b"\r\n.\r\n", max_size=50)
    assert reader.error is DataError.TOO_BIG and rest == b""


def test_eight_bit_detected():
    _, reader, _, _ = read("S: x\r\n\r\nñ\r\n.\r\n".encode())
    assert reader.eight_bit


line = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b".x", b"", b"Subject: x", b" folded"]),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(line, max_size=30), cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_valid_message_stored_byte_exact_whatever_the_chunking(lines, cuts):
    body = b"".join(x + b"\r\n" for x in lines)
    stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    stored, reader, rest, _ = read(stuffed + b".\r\nNEXT\r\n", cuts)
    assert reader.error is None
    assert rest == b"NEXT\r\n"
    assert stored == body


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 500), max_size=10))
def test_random_bytes_same_verdict_whatever_the_chunking(data, cuts):
    stream = data + b"\r\n.\r\n"
    whole = read(stream)
    cut = read(stream, cuts)
    assert whole[0] == cut[0]
    assert whole[1].error == cut[1].error
    assert whole[2] == cut[2]
    # The terminator is always found: the reader never runs past CRLF.CRLF.
    assert cut[2] is not None
