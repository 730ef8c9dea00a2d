"""The status page's parts without a browser: ``[status]`` at load, the credentials
check, the bounded memory of recent events, the queue's shape by deferral
reason, and the HTML's escaping of what came from mail.  The page in a real
browser against a real daemon: tests/test_status_browser.py."""

from __future__ import annotations

import base64

import pytest

from mta.config import ConfigError, StatusConfig, config_from_dict
from mta.daemon.status import (
    MAX_RECENT,
    MAX_TLS_DESTINATIONS,
    StatusRecorder,
    authorized,
    snapshot,
)
from mta.daemon.statuspage import render
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from mta.queue.shape import NOT_TRIED, deferral_reasons, summary
from tests.harness import make_raw_config

SECRET = "0123456789abcdefXYZ"


@pytest.fixture
def raw(tmp_path):
    return make_raw_config(tmp_path, tls=False)


def status_config(raw, tmp_path, **table) -> StatusConfig:
    return config_from_dict({**raw, "status": table}, tmp_path).status


def test_off_unless_an_endpoint_is_given_and_a_bare_port_is_loopback(raw, tmp_path):
    assert config_from_dict(raw, tmp_path).status.endpoint is None
    cfg = status_config(raw, tmp_path, endpoint="8026")
    assert (cfg.endpoint, cfg.local) == ("tcp:8026:interface=127.0.0.1", True)
    assert status_config(raw, tmp_path, endpoint="[::1]:8026").local
    assert status_config(raw, tmp_path, endpoint="unix:/run/mta/status.sock").local


@pytest.mark.parametrize("endpoint", ["tcp:8026", "0.0.0.0:8026", "192.0.2.1:8026", "*:8026",
                                      "tcp:8026:interface=0.0.0.0"])
def test_off_loopback_needs_a_token_or_a_password(raw, tmp_path, endpoint):
    with pytest.raises(ConfigError) as e:
        status_config(raw, tmp_path, endpoint=endpoint)
    assert str(e.value) == ("status.endpoint: is not loopback: set status.token or "
                            "status.password (the page shows addresses and replies)")
    assert not status_config(raw, tmp_path, endpoint=endpoint, token=SECRET).local
    assert status_config(raw, tmp_path, endpoint=endpoint, password=SECRET).password == SECRET


@pytest.mark.parametrize(("table", "message"), [
    ({"token": "short"}, "status.token: must be at least 16 printable ASCII characters"),
    ({"password": "has a space inside it"}, "status.password: must be at least 16"),
    ({"user": "a:b", "password": SECRET}, "status.user: must be printable ASCII"),
    ({"endpoint": "nonsense:x"}, "status.endpoint: bad endpoint description"),
    ({"secret": SECRET}, "status.secret: unknown key"),
])
def test_bad_settings_are_refused_at_load(raw, tmp_path, table, message):
    with pytest.raises(ConfigError) as e:
        status_config(raw, tmp_path, **{"endpoint": "8026", **table})
    assert str(e.value).startswith(message)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_credentials():
    open_page = StatusConfig(endpoint="tcp:1:interface=127.0.0.1")
    assert authorized(open_page, None)
    both = StatusConfig(endpoint="tcp:1", local=False, token=SECRET, user="admin",
                        password=SECRET + "p")
    assert authorized(both, f"Bearer {SECRET}".encode())
    assert authorized(both, f"bearer   {SECRET} ".encode())  # the scheme is case-insensitive
    assert authorized(both, basic("admin", SECRET + "p"))
    for header in (None, b"", f"Bearer {SECRET}x".encode(), b"Bearer", basic("root", SECRET + "p"),
                   basic("admin", SECRET), b"Basic !!notbase64", b"Basic " + base64.b64encode(b"x"),
                   f"Digest {SECRET}".encode()):
        assert not authorized(both, header), header
    token_only = StatusConfig(endpoint="tcp:1", local=False, token=SECRET)
    assert not authorized(token_only, basic("status", SECRET))  # no password configured


def delivery(outcome: str, n: int, destination: str = "remote:example.net", **fields) -> dict:
    return {"event": "delivery", "outcome": outcome, "queue_id": f"q{n}",
            "recipient": f"r{n}@example.net", "destination": destination,
            "reply": f"reply {n}", **fields}


def test_the_recorder_keeps_the_newest_within_its_bounds():
    now = [1_000_000.0]
    recorder = StatusRecorder(lambda: now[0])
    for n in range(MAX_RECENT + 10):
        recorder.observe_event(delivery("failed", n))
        recorder.observe_event(delivery("delivered", n, tls="TLSv1.3 X", tls_verified=n % 2 == 0))
    assert len(recorder.failures) == len(recorder.deliveries) == MAX_RECENT
    assert recorder.failures[0].queue_id == f"q{MAX_RECENT + 9}"  # newest first
    assert recorder.failures[0].reply == f"reply {MAX_RECENT + 9}"
    count = recorder.tls["remote:example.net"]
    assert (count.verified, count.encrypted, count.clear) == (30, 30, 0)
    recorder.observe_event(delivery("delivered", 0, destination="remote:clear.test", tls=""))
    assert recorder.tls["remote:clear.test"].clear == 1
    assert "local" not in recorder.tls
    recorder.observe_event(delivery("delivered", 0, destination="local"))
    assert "local" not in recorder.tls  # TLS is about remote deliveries only
    for n in range(MAX_TLS_DESTINATIONS):
        recorder.observe_event(delivery("delivered", n, destination=f"remote:d{n}.test"))
    assert len(recorder.tls) == MAX_TLS_DESTINATIONS
    assert "remote:example.net" not in recorder.tls  # the least recently delivered to went
    # Fields of the wrong type are left out, never raised.
    recorder.observe_event({"event": "delivery", "outcome": "failed", "destination": 5,
                            "reply": ["x"], "queue_id": None})
    assert (recorder.failures[0].destination, recorder.failures[0].reply) == ("", "")
    assert recorder.errors == 0


