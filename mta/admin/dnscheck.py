"""``mta dns-check [DOMAIN] [--json]``: the DNS records to publish, and what DNS says.

For every local domain (or the one given) it makes the records this MTA needs
as zone-file lines ready to paste, asks the configured resolver
(``[dns] servers``, else ``/etc/resolv.conf``) what is published, and gives
one PASS/FAIL line per record with the fix:

* ``MX``: ``<domain> MX 10 <hostname>`` (RFC 5321 §5.1);
* ``SPF``: one ``v=spf1`` TXT record (RFC 7208 §4.5); it passes when SPF,
  evaluated with pyspf (the check the receivers run, with our HELO name),
  gives ``pass`` for every outgoing address (below).  Suggested:
  ``v=spf1 mx -all``, with ``ip4:``/``ip6:`` of the configured source
  addresses before ``mx`` when there are any;
* ``DKIM``: for each ``[[dkim.keys]]`` of the domain, the TXT record of the
  public key derived from the private key file (RFC 6376 §3.6.1, RFC 8463);
  passes when the published ``p=`` is that key;
* ``DMARC``: one ``v=DMARC1`` record at ``_dmarc`` with a ``rua=`` (RFC 7489
  §6.1, §7.1);
* ``MTA-STS``: the ``_mta-sts`` TXT record with the id of the policy made from
  ``[mta_sts]`` (RFC 8461 §3.1; :mod:`mta.policy.mtasts`), the policy file's
  contents, whether ``mta-sts.<domain>`` has an address (the host the
  policy is fetched from, §3.3), and whether
  ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` serves that policy
  (fetched as a sender does: certificate checked against the system's CAs,
  200, ``text/plain``);
* ``TLS-RPT``: ``_smtp._tls`` with a ``rua=`` (RFC 8460 §3);

and once for the host:

* ``TLSA`` when ``[tls]`` has a certificate: ``_25._tcp.<hostname> TLSA 3 1 1``
  (DANE-EE, SPKI, SHA-256: RFC 7671 §5.1, RFC 7672 §3.1.1) of the certificate
  our MX presents for the host name: a DANE client sends the MX name by SNI
  (RFC 7672 §8.1), so it is ``tls.cert_dir``'s ``<hostname>/fullchain.pem``
  when there is one (as :func:`mta.system.tls.server_tls` chooses), else
  ``tls.cert_file``;
* ``FCrDNS``: for each outgoing address, a PTR whose name resolves back to
  the address (forward-confirmed reverse DNS), and ``HELO``: whether the HELO
  name we send (``delivery.helo_name``, else ``hostname``) is one of those
  PTR names.

The outgoing addresses (:func:`outgoing_addresses`) are those mail leaves
from: ``delivery.bind_address`` (IPv4) and ``delivery.bind_address6`` (IPv6)
where set (issue 18's source addresses, as Postfix's smtp_bind_address), and
for a family left unset, the host name's A or AAAA addresses (the kernel
chooses the source; on a host with one address per family that is it).
Route-table entries' own source addresses are not checked.

DNS is asked with dnspython, synchronously: this is a command, not the event
loop, and dnspython (already the DNS client of pyspf and dkimpy here) knows
TLSA, PTR and TXT records and answers with their wire data, where
twisted.names has no TLSA type.  The command (``mta.admin.cli``) exits 0
when everything passes, 1 otherwise.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from mta.config import Config
from mta.policy.mtasts import WELL_KNOWN_PATH, policy_id, policy_text, txt_record
from mta.system.dns import nameservers

TTL = 3600
TXT_CHUNK = 250  # a character-string is at most 255 octets (RFC 1035 §3.3)


@dataclass
class Answer:
    """One question's outcome: ``ok`` with values, ``nxdomain``/``nodata``, or ``error``."""

    status: str
    values: list[Any] = field(default_factory=list)
    error: str = ""

    def describe(self) -> str:
        if self.status == "error":
            return f"DNS error: {self.error}"
        if self.status in ("nxdomain", "nodata"):
            return "no such record" if self.status == "nodata" else "no such name (NXDOMAIN)"
        return ", ".join(map(str, self.values))


