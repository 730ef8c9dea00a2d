"""The status page in a real browser: Debian's chromium, headless, against a real daemon.

One ``twistd -n mta`` for the module (tests/daemon.py) with a status page on
loopback (basic-auth password and bearer token), three real destinations
reached by address literal (no DNS): Postfix's smtp-sink on 127.0.0.1, which
takes everything; nothing on 127.0.0.2 (a dead destination: the mail waits);
and smtp-sink on 127.0.0.3 refusing every RCPT with a reply that carries
markup; and a TLS peer on 127.0.0.4 (tests/sink.py in a process of its own,
STARTTLS with a trustme certificate for that address, whose CA the daemon
trusts through SSL_CERT_FILE), the smarthost of two route-table domains: one
at ``tls = "verify"`` and one at ``encrypt``.  The messages' sender is a quoted local part holding a ``<script>``
element.  The quarantining check of tests/test_hold.py, added by configuration,
holds one message for a local mailbox (issue 17's hold queue).  chromium (tests/chromium.py) loads the page with ``--dump-dom``, over
the DevTools protocol with script execution disabled, and with ``--screenshot``;
these tests are blocking and run no reactor code.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests import chromium
from tests.daemon import Daemon, free_port
from tests.harness import PASSWORD, write_domain
from tests.test_hold import HOLD_CHECKS

pytestmark = pytest.mark.slow

TOKEN = "status-token-0123456789abcdef"
STATUS_PASSWORD = "status-pass-0123456789abcdef"
HOSTILE_SENDER = '"<script>alert(1)</script>"@evil.test'
REFUSAL = "550 5.1.1 <script>alert(2)</script> no such user here"

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
relay_networks = ["127.0.0.0/8"]

[listeners.mx]
endpoint = "tcp:{port}:interface=127.0.0.1"
kind = "mx"

[status]
endpoint = "127.0.0.1:{status_port}"
token = "{token}"
user = "admin"
password = "{password}"

[spf]
enabled = false

[dns]
servers = ["127.0.0.1:9"]
timeout = 1

[dkim]
verify = false

[dmarc]
enabled = false

[delivery]
mx_port = {sink_port}
retry_schedule = [3600]
connect_timeout = 2

[delivery.route."verified.test"]
smarthost = "[127.0.0.4]:{tls_port}"
tls = "verify"

[delivery.route."encrypted.test"]
smarthost = "[127.0.0.4]:{tls_port}"
tls = "encrypt"
"""


