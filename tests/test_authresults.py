"""Authentication-Results (mta.policy.authresults): our one field, and forged ones removed."""

from __future__ import annotations

import authres
import authres.dkim_b
import authres.dmarc
import pytest

from mta.policy.authresults import authentication_results, authserv_id_of, strip_forged
from mta.policy.dkim import DKIMResult
from mta.policy.dmarc import DMARCResult
from mta.policy.spf import SPFResult

ID = "mx.example.test"


def parse(field: bytes) -> authres.core.AuthenticationResultsHeader:
    """Unfold and parse with authres, DKIM header.b and DMARC included.

    authres's parser drops result comments and a quoted property that follows
    another property, so those are checked on the text (:func:`unfolded`).
    """
    unfolded = field.decode("utf-8").replace("\r\n", "")
    context = authres.FeatureContext(authres.dkim_b, authres.dmarc)
    return context.parse(unfolded)


def unfolded(field: bytes) -> str:
    return field.decode("utf-8").replace("\r\n", "")


def test_one_field_with_every_method():
    field = authentication_results(
        ID,
        spf=SPFResult("pass", "", "example.com", "mailfrom"),
        sender="alice@example.com", helo="mail.example.com",
        dkim=[DKIMResult("pass", "example.com", "rsa1", "AbC+/12=", "", "rsa-sha256"),
              DKIMResult("fail", "example.com", "ed1", "zzzzzzzz", "body hash did not verify",
                         "ed25519-sha256")],
        dmarc=DMARCResult("pass", "reject", "none", "example.com", "aligned"),
    )
    assert field.startswith(b"Authentication-Results: mx.example.test; spf=pass")
    lines = field.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    header = parse(field)
    assert header.authserv_id == ID
    spf, good, bad, dmarc = header.results
    assert (spf.method, spf.result, spf.smtp_mailfrom) == ("spf", "pass", "alice@example.com")
    assert (good.method, good.result, good.header_d) == ("dkim", "pass", "example.com")
    assert (bad.method, bad.result, bad.header_d) == ("dkim", "fail", "example.com")
    assert (dmarc.method, dmarc.result, dmarc.header_from) == ("dmarc", "pass", "example.com")
    assert unfolded(field) == (
        "Authentication-Results: mx.example.test;"
        " spf=pass smtp.mailfrom=alice@example.com;"
        ' dkim=pass header.d=example.com header.b="AbC+/12=" header.s=rsa1 header.a=rsa-sha256;'
        " dkim=fail (body hash did not verify) header.d=example.com header.b=zzzzzzzz"
        " header.s=ed1 header.a=ed25519-sha256;"
        " dmarc=pass (P=REJECT DIS=NONE) header.from=example.com"
    )


def test_null_sender_reports_helo_and_unsigned_mail_reports_dkim_none():
    field = authentication_results(
        ID, spf=SPFResult("none", "", "mail.example.com", "helo"), sender="",
        helo="mail.example.com", dkim=[],
        dmarc=DMARCResult("permerror", reason="several From fields"))
    results = parse(field).results
    assert [(r.method, r.result) for r in results] == [
        ("spf", "none"), ("dkim", "none"), ("dmarc", "permerror")]
    assert results[0].smtp_helo == "mail.example.com"
    assert "dmarc=permerror (several From fields)" in unfolded(field)


def test_nothing_evaluated_is_none():
    assert authentication_results(ID) == b"Authentication-Results: mx.example.test; none"


def test_hostile_reasons_cannot_break_the_field():
    field = authentication_results(
        ID, dkim=[DKIMResult("neutral", "example.com", "s", "", "bad (nested) \\ é\r\nX: y")])
    assert field == (b"Authentication-Results: mx.example.test; dkim=neutral (bad nested X: y)"
                     b"\r\n header.d=example.com header.s=s")
    assert [r.result for r in parse(field).results] == ["neutral"]


# --- removing forged fields --------------------------------------------------------


def test_strip_forged_removes_our_id_and_keeps_the_rest():
    headers = [
        b"Received: from a by b;",
        b"\tMon, 1 Jan 2026 00:00:00 +0000",
        b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test",
        b"Authentication-Results: MX.Example.Test; spf=pass",
        b"authentication-results : mx.example.test.; dmarc=pass",
        b"Authentication-Results: (forged) mx.example.test 1; dkim=pass",
        b"Authentication-Results:",
        b"  mx.example.test;",
        b"\tspf=pass smtp.mailfrom=ceo@bank.test",
        b'Authentication-Results: "mx.example.test"; dkim=pass',
        b"Authentication-Results: other.example.net; spf=fail",
        b"Authentication-Results: mx.example.test.evil.test; spf=pass",
        b"Authentication-Results: evil-mx.example.test; spf=pass",
        b"X-Authentication-Results: mx.example.test; spf=pass",
        b"Subject: hello",
        b" world",
    ]
    assert strip_forged(headers, "MX.example.test") == [
        b"Received: from a by b;",
        b"\tMon, 1 Jan 2026 00:00:00 +0000",
        b"Authentication-Results: other.example.net; spf=fail",
        b"Authentication-Results: mx.example.test.evil.test; spf=pass",
        b"Authentication-Results: evil-mx.example.test; spf=pass",
        b"X-Authentication-Results: mx.example.test; spf=pass",
        b"Subject: hello",
        b" world",
    ]


def test_strip_forged_with_nothing_to_remove():
    headers = [b"From: a@example.com", b"Subject: x"]
    assert strip_forged(headers, ID) == headers
    assert strip_forged([], ID) == []


def test_our_own_field_is_recognised_as_ours():
    ours = authentication_results(ID, dkim=[]).split(b"\r\n")
    assert strip_forged(ours + [b"Subject: x"], ID) == [b"Subject: x"]


@pytest.mark.parametrize("value, expected", [
    (" mx.example.test; spf=pass", "mx.example.test"),
    (" (c (nested) \\) still) MX.example.test 1; none", "mx.example.test"),
    (' "mx.example.test" ; none', "mx.example.test"),
    ("mx.example.test", "mx.example.test"),
    ("  ", ""),
    (" (unclosed comment mx.example.test", ""),
])
def test_authserv_id_of(value, expected):
    assert authserv_id_of(value) == expected
