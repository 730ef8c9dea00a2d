"""Two MTA nodes (two ``twistd -n mta`` processes) sharing one PostgreSQL directory.

Black-box, as a site runs them (tests/nodes.py, fixture ``two_nodes``): an
admin's ``mta user add`` on node A is a login on node B (swaks, AUTH over
STARTTLS); an alias changed in SQL by hand is followed by both within the
cache TTL (the queued envelopes say where the mail went); and PostgreSQL
killed mid-test gives ``451 4.3.0`` at RCPT for a recipient only the
directory can decide and ``454 4.7.0`` for AUTH, while a relay client and a
session authenticated before the crash still relay, then, once the server
is started again, the node answers by itself (no restart, no reload).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from mta.queue.layout import list_ids, load_envelope
from tests.harness import RawClient, shared_ca
from tests.nodes import DOMAIN, OUTSIDER, RELAY_CLIENT, Node

pytestmark = pytest.mark.slow  # two twistd nodes and a real PostgreSQL

PASSWORD = "node-shared secret"


def swaks_auth(node: Node, user: str, password: str, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([
        "swaks", "--server", f"127.0.0.1:{node.ports['submission']}", "--helo", "client.test",
        "--tls", "--tls-ca-path", str(ca), "--auth", "PLAIN", "--auth-user", user,
        "--auth-password", password, "--from", user, "--to", "friend@remote.example",
        "--header", "Subject: from node test",
    ], capture_output=True, text=True, timeout=30)


def queued_recipients(node: Node) -> list[list[str]]:
    msg = node.root / "var" / "queue" / "msg"
    return [[r.address for r in load_envelope(msg, i).recipients] for i in sorted(list_ids(msg))]


def send(node: Node, recipient: str, source: str = OUTSIDER,
         sender: str = "someone@remote.example") -> tuple[int, str]:
    """A whole message from ``source``; the RCPT reply if refused, else DATA's."""
    c = RawClient(node.ports["mx"], source=source)
    try:
        c.read_reply()
        c.cmd("EHLO client.test")
        c.cmd(f"MAIL FROM:<{sender}>")
        code, text = c.cmd(f"RCPT TO:<{recipient}>")
        if code != 250:
            return code, text
        c.cmd("DATA")
        return c.cmd(b"Subject: t\r\n\r\nbody\r\n.")
    finally:
        c.sock.close()


