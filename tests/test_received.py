"""The Received header we prepend (mta.policy.received)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from mta.policy import received as received_module
from mta.policy.received import TraceInfo, received_header


def trace(**changes):
    info = dict(helo="client.test", client_ip="192.0.2.1", client_name="", hostname="mx.example.test",
                queue_id="QID", esmtp=True, tls_version="", tls_cipher="", authenticated=False,
                smtputf8=False, recipients=("bob@example.test",))
    info.update(changes)
    return TraceInfo(**info)


def test_the_header_names_client_us_protocol_id_recipient_and_date():
    when = datetime(2026, 11, 28, 3, 4, 5, tzinfo=UTC)
    assert received_header(trace(when=when)) == (
        b"Received: from client.test ([192.0.2.1])\r\n"
        b"\tby mx.example.test with ESMTP id QID\r\n"
        b"\tfor <bob@example.test>; Sat, 28 Nov 2026 03:04:05 +0000")
    two = received_header(trace(when=when, recipients=("a@x.test", "b@x.test")), queue_id="Q2")
    assert two.endswith(b"with ESMTP id Q2;\r\n\tSat, 28 Nov 2026 03:04:05 +0000")  # no "for": Bcc stays hidden


def test_the_date_of_now_is_made_once_per_second(monkeypatch):
    """Without a given time the header carries now, to the second (RFC 5322 §3.3);
    the text is made once per second and shared by the messages of that second."""
    now = [1795835045.25]
    monkeypatch.setattr(received_module.time, "time", lambda: now[0])
    monkeypatch.setattr(received_module, "_last_stamp", (-1, ""))
    made = []
    real_format = received_module.format_datetime
    monkeypatch.setattr(received_module, "format_datetime", lambda dt: made.append(dt) or real_format(dt))

    def stamp():
        return received_header(trace()).rsplit(b"; ", 1)[1].decode()

    first = stamp()
    now[0] += 0.5
    assert stamp() == first and len(made) == 1
    assert parsedate_to_datetime(first) == datetime.fromtimestamp(1795835045, UTC)
    now[0] += 0.5  # the next second
    assert parsedate_to_datetime(stamp()) == datetime.fromtimestamp(1795835046, UTC) and len(made) == 2


def test_the_date_of_now_is_now():
    before = int(time.time())
    got = parsedate_to_datetime(received_header(trace()).rsplit(b"; ", 1)[1].decode()).timestamp()
    assert before <= got <= time.time()