def test_throughput_is_per_minute_over_the_last_hour():
    now = [600_000.0]  # a minute boundary
    recorder = StatusRecorder(lambda: now[0])
    recorder.observe_event({"event": "queued", "queue_id": "a"})
    recorder.observe_event(delivery("deferred", 1))
    now[0] += 61
    recorder.observe_event({"event": "queued", "queue_id": "b"})
    recorder.observe_event({"event": "queued", "queue_id": "c"})
    recorder.observe_event(delivery("delivered", 2))
    recorder.observe_event({"event": "expired", "queue_id": "a", "recipient": "x@y"})
    hour = recorder.throughput.last_hour(now[0])
    assert len(hour) == 60 and hour[-1] == (600_060.0, [2, 1, 0, 1])
    assert hour[-2] == (600_000.0, [1, 0, 1, 0])
    assert recorder.failures[0].outcome == "expired"
    now[0] += 59 * 60  # the first minute has just left the hour
    hour = recorder.throughput.last_hour(now[0])
    assert [sum(c) for _, c in hour].count(0) == 59 and hour[0][1] == [2, 1, 0, 1]
    now[0] += 60
    assert all(c == [0, 0, 0, 0] for _, c in recorder.throughput.last_hour(now[0]))


def envelope(queue_id: str, created: float, *replies: str, sender: str = "a@example.org"):
    recipients = [Recipient(f"u{i}@dest{i % 2}.test", RecipientKind.REMOTE, f"u{i}@dest{i % 2}.test",
                            state=RecipientState.DEFERRED if reply else RecipientState.PENDING,
                            last_reply=reply) for i, reply in enumerate(replies)]
    return Envelope(id=queue_id, sender=sender, recipients=recipients, created=created)


def test_the_queue_by_deferral_reason():
    now = 100_000.0
    envs = [envelope("a", now - 60, "451 4.4.1  connection\n refused", ""),
            envelope("b", now - 3600, "451 4.4.1 connection refused"),
            envelope("c", now - 30, "")]
    assert deferral_reasons(envs[0]) == ["451 4.4.1 connection refused", NOT_TRIED]
    rows = summary(envs, now, deferral_reasons)
    assert rows[0] == ("TOTAL", 3, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    # Equal totals: by name.
    assert rows[1] == (NOT_TRIED, 2, [2, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert rows[2] == ("451 4.4.1 connection refused", 2, [1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert deferral_reasons(envelope("d", now, "x" * 500)) == ["x" * 120]


class Queue:
    def __init__(self, envelopes):
        self.envelopes = {e.id: e for e in envelopes}

    def ids(self):
        return sorted(self.envelopes)

    def load(self, queue_id):
        if queue_id == "gone":
            raise FileNotFoundError(queue_id)
        if queue_id == "torn":
            raise ValueError("malformed envelope")
        return self.envelopes[queue_id]


def test_every_value_from_mail_is_escaped():
    hostile = '<script>alert("x")</script>'
    now = 100_000.0
    env = envelope("a", now - 60, f"451 4.4.1 {hostile}", sender=f'"{hostile}"@evil.test')
    env.recipients[0].original = f'"{hostile}"@dest0.test'
    queue = Queue([env])
    queue.envelopes["torn"] = queue.envelopes["gone"] = env
    recorder = StatusRecorder(lambda: now)
    recorder.observe_event(delivery("failed", 1, destination=f"remote:{hostile}",
                                    recipient=hostile, reply=f"550 5.1.1 {hostile}",
                                    remote_mta=hostile, tls=hostile, queue_id=hostile))
    recorder.observe_event(delivery("delivered", 2, destination=f"remote:{hostile}",
                                    tls=hostile))
    page = render(snapshot(f"mx{hostile}", queue, recorder, now))
    assert "<script" not in page and 'alert("x")' not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 10
    assert "1 envelopes could not be read." in page  # the torn one; the gone one is skipped
    assert 'data-row="remote:&lt;script&gt;' in page  # attributes too


def test_held_messages_from_the_runner_and_past_the_scan(monkeypatch):
    import mta.daemon.status as status

    now = 100_000.0
    monkeypatch.setattr(status, "MAX_SCAN", 2)
    held_old = envelope("a", now - 7200, "", sender="")
    held_old.hold = 'milter: <b>"spam"</b>'
    other = envelope("b", now - 60, "")
    late = envelope("c", now - 30, "")  # past the scan: known from the runner's held set
    late.hold = "tagged"
    queue = Queue([held_old, other, late])
    snap = snapshot("mx", queue, StatusRecorder(lambda: now), now, {"c", "gone"})
    assert [e.id for e in snap.held] == ["a", "c"] and snap.held_total == 2  # "gone": released
    assert deferral_reasons(held_old) == ['held: milter: <b>"spam"</b>']
    page = render(snap)
    section = page[page.index('<section id="held">'):]
    section = section[:section.index("</section>")]
    assert "<p>2 held.</p>" in section
    assert ('<tr data-row="a"><td><code>a</code></td><td>&lt;&gt;</td>'
            '<td>u0@dest0.test</td><td class="reply">milter: &lt;b&gt;&quot;spam&quot;'
            '&lt;/b&gt;</td><td class="n">2h 0m</td></tr>') in section
    assert '<tr data-row="c">' in section and '<td class="n">30s</td>' in section
    empty = render(snapshot("mx", Queue([other]), StatusRecorder(lambda: now), now))
    assert "<p>No message is held.</p>" in empty