def wait_for(predicate, timeout: float, step: float = 0.2):
    """The first true value of ``predicate()`` within ``timeout`` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def test_a_user_added_on_node_a_authenticates_on_node_b(two_nodes, tmp_path):
    a, b = two_nodes
    ca = tmp_path / "ca.pem"
    shared_ca().cert_pem.write_to_path(str(ca))
    user = f"dora@{DOMAIN}"
    refused = swaks_auth(b, user, PASSWORD, ca)
    assert refused.returncode != 0 and "535 5.7.8" in refused.stdout
    added = a.mta("user", "add", DOMAIN, "dora", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "every node sees it within 1 s" in added.stdout
    # B cached "no such user" for at most cache_ttl (1 s): then it logs in.
    result = wait_for(lambda: (r := swaks_auth(b, user, PASSWORD, ca)).returncode == 0 and r,
                      timeout=10, step=0.5)
    assert result, swaks_auth(b, user, PASSWORD, ca).stdout
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert queued_recipients(b) == [["friend@remote.example"]]
    assert queued_recipients(a) == []
    assert swaks_auth(a, user, "wrong " + PASSWORD, ca).returncode != 0


def test_an_alias_changed_in_sql_takes_effect_on_both_nodes_within_the_ttl(two_nodes):
    a, b = two_nodes
    assert a.mta("alias", "add", DOMAIN, "sales", "old@remote.example").returncode == 0
    for node in (a, b):
        assert wait_for(lambda n=node: send(n, f"sales@{DOMAIN}")[0] == 250, timeout=5)
        assert queued_recipients(node) == [["old@remote.example"]]
    # A DBA changes the row by hand.
    with psycopg.connect(a.dsn, autocommit=True) as conn:
        conn.execute("UPDATE aliases SET target = 'new@remote.example' "
                     "WHERE domain = %s AND name = 'sales'", (DOMAIN,))
    changed = time.monotonic()
    for node in (a, b):
        def follows(n: Node = node) -> bool:
            before = set(list_ids(n.root / "var" / "queue" / "msg"))
            assert send(n, f"sales@{DOMAIN}")[0] == 250
            (new,) = set(list_ids(n.root / "var" / "queue" / "msg")) - before
            env = load_envelope(n.root / "var" / "queue" / "msg", new)
            assert [r.original for r in env.recipients] == [f"sales@{DOMAIN}"]
            return [r.address for r in env.recipients] == ["new@remote.example"]
        assert wait_for(follows, timeout=10, step=0.25), node.name
    # Within the TTL (1 s), plus the time a few messages take here.
    assert time.monotonic() - changed < 5


def test_postgresql_killed_gives_451_relays_go_on_and_it_recovers(two_nodes, postgres, tmp_path):
    a, b = two_nodes
    assert a.mta("user", "add", DOMAIN, "erin", stdin=PASSWORD + "\n").returncode == 0
    assert wait_for(lambda: send(a, f"erin@{DOMAIN}")[0] == 250, timeout=5)
    # A session that authenticated before the crash (the AUTH looked up erin).
    sub = RawClient(a.ports["submission"])
    sub.read_reply()
    sub.cmd("EHLO client.test")
    assert sub.cmd("STARTTLS")[0] == 220
    import ssl

    ctx = ssl.create_default_context()
    shared_ca().configure_trust(ctx)
    sub.sock = ctx.wrap_socket(sub.sock, server_hostname="localhost")
    sub.cmd("EHLO client.test")
    import base64

    token = base64.b64encode(f"\0erin@{DOMAIN}\0{PASSWORD}".encode()).decode()
    assert sub.cmd(f"AUTH PLAIN {token}")[0] == 235
    postgres.kill()
    try:
        time.sleep(1.2)  # past cache_ttl: nothing is answered from the cache any more
        for node in (a, b):
            code, text = send(node, f"erin@{DOMAIN}")
            assert (code, text[:9]) == (451, "451 4.3.0"), text
            code, text = send(node, "whoever@elsewhere.example")  # an outsider: no relay
            assert code == 554 or code == 550, text
            # A relay client's mail to other domains needs no lookup: it is relayed.
            code, text = send(node, "friend@remote.example", source=RELAY_CLIENT)
            assert code == 250, text
        # The session authenticated before: MAIL from its own address, RCPT elsewhere.
        assert sub.cmd(f"MAIL FROM:<erin@{DOMAIN}>")[0] == 250
        assert sub.cmd("RCPT TO:<friend@remote.example>")[0] == 250
        assert sub.cmd("DATA")[0] == 354
        assert sub.cmd(b"Subject: during the outage\r\n\r\nstill relayed\r\n.")[0] == 250
        # A new login cannot be checked: a temporary failure, not 535.
        login = RawClient(b.ports["submission"])
        login.read_reply()
        login.cmd("EHLO client.test")
        login.cmd("STARTTLS")
        login.sock = ctx.wrap_socket(login.sock, server_hostname="localhost")
        login.cmd("EHLO client.test")
        code, text = login.cmd(f"AUTH PLAIN {token}")
        assert (code, text[:9]) == (454, "454 4.7.0"), text
        login.sock.close()
    finally:
        postgres.start()
    sub.sock.close()
    # Both nodes answer again by themselves once the server is back.
    for node in (a, b):
        assert wait_for(lambda n=node: send(n, f"erin@{DOMAIN}")[0] == 250, timeout=30), node.name
    for node in (a, b):
        log = node.log()
        assert "directory (postgresql) unavailable" in log
        assert "directory (postgresql) answers again" in log
        assert "auth unavailable" in log or node is a
