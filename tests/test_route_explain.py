"""``mta route explain ADDRESS``: the console command in a subprocess, its MX
lookups answered by a real DNS server on loopback (tests/dnsserver.py) that
this test's reactor runs meanwhile; the printed lines and the JSON are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.dnsserver import LoopbackDNS
from tests.harness import PASSWORD, in_thread, write_domain

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
hostname = "out.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"

[dns]
servers = ["{dns}"]
timeout = 1

[delivery]
bind_address = "127.0.0.2"
mx_port = 2525

[delivery.route."dst.test"]
tls = "verify"

[delivery.route.".corp.test"]
smarthost = "[relay.corp.test]:587"
tls = "encrypt"
username = "relayuser"
password = "s3cret-relay-pass"
bind_address6 = "::1"
"""

ALIASES = "team: alice, friend@dst.test, logs\nlogs: | /usr/bin/logger\n"


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    dns = LoopbackDNS({
        "dst.test": {"MX": [(20, "mx2.dst.test"), (10, "mx1.dst.test")]},
        "mx1.dst.test": {"A": ["127.0.0.11"]},
        "mx2.dst.test": {"A": ["127.0.0.12"], "AAAA": ["::1"]},
        "plain.test": {"MX": [(5, "mx.plain.test")]},
        "mx.plain.test": {"A": ["127.0.0.13"]},
    })
    pytest_twisted.blockon(dns.start())
    write_domain(tmp_path / "domains", "example.test", {"alice": PASSWORD}, ALIASES)
    path = tmp_path / "mta.toml"
    path.write_text(CONFIG.format(dns=f"{dns.address[0]}:{dns.address[1]}"))
    yield path, dns
    pytest_twisted.blockon(dns.stop())


def explain(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta.admin.cli", "route", "explain", *args,
                           "--config", str(config)], env=env, capture_output=True, text=True,
                          timeout=60)