class Page(HTMLParser):
    """The DOM chromium dumped: the text of each section's table rows, by section id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.series: dict[str, int] = {}
        self.scripts = 0
        self._section: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "section":
            self._section = a.get("id")
            self.rows[self._section] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "figure" and "data-series" in a:
            self.series[a["data-series"]] = int(a["data-total"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._section is not None:
                self.rows[self._section].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def row(self, section: str, first: str) -> list[str]:
        return next(r for r in self.rows[section] if r and r[0] == first)


def fetch(port: int, auth: str | None) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/")
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def start_sink(address: str, port: int, *refuse: str) -> subprocess.Popen:
    user = ["-u", "root"] if os.geteuid() == 0 else []  # as root smtp-sink insists on -u
    options = ["-f", "rcpt", "-B", REFUSAL] if refuse else []
    proc = subprocess.Popen(["smtp-sink", *user, *options, f"{address}:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, "smtp-sink exited"
        try:
            with smtplib.SMTP(address, port, timeout=2):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"smtp-sink on {address}:{port} did not start")


class TLSSink:
    """tests/sink.py in a process of its own (``python -m tests.sink``), offering
    STARTTLS with a trustme certificate for ``address``; ``ca_file`` is its CA."""

    def __init__(self, address: str, port: int, ca_file: Path) -> None:
        self.ca_file = ca_file
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sink", "--listen", f"{address}:{port}",
             "--tls-ca", str(ca_file)],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while "ready" not in self.lines:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tests.sink did not start: {self.lines}")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def messages(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)


def send(port: int, recipient: str, subject: str, sender: str = HOSTILE_SENDER) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        code, _ = s.docmd(f"MAIL FROM:<{sender}>")
        assert code == 250
        assert s.docmd(f"RCPT TO:<{recipient}>")[0] == 250
        code, text = s.data(f"Subject: {subject}\r\n\r\nstatus page test\r\n".encode())
        assert code == 250
        return text.decode().rsplit(" ", 1)[-1]  # "250 2.0.0 Ok: queued as ID"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    port, status_port, sink_port, tls_port = free_port(), free_port(), free_port(), free_port()
    write_domain(root / "domains", "example.test", {"alice": PASSWORD})
    config = root / "mta.toml"
    config.write_text(CONFIG.format(port=port, status_port=status_port, sink_port=sink_port,
                                    tls_port=tls_port, token=TOKEN, password=STATUS_PASSWORD)
                      + HOLD_CHECKS)
    sinks = [start_sink("127.0.0.1", sink_port), start_sink("127.0.0.3", sink_port, "rcpt")]
    tls_sink = TLSSink("127.0.0.4", tls_port, root / "ca.pem")
    daemon = Daemon(root, config, port, env={"SSL_CERT_FILE": str(tls_sink.ca_file)})
    try:
        daemon.start()
        for i in range(2):
            send(port, f"bob{i}@[127.0.0.1]", f"delivered {i}")
        for i in range(3):
            send(port, f"carol{i}@[127.0.0.2]", f"dead {i}")
        send(port, "dave@[127.0.0.3]", "refused")
        held_id = send(port, "alice@example.test", "[quarantine] held")
        # (tests/sink.py parses MAIL FROM by spaces: a plain sender for it)
        send(port, "erin@verified.test", "over verified TLS", "ops@example.test")
        send(port, "frank@encrypted.test", "over TLS, not verified", "ops@example.test")
        bearer = f"Bearer {TOKEN}"
        deadline = time.monotonic() + 30
        while True:  # until every attempt has been made (the page's own counts)
            page = Page(fetch(status_port, bearer)[2])
            done = (len(page.rows.get("deliveries", [])) >= 5
                    and len(page.rows.get("failures", [])) >= 2
                    and page.series.get("deferred", 0) >= 3
                    and page.series.get("received", 0) >= 9)
            if done:
                break
            assert time.monotonic() < deadline, f"deliveries not made:\n{daemon.read_log()}"
            time.sleep(0.2)
        yield {"root": root, "daemon": daemon, "status_port": status_port, "held_id": held_id,
               "tls_sink": tls_sink,
               "url": f"http://admin:{STATUS_PASSWORD}@127.0.0.1:{status_port}/"}
    finally:
        daemon.kill()
        tls_sink.stop()
        for sink in sinks:
            sink.terminate()
            sink.wait(10)


def test_the_dom_shows_the_queue_deliveries_failures_and_tls(world):
    result = chromium.run("--dump-dom", world["url"])
    page = Page(result.stdout)
    assert page.rows, result.stdout[:2000] + result.stderr[-2000:]
    # The queue as qshape: the dead destination waits with its 3 messages (all under
    # 5 minutes old), beside the bounce for the refused recipient (to evil.test) and
    # the held message (local).
    assert page.row("queue-destinations", "[127.0.0.2]")[1:3] == ["3", "3"]
    assert page.row("queue-destinations", "local")[1] == "1"
    assert page.row("queue-destinations", "TOTAL")[1] == "5"
    reasons = {r[0]: r[1] for r in page.rows["queue-reasons"][1:]}
    refused = [reason for reason in reasons if "connect to 127.0.0.2 failed" in reason]
    # Dead-destination feedback (mta.queue.destinations): the first attempt's
    # refusal marks [127.0.0.2] down, and the messages after it are suspended
    # without a connection attempt or an envelope rewrite (so without a
    # recorded reason of their own): 1 message (up to 3 in a race) has it.
    assert len(refused) == 1 and reasons[refused[0]] in ("1", "2", "3"), reasons
    assert reasons["held: tagged by the test check"] == "1"
    # The hold queue: the quarantined message with its sender, recipient, reason and age.
    assert page.rows["held"][0] == ["queue id", "sender", "recipients", "held because", "age"]
    (held,) = page.rows["held"][1:]
    assert held[:4] == [world["held_id"], HOSTILE_SENDER, "alice@example.test",
                        "tagged by the test check"]
    assert re.fullmatch(r"\d+s", held[4]), held
    # Recent deliveries: the two to the live sink (and the refused one's bounce is not one).
    delivered = [r for r in page.rows["deliveries"][1:] if r[4] == "delivered"]
    assert sorted(r[2] for r in delivered)[:2] == ["bob0@[127.0.0.1]", "bob1@[127.0.0.1]"]
    assert all(r[3] == "remote:[127.0.0.1]" and r[7].startswith("250") for r in delivered
               if r[2].startswith("bob"))
    # The failure with the peer's reply, markup shown as text, not run.
    failure = next(r for r in page.rows["failures"][1:] if r[2] == "dave@[127.0.0.3]")
    assert failure[4] == "failed"
    assert failure[7] == REFUSAL
    # TLS per destination: smtp-sink offers no STARTTLS, so both went in clear.
    assert page.row("tls", "remote:[127.0.0.1]")[1:4] == ["0", "0", "2"]
    assert page.row("tls", "remote:[127.0.0.1]")[4] == "none"
    # Throughput of the last hour: 9 received (one held), 4 delivered, the 3 deferrals, 1 bounced.
    assert page.series["received"] == 9  # (the bounce is a dsn event, not mail received)
    assert page.series["delivered"] == 4
    assert page.series["deferred"] >= 3
    assert page.series["bounced"] == 1
    # The hostile sender is text on the page; no script element was created from it.
    assert page.scripts == 0
    assert '"<script>alert(1)</script>"@evil.test' in result.stdout.replace("&lt;", "<") \
        .replace("&gt;", ">").replace("&quot;", '"')


def test_the_page_works_with_javascript_disabled(world):
    with_js = Page(chromium.run("--dump-dom", world["url"]).stdout)
    without = Page(chromium.dom_without_javascript(
        world["url"].replace(f"admin:{STATUS_PASSWORD}@", ""),
        headers={"Authorization": f"Bearer {TOKEN}"}))
    assert without.row("queue-destinations", "[127.0.0.2]")[1] == "3"
    assert without.series == with_js.series
    assert [r[:3] for r in without.rows["failures"]] == [r[:3] for r in with_js.rows["failures"]]


def png_distinct_rows(data: bytes) -> tuple[int, int, int]:
    """A PNG's width, height and number of distinct scanlines (as stored, filtered):
    a blank page's rows are all alike, a page with text and tables has hundreds."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)  # 8-bit RGB or RGBA
    stride = 1 + width * (3 if colour == 2 else 4)
    raw = zlib.decompress(idat)
    assert len(raw) == stride * height
    return width, height, len({raw[i:i + stride] for i in range(0, len(raw), stride)})