class Lookup:
    """Synchronous DNS questions to the configured servers (dnspython)."""

    def __init__(self, config: Config) -> None:
        servers = nameservers(config.dns)
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        self.resolver.timeout = config.dns.timeout / len(servers)
        self.resolver.lifetime = config.dns.timeout
        self.resolver.cache = None

    def __call__(self, name: str, rtype: str) -> Answer:
        try:
            answer = self.resolver.resolve(name, rtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Answer("nxdomain")
        except dns.exception.Timeout:
            return Answer("error", error=f"timeout asking for {name} {rtype}")
        except dns.resolver.NoNameservers:
            return Answer("error", error=f"server failure for {name} {rtype}")
        except dns.exception.DNSException as e:
            return Answer("error", error=f"{type(e).__name__} for {name} {rtype}")
        if answer.rrset is None:
            return Answer("nodata")
        return Answer("ok", [_value(rtype, r) for r in answer.rrset])


def _value(rtype: str, rdata: Any) -> Any:
    if rtype in ("A", "AAAA"):
        return rdata.address
    if rtype == "MX":
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    if rtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True).lower()
    if rtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if rtype == "TLSA":
        return f"{rdata.usage} {rdata.selector} {rdata.mtype} {rdata.cert.hex()}"
    return rdata.to_text()


@dataclass
class Check:
    """One record: what to publish, what DNS answered, whether that is right."""

    record: str  # MX, SPF, DKIM, DMARC, MTA-STS, MTA-STS host, TLS-RPT, TLSA, FCrDNS, HELO
    name: str  # the owner name asked about
    ok: bool
    detail: str  # what was found, or why it fails
    publish: str | None = None  # the zone-file line(s) to publish
    fix: str | None = None
    found: list[Any] = field(default_factory=list)


def _txt_zone(name: str, value: str) -> str:
    if len(value) <= TXT_CHUNK:
        return f'{name}. {TTL} IN TXT "{value}"'
    chunks = " ".join(f'"{value[i:i + TXT_CHUNK]}"' for i in range(0, len(value), TXT_CHUNK))
    return f"{name}. {TTL} IN TXT ( {chunks} )"