def rows(stdout: str) -> list[list[str]]:
    """The table's rows as [STEP, SOURCE, DETAIL] (columns split on two spaces)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["STEP", "SOURCE", "DETAIL"]
    starts = [lines[0].index("SOURCE"), lines[0].index("DETAIL")]
    return [[line[:starts[0]].strip(), line[starts[0]:starts[1]].strip(), line[starts[1]:]]
            for line in lines[1:]]


@pytest_twisted.ensureDeferred
async def test_alias_to_local_remote_and_pipe(setup: Any) -> None:
    config, dns = setup
    done = await in_thread(explain, config, "team@example.test")
    assert done.returncode == 0, done.stderr
    steps = rows(done.stdout)
    aliases = str(config.parent / "domains" / "example.test" / "aliases")
    maildir = config.parent / "var" / "mail" / "example.test" / "alice"
    assert steps == [
        ["recipient", "argument", "team@example.test"],
        ["domain", "local_domains", "example.test is a local domain"],
        ["alias", aliases, "team@example.test expands to alice@example.test, friend@dst.test, "
                           "| /usr/bin/logger"],
        ["route", "mail_dir", f"Maildir {maildir}"],
        ["route", 'delivery.route."dst.test"', "MX delivery for dst.test"],
        ["mx", "dns", "preference 10: mx1.dst.test (127.0.0.11)"],
        ["mx", "dns", "preference 20: mx2.dst.test (::1, 127.0.0.12)"],
        ["tls", 'delivery.route."dst.test".tls',
         "verify: STARTTLS required, certificate verified (RFC 6125) (route table entry)"],
        ["dane", 'delivery.route."dst.test".tls',
         "not consulted: the route table entry sets the TLS policy"],
        ["mta-sts", 'delivery.route."dst.test".tls',
         "not consulted: the route table entry sets the TLS policy"],
        ["requires", "route", "TLS required; certificate verified against mx1.dst.test, "
                              "mx2.dst.test; port 2525; from 127.0.0.2 / any IPv6 address; "
                              "HELO out.example.test"],
        ["route", aliases, "pipe to the command '/usr/bin/logger' (delivery.pipe_timeout 300s)"],
    ]
    assert dns.asked("dst.test", "MX") == 1


@pytest_twisted.ensureDeferred
async def test_json_for_a_table_smarthost_with_credentials(setup: Any) -> None:
    config, dns = setup
    done = await in_thread(explain, config, "--json", "bob@eu.corp.test")
    assert done.returncode == 0, done.stderr
    assert "s3cret-relay-pass" not in done.stdout  # the password is never shown
    result = json.loads(done.stdout)
    assert result["version"] == 1 and result["address"] == "bob@eu.corp.test"
    assert [(s["step"], s["source"]) for s in result["steps"]] == [
        ("recipient", "argument"), ("domain", "local_domains"),
        ("route", 'delivery.route.".corp.test".smarthost'), ("host", "configuration"),
        ("tls", 'delivery.route.".corp.test".tls'), ("requires", "route")]
    assert result["steps"][2]["detail"] == "smarthost [relay.corp.test]:587 (no MX lookup)"
    assert result["deliveries"] == [{
        "kind": "remote", "address": "bob@eu.corp.test", "route": "table", "entry": ".corp.test",
        "hops": [{"name": "relay.corp.test", "preference": None, "addresses": [], "port": 587,
                  "verify_name": None}],
        "tls": {"level": "encrypt", "source": "table", "origin": 'delivery.route.".corp.test".tls',
                "required": True, "verified": False},
        "bind_address": "127.0.0.2", "bind_address6": "::1", "helo_name": "out.example.test",
        "auth_user": "relayuser", "error": None}]
    assert dns.queries == []  # [host]: nothing looked up


@pytest_twisted.ensureDeferred
async def test_default_policy_and_dns_failure(setup: Any) -> None:
    config, dns = setup
    done = await in_thread(explain, config, "x@plain.test")
    steps = rows(done.stdout)
    assert steps[2:] == [
        ["route", "default", "MX delivery for plain.test (no route table entry)"],
        ["mx", "dns", "preference 5: mx.plain.test (127.0.0.13)"],
        ["tls", "delivery.tls_policy", "may: STARTTLS when offered, certificate not checked; "
                                       "clear text otherwise (default)"],
        ["dane", "dane.enabled", "off: [dane] is not enabled"],
        ["mta-sts", "delivery.mta_sts.enabled", "off: [delivery.mta_sts] is not enabled"],
        ["requires", "route", "TLS not required; certificate not verified; port 2525; "
                              "from 127.0.0.2 / any IPv6 address; HELO out.example.test"],
    ]
    dns.servfail("plain.test")
    done = await in_thread(explain, config, "--json", "x@plain.test")
    [delivery] = json.loads(done.stdout)["deliveries"]
    assert delivery["error"] == ("451 4.4.3 MX lookup for plain.test failed: DNS server failure "
                                 "(SERVFAIL)")
    assert delivery["hops"] == []


@pytest_twisted.ensureDeferred
async def test_unknown_local_user_and_bad_address(setup: Any) -> None:
    config, _ = setup
    done = await in_thread(explain, config, "nobody@example.test")
    assert done.returncode == 0
    assert rows(done.stdout)[-1] == ["refused", "recipient check", "550 5.1.1 "
                                     "<nobody@example.test>: Recipient address rejected: User unknown"]
    done = await in_thread(explain, config, "not an address")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("mta: 'not an address' is not an address")


def test_check_config_names_a_source_address_this_host_does_not_have(tmp_path: Path) -> None:
    from mta.admin.cli import config_problems
    from mta.config import config_from_dict

    config = config_from_dict({"hostname": "h.test", "data_dir": str(tmp_path), "delivery": {
        "bind_address": "127.0.0.2",
        "route": {"dst.test": {"bind_address": "192.0.2.1"}}}}, tmp_path)
    problems = [p for p in config_problems(config) if "bind_address" in p]
    assert problems == ['delivery.route."dst.test".bind_address: cannot send from 192.0.2.1 on '
                        "this host (Cannot assign requested address)"]


def test_check_config_names_table_levels_whose_mechanism_is_missing(tmp_path: Path) -> None:
    from mta.admin.cli import config_problems
    from mta.config import config_from_dict

    config = config_from_dict({"hostname": "h.test", "data_dir": str(tmp_path), "delivery": {
        "route": {"a.test": {"tls": "dane"}, "b.test": {"tls": "mta-sts"}}}}, tmp_path)
    problems = [p for p in config_problems(config) if p.startswith("delivery.route")]
    assert problems == [
        'delivery.route."a.test".tls: dane needs [dane] enabled = true (until then mail for '
        "a.test is deferred)",
        'delivery.route."b.test".tls: mta-sts needs [delivery.mta_sts] enabled = true (until '
        "then mail for b.test is deferred)"]


def mta(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta.admin.cli", *args, "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_an_sql_directory_is_what_explain_reads(setup: Any) -> None:
    """With [directory] backend = "sqlite", the domain and the alias come from
    the database (a domain the files and local_domains do not have), not the files."""
    config, dns = setup
    config.write_text(config.read_text().replace(
        "[dns]", '[directory]\nbackend = "sqlite"\ncache_ttl = 0\n\n[dns]'))
    for argv in (("directory", "migrate"), ("domain", "add", "sql.test"),
                 ("alias", "add", "sql.test", "crew", "friend@plain.test")):
        done = await in_thread(mta, config, *argv)
        assert done.returncode == 0, done.stderr
    done = await in_thread(explain, config, "crew@sql.test")
    assert done.returncode == 0, done.stderr
    steps = rows(done.stdout)
    assert steps[:3] == [
        ["recipient", "argument", "crew@sql.test"],
        ["domain", "directory (sqlite)", "sql.test is a local domain"],
        ["alias", "directory (sqlite)", "crew@sql.test expands to friend@plain.test"],
    ]
    assert ["mx", "dns", "preference 5: mx.plain.test (127.0.0.13)"] in steps
