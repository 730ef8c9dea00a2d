"""mta.mail.headers.fold_header: the one helper every header the MTA writes goes through."""

from __future__ import annotations

from mta.mail.headers import MAX_LINE, TRUNCATED, fold_header, fold_header_bytes


def octets(text: str) -> list[int]:
    return [len(line.encode("utf-8")) for line in text.split("\r\n")]


def test_short_field_is_left_alone():
    assert fold_header("Subject: hello") == "Subject: hello"


def test_long_field_is_folded_at_spaces_within_78_and_unfolds_to_itself():
    field = "Received-SPF: pass (" + " ".join(f"word{i}" for i in range(60)) + ") helo=a.test"
    folded = fold_header(field)
    assert max(octets(folded)) <= 78
    assert all(line.startswith(" ") for line in folded.split("\r\n")[1:])
    assert folded.replace("\r\n", "") == field


def test_already_folded_lines_are_kept_and_only_long_ones_folded():
    field = "Received: from a.test (b.test [192.0.2.1])\r\n\tby mx.test with ESMTP id X;\r\n\t" + "w " * 60
    folded = fold_header(field)
    assert folded.startswith("Received: from a.test (b.test [192.0.2.1])\r\n\tby mx.test with ESMTP id X;\r\n\t")
    assert max(octets(folded)) <= 78 and folded.replace("\r\n", "") == field.replace("\r\n", "")


def test_a_word_too_long_for_any_line_is_cut_with_a_marker():
    field = "Received-SPF: none helo=" + "x" * 2040 + " receiver=mx.test"
    folded = fold_header(field)
    lines = folded.split("\r\n")
    assert max(octets(folded)) == MAX_LINE
    assert lines[1].startswith(" helo=xxx") and lines[1].endswith(TRUNCATED)
    assert lines[-1] == " receiver=mx.test"  # what follows is kept


def test_cutting_never_splits_a_utf8_sequence():
    folded = fold_header("X-Test: " + "é" * 1000)
    assert max(octets(folded)) <= MAX_LINE
    folded.encode("utf-8").decode("utf-8")  # still valid UTF-8
    assert folded.endswith("é" + TRUNCATED)


def test_double_spaces_never_give_a_whitespace_only_line():
    field = "X-Test: " + "abcdefghij " * 7 + "  " + "k" * 70
    for line in fold_header(field).split("\r\n"):
        assert line.strip()


def test_bytes_variant():
    field = b"DKIM-Signature: v=1; " + b"h=a : b; " * 20
    folded = fold_header_bytes(field)
    assert max(len(line) for line in folded.split(b"\r\n")) <= 78
    assert folded.replace(b"\r\n", b"") == field