def _tags(record: str) -> dict[str, str]:
    """``k=v; k=v`` tag lists (DKIM, DMARC, MTA-STS, TLS-RPT) as a dict, whitespace removed."""
    tags = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags[key.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


def _txt_records(lookup: Lookup, name: str, version: str) -> tuple[Answer, list[str]]:
    """The TXT answer at ``name`` and its records starting with ``version`` (``v=...``)."""
    answer = lookup(name, "TXT")
    prefix = version.lower()
    matching = [v for v in answer.values if re.sub(r"\s+", "", v.lower()).startswith(prefix)]
    return answer, matching


def _dns_failed(record: str, name: str, answer: Answer, publish: str | None) -> Check:
    return Check(record, name, False, answer.describe(), publish,
                 "could not ask DNS: check [dns] servers (or resolv.conf) and run again")


# --- per domain ------------------------------------------------------------------------


def check_mx(lookup: Lookup, domain: str, hostname: str) -> Check:
    publish = f"{domain}. {TTL} IN MX 10 {hostname}."
    answer = lookup(domain, "MX")
    if answer.status == "error":
        return _dns_failed("MX", domain, answer, publish)
    hosts = [v.split()[1] for v in answer.values]
    if hostname in hosts:
        return Check("MX", domain, True, f"MX {', '.join(answer.values)}", publish, found=answer.values)
    detail = f"MX is {', '.join(answer.values)}, not {hostname}" if hosts else answer.describe()
    return Check("MX", domain, False, detail, publish, f"publish {publish}", answer.values)


def spf_value(bound: Sequence[str]) -> str:
    """The SPF record to suggest: the configured source addresses, then ``mx``."""
    ips = [f"ip{ipaddress.ip_address(a).version}:{a}" for a in bound]
    return " ".join(["v=spf1", *ips, "mx", "-all"])


def check_spf(lookup: Lookup, domain: str, hostname: str, addresses: list[str],
              config: Config, helo: str | None = None, bound: Sequence[str] = ()) -> Check:
    """SPF for mail from ``domain`` sent from each of ``addresses`` with EHLO
    ``helo`` (default ``hostname``); ``bound``: the configured source addresses."""
    from mta.policy.spf import install_pyspf_dns_hook, make_dns_lookup, run_pyspf

    helo = helo or hostname
    value = spf_value(bound)
    publish = _txt_zone(domain, value)
    answer, records = _txt_records(lookup, domain, "v=spf1")
    if answer.status == "error":
        return _dns_failed("SPF", domain, answer, publish)
    if not records:
        return Check("SPF", domain, False, "no v=spf1 record", publish, f"publish {publish}")
    if len(records) > 1:
        return Check("SPF", domain, False, f"{len(records)} v=spf1 records (RFC 7208 §4.5: "
                     "a permerror)", publish, f"keep one: {publish}", records)
    if not addresses:
        return Check("SPF", domain, False, f"{records[0]!r}, but {hostname} has no address "
                     "to check it with", publish, f"give {hostname} an A/AAAA record", records)
    install_pyspf_dns_hook()
    spf_lookup = make_dns_lookup(config.dns)
    results = {ip: run_pyspf(spf_lookup, ip, f"postmaster@{domain}", helo, hostname,
                             time.time()).result for ip in addresses}
    bad = {ip: r for ip, r in results.items() if r != "pass"}
    if not bad:
        return Check("SPF", domain, True, f"{records[0]!r}: pass for {', '.join(addresses)}",
                     publish, found=records)
    detail = f"{records[0]!r} gives " + ", ".join(f"{r} for {ip}" for ip, r in bad.items())
    return Check("SPF", domain, False, detail, publish,
                 f"allow {', '.join(bad)} (replace the record with {publish})", records)


def check_dkim(lookup: Lookup, domain: str, selector: str, key_file: Any) -> Check:
    from mta.policy.dkim import DKIMKeyError, dns_record_name, public_record

    name = dns_record_name(selector, domain)
    try:
        value = public_record(key_file)
    except DKIMKeyError as e:
        return Check("DKIM", name, False, str(e), None, "fix dkim.keys (mta check-config)")
    publish = _txt_zone(name, value)
    answer, records = _txt_records(lookup, name, "v=DKIM1")
    if answer.status == "error":
        return _dns_failed("DKIM", name, answer, publish)
    ours = _tags(value)["p"]
    if any(_tags(r).get("p") == ours for r in records):
        return Check("DKIM", name, True, f"the key of {key_file} ({_tags(value)['k']})",
                     publish, found=records)
    detail = "a different public key" if records else answer.describe()
    return Check("DKIM", name, False, detail, publish, f"publish {publish}", records)


def check_dmarc(lookup: Lookup, domain: str) -> Check:
    name = f"_dmarc.{domain}"
    value = f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"
    publish = _txt_zone(name, value)
    answer, records = _txt_records(lookup, name, "v=DMARC1")
    if answer.status == "error":
        return _dns_failed("DMARC", name, answer, publish)
    if len(records) == 1 and _tags(records[0]).get("rua", "").startswith("mailto:"):
        return Check("DMARC", name, True, repr(records[0]), publish, found=records)
    if len(records) > 1:
        detail = f"{len(records)} v=DMARC1 records (RFC 7489 §6.6.3: none applies)"
    elif records:
        detail = f"{records[0]!r} has no rua=mailto: (no aggregate reports)"
    else:
        detail = answer.describe()
    return Check("DMARC", name, False, detail, publish, f"publish {publish}", records)


def check_mta_sts(lookup: Lookup, domain: str, policy: str) -> Check:
    name = f"_mta-sts.{domain}"
    value = txt_record(policy)
    publish = _txt_zone(name, value)
    answer, records = _txt_records(lookup, name, "v=STSv1")
    if answer.status == "error":
        return _dns_failed("MTA-STS", name, answer, publish)
    ours = policy_id(policy)
    if len(records) == 1 and _tags(records[0]).get("id") == ours:
        return Check("MTA-STS", name, True, f"id={ours}", publish, found=records)
    if len(records) > 1:
        detail = f"{len(records)} v=STSv1 records (RFC 8461 §3.1: senders ignore them all)"
    elif records:
        detail = f"id={_tags(records[0]).get('id')}, but the policy's is {ours}"
    else:
        detail = answer.describe()
    return Check("MTA-STS", name, False, detail, publish, f"publish {publish}", records)


def check_mta_sts_host(lookup: Lookup, domain: str, hostname: str) -> Check:
    name = f"mta-sts.{domain}"
    publish = f"{name}. {TTL} IN CNAME {hostname}."
    found = []
    for rtype in ("A", "AAAA"):
        answer = lookup(name, rtype)
        if answer.status == "error":
            return _dns_failed("MTA-STS host", name, answer, publish)
        found += answer.values
    if found:
        return Check("MTA-STS host", name, True, f"has {', '.join(found)} (serves "
                     f"https://{name}/.well-known/mta-sts.txt)", publish, found=found)
    return Check("MTA-STS host", name, False, "no address: senders cannot fetch the policy",
                 publish, f"publish {publish} (and serve the policy: [mta_sts] endpoint)")


MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3: senders may refuse larger policies


def fetch_policy(address: str, port: int, host: str, timeout: float) -> tuple[int, str, bytes]:
    """GET the policy from ``address`` as ``host`` over HTTPS, the certificate checked
    for ``host`` against the system's CAs, as a sending MTA does (RFC 8461 §3.3)."""
    import http.client
    import socket
    import ssl

    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        raw.connect((address, port))
        sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", WELL_KNOWN_PATH, headers={"Host": host})
        response = conn.getresponse()
        return (response.status, response.getheader("Content-Type") or "",
                response.read(MAX_POLICY_SIZE + 1))
    finally:
        conn.close()


def check_mta_sts_policy(domain: str, addresses: list[str], policy: str, port: int,
                         timeout: float) -> Check:
    """Whether ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` serves our policy."""
    import http.client
    import ssl

    name = f"mta-sts.{domain}"
    url = f"https://{name}{WELL_KNOWN_PATH}"
    serve = "serve it: [mta_sts] endpoint (port 443) with a certificate for " + name
    if not addresses:
        return Check("MTA-STS policy", name, False, f"cannot fetch {url}: no address", None,
                     serve)
    problems = []
    for address in addresses[:4]:
        try:
            status, ctype, body = fetch_policy(address, port, name, timeout)
        except ssl.SSLCertVerificationError as e:
            problems.append(f"{address}: certificate not valid for {name}: "
                            f"{e.verify_message or e.reason}")
            continue
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as e:
            problems.append(f"{address}: {getattr(e, 'strerror', None) or e}")
            continue
        if status != 200:
            problems.append(f"{address}: HTTP {status}")
        elif not ctype.lower().startswith("text/plain"):
            problems.append(f"{address}: Content-Type {ctype!r}, not text/plain (RFC 8461 §3.2)")
        elif len(body) > MAX_POLICY_SIZE:
            problems.append(f"{address}: larger than 64 KiB")
        elif body.decode("utf-8", "replace").splitlines() != policy.splitlines():
            served = "; ".join(body.decode("utf-8", "replace").splitlines()[:6])
            problems.append(f"{address}: a different policy ({served})")
        else:
            return Check("MTA-STS policy", name, True, f"{url} from {address} is this policy",
                         None, found=[address])
    return Check("MTA-STS policy", name, False, "; ".join(problems), None,
                 f"{serve}, or put the policy shown above at {url}", list(addresses))


def check_tlsrpt(lookup: Lookup, domain: str) -> Check:
    name = f"_smtp._tls.{domain}"
    value = f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"
    publish = _txt_zone(name, value)
    answer, records = _txt_records(lookup, name, "v=TLSRPTv1")
    if answer.status == "error":
        return _dns_failed("TLS-RPT", name, answer, publish)
    if len(records) == 1 and _tags(records[0]).get("rua"):
        return Check("TLS-RPT", name, True, repr(records[0]), publish, found=records)
    detail = (f"{len(records)} v=TLSRPTv1 records" if len(records) > 1 else
              f"{records[0]!r} has no rua=" if records else answer.describe())
    return Check("TLS-RPT", name, False, detail, publish, f"publish {publish}", records)


# --- the host --------------------------------------------------------------------------


def tlsa_data(cert_file: Any) -> str:
    """The ``3 1 1`` association data (SHA-256 of the SubjectPublicKeyInfo) of the first
    certificate in ``cert_file``: what the DANE client (:mod:`mta.delivery.dane`) matches."""
    from OpenSSL import crypto

    from mta.delivery.dane import association

    with open(cert_file, "rb") as f:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    return association(cert, 1, 1).hex()


def check_tlsa(lookup: Lookup, hostname: str, cert_file: Any, default: Any = None) -> Check:
    """The TLSA record of ``cert_file``: tls.cert_file's, or (``default`` given: that
    is tls.cert_file) tls.cert_dir's certificate for ``hostname``, chosen by SNI."""
    name = f"_25._tcp.{hostname}"
    from OpenSSL import crypto

    by_sni = default is not None
    source = f"{cert_file} (tls.cert_dir, served for {hostname} by SNI)" if by_sni else cert_file
    setting = "tls.cert_dir" if by_sni else "tls.cert_file"
    try:
        data = tlsa_data(cert_file)
    except (OSError, ValueError, crypto.Error) as e:
        return Check("TLSA", name, False, f"cannot read {source}: {e}", None, f"fix {setting}")
    expected = f"3 1 1 {data}"
    publish = f"{name}. {TTL} IN TLSA {expected}"
    answer = lookup(name, "TLSA")
    if answer.status == "error":
        return _dns_failed("TLSA", name, answer, publish)
    if expected in answer.values:
        return Check("TLSA", name, True, f"3 1 1 of {source}", publish, found=answer.values)
    detail = "other TLSA data (the certificate's key changed?)" if answer.values else answer.describe()
    if by_sni and answer.values:
        try:
            if f"3 1 1 {tlsa_data(default)}" in answer.values:
                detail = (f"the TLSA of tls.cert_file ({default}), but a DANE client, which "
                          f"asks for {hostname} by SNI (RFC 7672 §8.1), is served {cert_file}")
        except (OSError, ValueError, crypto.Error):
            pass
    return Check("TLSA", name, False, detail, publish,
                 f"publish {publish} (DNSSEC-signed, or receivers ignore it)", answer.values)


def host_addresses(lookup: Lookup, hostname: str) -> tuple[list[str], Answer | None]:
    addresses: list[str] = []
    for rtype in ("A", "AAAA"):
        answer = lookup(hostname, rtype)
        if answer.status == "error":
            return addresses, answer
        addresses += answer.values
    return addresses, None


def outgoing_addresses(config: Config, host: list[str]) -> tuple[list[str], list[str]]:
    """``(outgoing, bound)``: the addresses mail leaves from (see the module's
    docstring) and of them the configured ones; ``host``: the host name's addresses."""
    d = config.delivery
    bound = [a for a in (d.bind_address, d.bind_address6) if a]
    out = list(bound)
    for version, configured in ((4, d.bind_address), (6, d.bind_address6)):
        if not configured:
            out += [a for a in host if ipaddress.ip_address(a).version == version]
    return out, bound


def check_reverse(lookup: Lookup, hostname: str, addresses: list[str],
                  failed: Answer | None, helo: str | None = None) -> list[Check]:
    """FCrDNS of each outgoing address, and whether ``helo`` (our EHLO name,
    default ``hostname``) is its confirmed PTR name."""
    helo = helo or hostname
    if failed is not None:
        return [_dns_failed("FCrDNS", hostname, failed, "")]
    if not addresses:
        return [Check("FCrDNS", hostname, False, f"{hostname} has no A or AAAA record", None,
                      f"publish {hostname}. {TTL} IN A <the address mail leaves from>")]
    checks = []
    for ip in addresses:
        ptr_name = dns.reversename.from_address(ip).to_text(omit_final_dot=True)
        answer = lookup(ptr_name, "PTR")
        publish = f"{ptr_name}. {TTL} IN PTR {helo}.  ; at the address's owner (ISP, host)"
        if answer.status == "error":
            checks.append(_dns_failed("FCrDNS", ip, answer, publish))
            checks.append(_dns_failed("HELO", ip, answer, publish))
            continue
        confirmed = []
        for name in answer.values:
            rtype = "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
            forward = lookup(name, rtype).values
            if any(ipaddress.ip_address(ip) == ipaddress.ip_address(a) for a in forward):
                confirmed.append(name)
        if confirmed:
            checks.append(Check("FCrDNS", ip, True, f"PTR {', '.join(confirmed)} resolves back "
                                f"to {ip}", publish, found=answer.values))
        elif answer.values:
            checks.append(Check("FCrDNS", ip, False, f"PTR {', '.join(answer.values)} does not "
                                f"resolve back to {ip}", publish,
                                f"point the PTR at {helo} (whose address is {ip})",
                                answer.values))
        else:
            checks.append(Check("FCrDNS", ip, False, f"no PTR for {ip}", publish,
                                f"ask the address's owner to set {publish.split(';')[0].strip()}"))
        name_setting = "delivery.helo_name" if helo != hostname else "hostname"
        if helo in confirmed:
            checks.append(Check("HELO", ip, True, f"EHLO name {helo} is the confirmed PTR "
                                f"name of {ip}", publish, found=answer.values))
        else:
            checks.append(Check("HELO", ip, False, f"EHLO name {helo} is not the confirmed "
                                f"PTR name of {ip}", publish,
                                f"set the PTR of {ip} to {helo} (or {name_setting} to its name)",
                                answer.values))
    return checks


# --- the command -----------------------------------------------------------------------


@dataclass
class DomainReport:
    domain: str
    checks: list[Check]
    policy: str


def run_checks(config: Config, domains: Sequence[str], lookup: Lookup | None = None,
               https_port: int = 443) -> tuple[list[DomainReport], list[Check]]:
    """Every check for ``domains`` and for the host; the MTA-STS policy is fetched
    from ``https_port`` (443 but in tests)."""
    lookup = lookup or Lookup(config)
    hostname = config.hostname.lower().rstrip(".")
    helo = (config.delivery.helo_name or hostname).lower().rstrip(".")
    host_ips, failed = host_addresses(lookup, hostname)
    addresses, bound = outgoing_addresses(config, host_ips)
    if failed is not None and len(bound) == 2:
        failed = None  # both source addresses configured: the host's are not needed
    policy = policy_text(config.mta_sts, hostname)
    reports = []
    for domain in domains:
        checks = [check_mx(lookup, domain, hostname),
                  check_spf(lookup, domain, hostname, addresses, config, helo, bound)]
        checks += [check_dkim(lookup, d, selector, key) for d, selector, key in config.dkim.keys
                   if d == domain]
        sts_host = check_mta_sts_host(lookup, domain, hostname)
        checks += [check_dmarc(lookup, domain), check_mta_sts(lookup, domain, policy), sts_host,
                   check_mta_sts_policy(domain, sts_host.found if sts_host.ok else [], policy,
                                        https_port, config.dns.timeout),
                   check_tlsrpt(lookup, domain)]
        reports.append(DomainReport(domain, checks, policy))
    host = []
    if config.tls.cert_file is not None:
        from mta.system.tls import sni_certificate

        by_name = sni_certificate(config.tls, hostname)
        host.append(check_tlsa(lookup, hostname, config.tls.cert_file) if by_name is None
                    else check_tlsa(lookup, hostname, by_name, config.tls.cert_file))
    host += check_reverse(lookup, hostname, addresses, failed, helo)
    return reports, host


def _check_lines(check: Check) -> list[str]:
    lines = [f"{'PASS' if check.ok else 'FAIL'}  {check.record:<12}  {check.name}: {check.detail}"]
    if not check.ok and check.fix:
        lines.append(f"      fix: {check.fix}")
    return lines


def report_json(hostname: str, reports: list[DomainReport], host: list[Check]) -> dict[str, Any]:
    """What ``--json`` prints: every check with its zone line, found values and fix."""
    return {"hostname": hostname, "ok": all_ok(reports, host),
            "domains": [{"domain": r.domain, "mta_sts_policy": r.policy,
                         "checks": [asdict(c) for c in r.checks]} for r in reports],
            "host": [asdict(c) for c in host]}


def all_ok(reports: list[DomainReport], host: list[Check]) -> bool:
    return all(c.ok for r in reports for c in r.checks) and all(c.ok for c in host)


def report_lines(hostname: str, reports: list[DomainReport], host: list[Check]) -> list[str]:
    """The text report: the zone-file lines (and the policy as comments), then the checks."""
    lines = []
    for report in reports:
        lines.append(f"; --- {report.domain}: the records to publish")
        lines += [check.publish for check in report.checks if check.publish]
        lines.append(f"; the MTA-STS policy, served at https://mta-sts.{report.domain}"
                     "/.well-known/mta-sts.txt:")
        lines += [f";   {line}" for line in report.policy.splitlines()]
    if host:
        lines.append(f"; --- {hostname}")
        lines += [c.publish for c in host if c.publish and c.record != "HELO"]
    lines.append("")
    everything = [c for r in reports for c in r.checks] + host
    for check in everything:
        lines += _check_lines(check)
    failed = sum(not c.ok for c in everything)
    lines.append(f"-- {len(everything) - failed} passed, {failed} failed")
    return lines
