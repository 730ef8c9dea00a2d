"""Two MTA nodes (two ``twistd -n mta`` processes, tests/nodes.py) sharing one
PostgreSQL directory and one real Redis for the abuse counters (issue 20), and one
node living through a Redis outage.

Each node has its own data_dir and queue; the users are in the shared
PostgreSQL directory and the counters in Redis, under one key prefix.  Clients
connect from their own loopback addresses (127.0.x.y) so that the tests' counts
do not mix; 127.0.0.1 is the address the daemon's start-up greeting check
comes from.

Blocking and subprocess-based like test_daemon.py: no reactor code runs here.
"""

from __future__ import annotations

import base64
import itertools
import json
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from mta.mail import replies as R
from tests import nodes
from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, RawClient, client_tls_context, shared_ca, write_domain
from tests.redisserver import RedisServer

pytestmark = pytest.mark.slow

_prefixes = itertools.count()

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
log_json = "events.json"
{metrics}

[listeners.mx]
endpoint = "tcp:{mx_port}:interface=127.0.0.1"
kind = "mx"

[listeners.submission]
endpoint = "tcp:{submission_port}:interface=127.0.0.1"
kind = "submission"

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[limits]
auth_failure_delay = 0
auth_block_failures = 10
auth_block_window = 600
auth_block_time = 600
connection_rate_per_ip = 4
messages_per_user_per_hour = 3

[counters]
backend = "redis"
port = {redis_port}
prefix = "{prefix}"
timeout = 0.5
retry_interval = 0.5
""" + QUIET_TAIL


class Node:
    def __init__(self, root: Path, redis_port: int, prefix: str, metrics: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        write_domain(root / "domains", "example.test", {"alice": PASSWORD, "bob": PASSWORD,
                                                        "carol": PASSWORD})
        cert = shared_ca().issue_cert("mx.example.test", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        cert.private_key_pem.write_to_path(str(root / "key.pem"))
        self.root = root
        self.mx_port, self.submission_port = free_port(), free_port()
        self.metrics_port = free_port() if metrics else None
        (root / "mta.toml").write_text(CONFIG.format(
            mx_port=self.mx_port, submission_port=self.submission_port, redis_port=redis_port,
            prefix=prefix, dead_port=free_port(),
            metrics=f'metrics = "127.0.0.1:{self.metrics_port}"' if metrics else ""))
        self.daemon = Daemon(root, root / "mta.toml", self.mx_port)

    def login(self, user: str, password: str, source: str) -> tuple[int, str]:
        """AUTH on the submission port from ``source``: (code, text) of its answer."""
        with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=10,
                          source_address=(source, 0)) as s:
            s.starttls(context=client_tls_context())
            s.ehlo()
            # One AUTH PLAIN (smtplib's login() would try LOGIN after a failed PLAIN).
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            code, text = s.docmd("AUTH", "PLAIN " + token)
            return code, text.decode()

    def submit(self, user: str, source: str) -> tuple[int, str]:
        """One message of ``user`` to itself: (code, text) of the refusal, or (250, "")."""
        with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=10,
                          source_address=(source, 0)) as s:
            s.starttls(context=client_tls_context())
            s.login(user, PASSWORD)
            try:
                s.sendmail(user, [user], b"Subject: counted\r\n\r\nhello\r\n")
            except smtplib.SMTPSenderRefused as e:
                return e.smtp_code, e.smtp_error.decode()
            return 250, ""

    def greeting(self, source: str) -> tuple[int, str]:
        client = RawClient(self.mx_port, source=source)
        try:
            return client.read_reply()
        finally:
            client.close()

    def events(self, name: str) -> list[dict]:
        path = self.root / "events.json"
        if not path.exists():
            return []
        found = []
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def metric(self, text: str) -> str | None:
        """The value of the metric line that starts with ``text``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(text + " "):
                    return line.split()[-1]
        return None

    def mailbox(self, user: str, domain: str = "example.test") -> int:
        new = self.root / "var" / "mail" / domain / user / "new"
        return len(list(new.iterdir())) if new.exists() else 0


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


LIMITS = """auth_block_failures = 10
auth_block_window = 600
auth_block_time = 600
connection_rate_per_ip = 4
messages_per_user_per_hour = 3
"""


class SharedNode(Node):
    """A node of tests/nodes.py seen through this module's clients."""

    def __init__(self, node: nodes.Node) -> None:  # not Node.__init__: tests/nodes.py made it
        self.root = node.root
        self.mx_port = node.ports["mx"]
        self.submission_port = node.ports["submission"]
        self.metrics_port = None
        self.daemon = node.daemon
        self.node = node


@pytest.fixture(scope="module")
def redis_nodes(postgres, redis_server, tmp_path_factory):
    """Two nodes on one PostgreSQL directory and one Redis (a prefix of their own)."""
    prefix = f"twonodes{next(_prefixes)}:"
    extra = f"""
[counters]
backend = "redis"
port = {redis_server.port}
prefix = "{prefix}"
timeout = 0.5
"""
    started = nodes.start_nodes(tmp_path_factory.mktemp("redis-nodes"), postgres,
                                extra_toml=extra, limits_toml=LIMITS)
    try:
        for user in ("alice", "bob", "carol"):
            added = started[0].mta("user", "add", nodes.DOMAIN, user, stdin=PASSWORD + "\n")
            assert added.returncode == 0, added.stderr
        yield [SharedNode(n) for n in started]
    finally:
        nodes.stop_nodes(started)
    for node in started:
        assert "Traceback" not in node.log()