def test_the_screenshot_is_a_non_blank_png(world, tmp_path):
    shot, blank = tmp_path / "status.png", tmp_path / "blank.png"
    result = chromium.run(f"--screenshot={shot}", world["url"])
    assert shot.exists(), result.stderr[-2000:]
    width, height, rows = png_distinct_rows(shot.read_bytes())
    assert (width, height) == (1280, 2400)
    # A blank white page of the same size, by the same measure, for comparison.
    chromium.run(f"--screenshot={blank}", "data:text/html,<html><body></body></html>")
    assert png_distinct_rows(blank.read_bytes())[2] < 5
    assert rows > 300


def test_an_unauthenticated_request_gets_401(world):
    port = world["status_port"]
    status, headers, body = fetch(port, None)
    assert status == 401 and body == "authentication required\n"
    assert 'Basic realm="mta status"' in headers["WWW-Authenticate"]
    assert "Bearer" in headers["WWW-Authenticate"]
    wrong = base64.b64encode(b"admin:" + STATUS_PASSWORD.encode()[:-1] + b"x").decode()
    assert fetch(port, f"Basic {wrong}")[0] == 401
    assert fetch(port, f"Bearer {TOKEN[:-1]}")[0] == 401
    # The browser without credentials sees the refusal, not the page.
    dom = chromium.run("--dump-dom", f"http://127.0.0.1:{port}/").stdout
    assert "queue-destinations" not in dom and "@evil.test" not in dom
    # With the token: the page, with a policy that allows no script.
    status, headers, body = fetch(port, f"Bearer {TOKEN}")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "<script>" not in body and "&lt;script&gt;alert(1)" in body
    # Other paths: 404 (after the credentials).
    request = urllib.request.Request(f"http://127.0.0.1:{port}/x",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 404


def test_the_credentials_are_never_logged(world):
    log = world["daemon"].read_log()
    assert re.search(r"status page on http://127\.0\.0\.1:\d+/", log)
    assert TOKEN not in log and STATUS_PASSWORD not in log
    assert base64.b64encode(f"admin:{STATUS_PASSWORD}".encode()).decode() not in log


def test_the_dom_shows_tls_verified_and_encrypted_from_a_real_tls_peer(world):
    page = Page(chromium.run("--dump-dom", world["url"]).stdout)
    tls = {r[0]: r[1:] for r in page.rows["tls"][1:]}
    # Verified: the route's "verify", the trustme certificate for 127.0.0.4 checked
    # against the CA the daemon trusts; encrypted: the route's "encrypt", not checked.
    verified, encrypted = tls["remote:verified.test"], tls["remote:encrypted.test"]
    assert verified[:3] == ["1", "0", "0"], tls
    assert encrypted[:3] == ["0", "1", "0"], tls
    assert re.match(r"TLSv1\.[23] ", verified[3]) and re.match(r"TLSv1\.[23] ", encrypted[3])
    assert tls["remote:[127.0.0.1]"][:3] == ["0", "0", "2"]  # smtp-sink: clear
    rows = {r[2]: r for r in page.rows["deliveries"][1:]}
    assert rows["erin@verified.test"][6] == verified[3]
    assert rows["erin@verified.test"][5].startswith("127.0.0.4")
    # At the peer: both messages, each over TLS.
    got = {m["recipients"][0]: m for m in world["tls_sink"].messages()}
    assert set(got) == {"erin@verified.test", "frank@encrypted.test"}
    assert all(m["tls"] and m["tls_version"].startswith("TLSv1.") for m in got.values())
