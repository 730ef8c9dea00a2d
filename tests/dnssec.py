"""DNSSEC for the tests: signed zones, an authoritative server and a validating resolver.

:class:`ValidatingDNS` builds, in a temporary directory, DNS zones from a
plain description, signs those meant to be signed with keys it makes with
``ldns-keygen`` (``ldns-signzone``, from Debian's ldnsutils), serves them all
with NSD on a loopback port, and runs Unbound on another loopback port as the
validating resolver in front of it: each zone is a stub zone pointing at NSD,
and each signed zone's key is given to Unbound as a trust anchor (there is no
root anchor, so an unsigned zone is simply "insecure").  Nothing leaves
loopback: the root is forwarded to a dead loopback port.

What a zone can be (``kind``):

* ``"signed"``: signed; answers validate, Unbound sets the AD bit;
* ``"insecure"``: unsigned, no trust anchor; answers come without AD;
* ``"bogus"``: signed with one key while Unbound trusts another, so every
  answer fails validation and Unbound answers SERVFAIL.

``tamper``: owner names whose records are changed *after* signing, so that
their signatures no longer match (only that RRset is bogus).

Both servers are real programs (``nsd -d``, ``unbound -d``) and are stopped
by :meth:`stop`; tests share one instance per session (the
``validating_dns`` fixture in ``tests/conftest.py``).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
LDNS_KEYGEN = shutil.which("ldns-keygen") or "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = shutil.which("ldns-signzone") or "/usr/bin/ldns-signzone"

SIGNED, INSECURE, BOGUS = "signed", "insecure", "bogus"


@dataclass
class Zone:
    """One zone: its origin, its records as zone-file lines (owner names relative
    or absolute), its kind and the owners whose records are tampered with."""

    origin: str
    records: list[str]
    kind: str = SIGNED
    tamper: tuple[str, ...] = ()


@dataclass
class ValidatingDNS:
    root: Path
    zones: list[Zone]
    nsd_port: int = 0
    port: int = 0  # Unbound's: the resolver the MTA asks
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # --- building ---------------------------------------------------------------

    def _keygen(self, origin: str) -> str:
        """A KSK (used as the only key) for ``origin``: the base name of its files."""
        out = subprocess.run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", origin], cwd=self.root,
                             check=True, capture_output=True, text=True).stdout.strip()
        return out

    def _zone_text(self, zone: Zone) -> str:
        head = [f"$ORIGIN {zone.origin}.", "$TTL 300",
                f"@ IN SOA ns.{zone.origin}. hostmaster.{zone.origin}. 1 3600 600 86400 300",
                f"@ IN NS ns.{zone.origin}.", f"ns.{zone.origin}. IN A 127.0.0.1"]
        return "\n".join([*head, *zone.records]) + "\n"

    def _build_zone(self, zone: Zone) -> tuple[str, str | None]:
        """Write (and sign) one zone; (zone file name, trust anchor DNSKEY line or None)."""
        plain = self.root / f"{zone.origin}.zone"
        plain.write_text(self._zone_text(zone))
        if zone.kind == INSECURE:
            return plain.name, None
        key = self._keygen(zone.origin)
        subprocess.run([LDNS_SIGNZONE, "-o", zone.origin, "-f", f"{zone.origin}.signed",
                        plain.name, key], cwd=self.root, check=True, capture_output=True)
        signed = self.root / f"{zone.origin}.signed"
        if zone.tamper:
            signed.write_text(_tamper(signed.read_text(), zone.origin, zone.tamper))
        if zone.kind == BOGUS:
            key = self._keygen(zone.origin)  # trusted, but never signed with
        # The DNSKEY line, without the comment ldns-keygen puts after it.
        anchor = (self.root / f"{key}.key").read_text().split(";")[0].strip()
        return signed.name, anchor

    def _write_configs(self, built: list[tuple[Zone, str, str | None]]) -> None:
        r = self.root
        nsd = [
            "server:", f"  ip-address: 127.0.0.1@{self.nsd_port}", f"  port: {self.nsd_port}",
            '  username: ""', '  chroot: ""', f'  zonesdir: "{r}"', f'  pidfile: "{r}/nsd.pid"',
            '  database: ""', f'  xfrdfile: "{r}/xfrd.state"', f'  zonelistfile: "{r}/zone.list"',
            f'  logfile: "{r}/nsd.log"', "  server-count: 1", "  verbosity: 1",
            "remote-control:", "  control-enable: no",
        ]
        unbound = [
            "server:", "  interface: 127.0.0.1", f"  port: {self.port}",
            "  do-not-query-localhost: no", '  username: ""', '  chroot: ""',
            f'  directory: "{r}"', f'  pidfile: "{r}/unbound.pid"', "  use-syslog: no",
            f'  logfile: "{r}/unbound.log"', "  verbosity: 1", "  val-log-level: 2",
            "  num-threads: 1", '  module-config: "validator iterator"',
            "  access-control: 127.0.0.0/8 allow", "  qname-minimisation: no",
            "  so-reuseport: no", "  outgoing-interface: 127.0.0.1",
            # Answers are asked again at each test: nothing stale between tests.
            "  cache-max-ttl: 0", "  cache-max-negative-ttl: 0",
        ]
        # Unbound answers the special-use names (RFC 6761: test., example., ...)
        # itself unless told not to.
        for tld in sorted({z.origin.rsplit(".", 1)[-1] for z in self.zones}):
            unbound.append(f'  local-zone: "{tld}." nodefault')
        stubs = []
        for zone, zonefile, anchor in built:
            nsd += ["zone:", f"  name: {zone.origin}", f'  zonefile: "{zonefile}"']
            if anchor is not None:
                unbound.append(f'  trust-anchor: "{anchor}"')
            else:
                unbound.append(f'  domain-insecure: "{zone.origin}"')
            stubs += ["stub-zone:", f'  name: "{zone.origin}"',
                      f"  stub-addr: 127.0.0.1@{self.nsd_port}"]
        # Everything else goes to a dead loopback port: no query leaves the machine.
        stubs += ["forward-zone:", '  name: "."', "  forward-addr: 127.0.0.1@9",
                  "remote-control:", "  control-enable: no"]
        (r / "nsd.conf").write_text("\n".join(nsd) + "\n")
        (r / "unbound.conf").write_text("\n".join(unbound + stubs) + "\n")

    # --- running ------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> ValidatingDNS:
        built = [(z, *self._build_zone(z)) for z in self.zones]
        self.nsd_port, self.port = _free_port(), _free_port()
        self._write_configs(built)
        r = self.root
        self._procs.append(subprocess.Popen([NSD, "-d", "-c", str(r / "nsd.conf")], cwd=r,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self._procs.append(subprocess.Popen([UNBOUND, "-d", "-c", str(r / "unbound.conf")], cwd=r,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        probe = next(z.origin for z in self.zones)
        deadline = time.monotonic() + timeout
        while True:
            for p in self._procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            try:
                if self.query(probe, "SOA", timeout=0.5)[0] == dns.rcode.NOERROR:
                    return self
            except (OSError, dns.exception.Timeout):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the validating resolver did not answer: {self.logs()}")
            time.sleep(0.1)

    def query(self, name: str, rtype: str, timeout: float = 2.0) -> tuple[int, bool, list[str]]:
        """Ask Unbound (blocking): (rcode, AD bit, the answer's records as text)."""
        q = dns.message.make_query(name, rtype, want_dnssec=False)
        q.flags |= dns.flags.AD
        a = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=timeout)
        return a.rcode(), bool(a.flags & dns.flags.AD), [rr.to_text() for rr in a.answer]

    def logs(self) -> str:
        texts = []
        for name in ("nsd.log", "unbound.log"):
            p = self.root / name
            if p.exists():
                texts.append(f"{name}: {p.read_text()[-2000:]}")
        return "\n".join(texts)

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()


def _tamper(text: str, origin: str, owners: tuple[str, ...]) -> str:
    """Change the last hex digit of each TLSA (or the address of each A) record of
    ``owners`` in a signed zone file, leaving their RRSIGs as they were."""
    wanted = {o if o.endswith(".") else f"{o}.{origin}." for o in owners}
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted and "RRSIG" not in fields:
            if "TLSA" in fields:
                line = line[:-1] + ("0" if line[-1] != "0" else "1")
            elif "A" in fields:
                line = re.sub(r"127\.0\.0\.\d+$", "127.0.0.99", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 (as far as one can tell before use)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for UDP and TCP")