def test_ten_failed_logins_over_both_nodes_block_the_account_on_both(redis_nodes):
    a, b = redis_nodes
    # Ten failures, alternating nodes, each from its own address (no address reaches
    # the limit: it is the account that is blocked).
    for i in range(10):
        node = (a, b)[i % 2]
        code, text = node.login("bob@example.org", "wrong", source=f"127.0.1.{i + 1}")
        assert (code, text.split()[0]) == (535, "5.7.8"), (i, code, text)
    for node, source in ((a, "127.0.1.50"), (b, "127.0.1.51")):
        code, text = node.login("bob@example.org", PASSWORD, source=source)
        assert (code, text) == (R.AUTH_BLOCKED.code,
                                f"{R.AUTH_BLOCKED.enhanced} {R.AUTH_BLOCKED.text}")
    # Another account is not blocked, on either node.
    assert a.login("carol@example.org", PASSWORD, source="127.0.1.52")[0] == 235
    assert b.login("carol@example.org", PASSWORD, source="127.0.1.53")[0] == 235


def test_hourly_message_limit_counts_across_both_nodes(redis_nodes):
    a, b = redis_nodes
    assert a.submit("alice@example.org", source="127.0.2.1") == (250, "")
    assert b.submit("alice@example.org", source="127.0.2.2") == (250, "")
    assert a.submit("alice@example.org", source="127.0.2.3") == (250, "")
    # The fourth in the hour, on either node: 450 4.7.1 at MAIL FROM.
    refused = (R.USER_RATE_LIMIT.code, f"{R.USER_RATE_LIMIT.enhanced} {R.USER_RATE_LIMIT.text}")
    assert b.submit("alice@example.org", source="127.0.2.4") == refused
    assert a.submit("alice@example.org", source="127.0.2.5") == refused
    wait_until(lambda: a.mailbox("alice", "example.org") + b.mailbox("alice", "example.org") == 3,
               what="3 deliveries")
    assert (a.mailbox("alice", "example.org"), b.mailbox("alice", "example.org")) == (2, 1)


def test_connection_rate_per_ip_counts_across_both_nodes(redis_nodes):
    a, b = redis_nodes
    source = "127.0.3.1"
    for node in (a, b, a, b):
        assert node.greeting(source)[0] == 220
    code, text = a.greeting(source)
    assert (code, text) == (R.CONNECTION_RATE.code,
                            f"421 {R.CONNECTION_RATE.enhanced} {R.CONNECTION_RATE.text}")
    assert b.greeting(source)[0] == 421
    assert a.greeting("127.0.3.2")[0] == 220  # another address


def test_redis_killed_mid_test_mail_still_accepted_then_recovery(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    node = Node(tmp_path / "node", redis.port, "outage:", metrics=True)
    node.daemon.start()
    try:
        wait_until(lambda: [e["state"] for e in node.events("counters")] == ["up"], what="up")
        assert node.submit("alice@example.test", source="127.0.4.1") == (250, "")
        assert redis.command("GET", "outage:rate:msg:alice@example.test") == b"$1\r\n1\r\n"

        redis.kill()
        # Mail is still accepted (AUTH, the rate checks and all), counted locally.
        for i in range(3):
            assert node.submit("carol@example.test", source=f"127.0.4.{i + 10}") == (250, "")
        assert node.greeting("127.0.4.20")[0] == 220
        # One event for the outage, and the metrics say so.
        wait_until(lambda: len(node.events("counters")) == 2, what="the down event")
        down = node.events("counters")[1]
        assert (down["state"], down["backend"], down["detail"]) == ("down", "redis", "ConnectionError")
        assert node.metric('mta_counters_backend_up{backend="redis"}') == "0.0"
        assert node.metric('mta_counters_backend_outages_total{backend="redis"}') == "1.0"
        # The local counters still hold the limit while Redis is away.
        assert node.submit("carol@example.test", source="127.0.4.30")[0] == 450

        redis.start()  # the same port, empty
        wait_until(lambda: [e["state"] for e in node.events("counters")] == ["up", "down", "back"],
                   what="the back event")
        assert node.metric('mta_counters_backend_up{backend="redis"}') == "1.0"
        assert node.submit("alice@example.test", source="127.0.4.40") == (250, "")
        assert redis.command("GET", "outage:rate:msg:alice@example.test") == b"$1\r\n1\r\n"
        wait_until(lambda: node.mailbox("alice") == 2 and node.mailbox("carol") == 3,
                   what="the deliveries")
        assert "Traceback" not in node.daemon.read_log()
        assert "password" not in json.dumps(node.events("counters"))
    finally:
        node.daemon.kill()
        redis.kill()
