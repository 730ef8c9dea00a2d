"""SMTP TLS reporting (RFC 8460): counting outbound TLS sessions per policy domain
and UTC day, and mailing the daily aggregate report.

:meth:`TLSReporter.record` is the one way in, for every outbound session
that had a policy to apply (MTA-STS here, DANE from its own module):
``record(domain, policy_type, result, mx, details)`` where ``policy_type`` is
``sts``, ``tlsa`` or ``no-policy-found`` (§4.4) and ``result`` is
``success`` or a result type of §4.3 (:data:`RESULT_TYPES`).  The counts are
kept per (UTC day, policy domain, policy type) with the failures grouped by
(result type, MX host, receiving IP, reason), written to
``data_dir/tlsrpt/state.json`` (readable JSON) at most every
``flush_interval`` seconds and at :meth:`stop`, and read back at start, so
they survive a restart (a crash loses at most the last interval's counts).

Once a day, ``send_delay`` seconds after UTC midnight (on the clock passed
in), each finished day's counts become one report per policy domain (§4:
the JSON, gzipped, named as §5.3:
``submitter!policy-domain!begin!end!id.json.gz``) mailed to the ``mailto:``
addresses of the domain's ``_smtp._tls`` TXT record (§3: ``v=TLSRPTv1;
rua=...``) as ``multipart/report; report-type="tlsrpt"`` with the
``TLS-Report-Domain`` and ``TLS-Report-Submitter`` header fields (§5.3).
The mail enters the queue through :class:`mta.queue.intake.Intake`, as
bounces do, and is delivered like any other.  ``https:`` rua addresses
(§3: an HTTP POST) are not used: they are logged and skipped.  A domain
without a usable record has its day dropped (logged); one whose TXT lookup
fails temporarily is tried again at the next tick (hourly), for up to
:data:`KEEP_DAYS` days.

The mail is DKIM-signed (§3: it SHOULD be) with the configured keys of its
From domain (or its nearest parent with keys, as the SMTP submission path
signs), through the ``signer`` passed in (:class:`mta.policy.dkim.DKIMSigner`):
the queue's intake, which the report enters by, signs nothing itself.
Without a key for that domain the report goes unsigned.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import dns

from mta.mail.address import AddressError, parse_mailbox
from mta.queue.envelope import Recipient, RecipientKind
from mta.queue.intake import Intake
from mta.queue.store import QueueError

log = Logger()

SUCCESS = "success"
RESULT_TYPES = (
    # §4.3.1 negotiation failures
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    # §4.3.2 policy failures (DANE)
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    # §4.3.3 MTA-STS
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
KEEP_DAYS = 3  # a day whose report could not be sent is tried again this long
MAX_DOMAINS_PER_DAY = 10_000  # policy domains counted per day (more are not counted)
MAX_FAILURE_KEYS = 100  # distinct failure details kept per domain and day
MAX_RUA = 5  # addresses a report is mailed to
RETRY_INTERVAL = 3600.0


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class ReportSettings:
    """Who the reports come from (§4.4 ``organization-name``, ``contact-info``;
    §5.3 the submitter) and when they go out."""

    submitter: str  # our host name
    organization: str
    contact: str  # an address or URI for the report's contact-info
    from_address: str  # From: and envelope sender of the report mail
    send_delay: float = 900.0  # seconds after UTC midnight
    flush_interval: float = 60.0


class Signer(Protocol):
    """What the reporter needs of DKIM signing (:class:`mta.policy.dkim.DKIMSigner`)."""

    def signing_domain(self, author_domain: str) -> str | None: ...

    def sign(self, message: bytes, domain: str) -> list[bytes]: ...


class TLSReporter:
    """Counts sessions for RFC 8460 reports and mails them daily.

    ``store``: the queue store the reports enter through an Intake;
    ``txt_resolver``: asks ``_smtp._tls`` (``lookupText``); ``clock``: the
    time and the timers; ``state_dir``: where ``state.json`` lives;
    ``is_local``: whether a domain is ours (its rua is then a local mailbox);
    ``signer``: DKIM-signs the report mail (None: unsigned).
    """

    def __init__(self, store: Any, txt_resolver: Any, clock: Any, state_dir: Path,
                 settings: ReportSettings, *, is_local: Any = lambda domain: False,
                 signer: Signer | None = None) -> None:
        self.store = store
        self.signer = signer
        self.txt_resolver = txt_resolver
        self.clock = clock
        self.settings = settings
        self.is_local = is_local
        self.path = state_dir / "state.json"
        # day -> "domain policy_type" -> {"policy": [...], "mx": [...], "success": n,
        #                                  "failures": {"result|mx|ip|reason": n}}
        self.days: dict[str, dict[str, dict[str, Any]]] = self._load()
        self._dirty = False
        self._flush_timer: Any = None
        self._send_timer: Any = None
        self._running = False
        self.sent: list[str] = []  # queue ids of the reports queued (tests, logs)

    # --- counting ---------------------------------------------------------------------

    def record(self, domain: str, policy_type: str, result: str, mx: str = "",
               details: dict[str, str] | str | None = None, *,
               policy_string: Sequence[str] = (), mx_patterns: Sequence[str] = ()) -> None:
        """Count one session (``result`` ``success``) or one failure (a §4.3 result
        type) for ``domain``'s policy of ``policy_type``.  ``details`` may give
        ``receiving-ip``, ``sending-mta-ip`` and ``failure-reason-code`` (§4.4),
        or be the reason as text; ``policy_string``
        and ``mx_patterns`` describe the policy applied (§4.4 ``policy``)."""
        if policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}")
        if result != SUCCESS and result not in RESULT_TYPES:
            raise ValueError(f"result must be success or one of RFC 8460 §4.3's: {result!r}")
        day = self.days.setdefault(_day(self.clock.seconds()), {})
        key = f"{domain.lower()} {policy_type}"
        entry = day.get(key)
        if entry is None:
            if len(day) >= MAX_DOMAINS_PER_DAY:
                return
            entry = day[key] = {"policy": [], "mx": [], "success": 0, "failures": {}}
        if policy_string:
            entry["policy"] = list(policy_string)
        if mx_patterns:
            entry["mx"] = list(mx_patterns)
        if result == SUCCESS:
            entry["success"] += 1
        else:
            if isinstance(details, str):  # a reason as text (mta.delivery.dane)
                details = {"failure-reason-code": details} if details else {}
            details = details or {}
            fkey = "|".join((result, mx.lower(), details.get("receiving-ip", ""),
                             details.get("failure-reason-code", "").replace("|", "/")[:200],
                             details.get("sending-mta-ip", "")))
            failures = entry["failures"]
            if fkey in failures or len(failures) < MAX_FAILURE_KEYS:
                failures[fkey] = failures.get(fkey, 0) + 1
        self._dirty = True
        if self._flush_timer is None or not self._flush_timer.active():
            self._flush_timer = self.clock.callLater(self.settings.flush_interval, self.flush)

    # --- the state file ---------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("ignoring unreadable TLS report state {path}: {error}",
                      path=str(self.path), error=e)
            return {}
        return raw if isinstance(raw, dict) else {}

    def flush(self) -> None:
        """Write the counts to disk now (temporary file, fsync, rename)."""
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.days, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:
            log.error("cannot write the TLS report state {path}: {error}", path=str(self.path),
                      error=e)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the next sending: after the next UTC midnight (plus send_delay),
        or at once if a finished day is waiting."""
        self._running = True
        if self._send_timer is not None and self._send_timer.active():
            return
        now = self.clock.seconds()
        today = _day(now)
        if any(day < today for day in self.days):
            delay = 0.0
        else:
            midnight = datetime.fromtimestamp(now, UTC).replace(
                hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
            delay = midnight.timestamp() - now + self.settings.send_delay
        self._send_timer = self.clock.callLater(delay, self._send_tick)

    def stop(self) -> None:
        self._running = False
        if self._send_timer is not None and self._send_timer.active():
            self._send_timer.cancel()
        self._send_timer = None
        self.flush()

    def _send_tick(self) -> None:
        self._send_timer = None
        d = self.send_reports()

        def again(left: int) -> None:
            if self._running and self._send_timer is None:  # not stopped meanwhile
                self._send_timer = self.clock.callLater(RETRY_INTERVAL if left else 0,
                                                        self._after_send)

        d.addCallback(again)

    def _after_send(self) -> None:
        self._send_timer = None
        if self._running:
            self.start()

    # --- sending --------------------------------------------------------------------

    def send_reports(self) -> Deferred[int]:
        """Queue the report of every finished day and policy domain; fires with
        how many are left to try again (a temporary DNS or queue failure)."""
        return Deferred.fromCoroutine(self._send_reports())

    async def _send_reports(self) -> int:
        now = self.clock.seconds()
        today = _day(now)
        oldest = _day(now - KEEP_DAYS * 86400)
        left = 0
        for day in sorted(d for d in self.days if d < today):
            entries = self.days[day]
            domains = sorted({key.split(" ")[0] for key in entries})
            for domain in domains:
                try:
                    done = await self._send_one(day, domain, now)
                except Exception:
                    log.failure("TLS report for {domain} {day} failed", domain=domain, day=day)
                    done = True
                if done or day < oldest:
                    for key in [k for k in entries if k.split(" ")[0] == domain]:
                        del entries[key]
                    self._dirty = True
                else:
                    left += 1
            if not entries:
                del self.days[day]
                self._dirty = True
        self.flush()
        return left

    async def _send_one(self, day: str, domain: str, now: float) -> bool:
        """True when the day's report for ``domain`` is queued or can never be."""
        try:
            answers, _auth, _add = await self.txt_resolver.lookupText(f"_smtp._tls.{domain}")
        except Exception as e:
            if type(e).__name__ == "DNSNameError":
                log.info("no TLS report for {domain} ({day}): no _smtp._tls record",
                         domain=domain, day=day, event="tlsrpt", result="no_record")
                return True
            log.info("TLS report for {domain} ({day}) waits: _smtp._tls lookup failed ({error})",
                     domain=domain, day=day, error=type(e).__name__, event="tlsrpt",
                     result="dns_error")
            return False
        records = [b"".join(rr.payload.data).decode("utf-8", "replace")
                   for rr in answers if rr.type == dns.TXT]
        rua = parse_tlsrpt_txt(records)
        mailto = [u for u in rua if u.startswith("mailto:")]
        for uri in rua:
            if not uri.startswith("mailto:"):
                log.info("TLS report for {domain}: rua {uri} skipped (only mailto: is used)",
                         domain=domain, uri=uri[:100], event="tlsrpt", result="rua_skipped")
        addresses = []
        for uri in mailto[:MAX_RUA]:
            try:
                addresses.append(str(parse_mailbox(_unquote(uri[7:].split("?")[0]),
                                                   smtputf8=True)))
            except AddressError:
                log.info("TLS report for {domain}: bad rua {uri}", domain=domain, uri=uri[:100])
        if not addresses:
            log.info("no TLS report for {domain} ({day}): no usable mailto: rua",
                     domain=domain, day=day, event="tlsrpt", result="no_rua")
            return True
        report = build_report(day, domain, self.days[day], self.settings)
        message = self._signed(build_report_mail(report, domain, addresses, self.settings, now))
        return await self._queue(message, addresses, domain, day, report["report-id"], now)

    def _signed(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature per key of its From domain (RFC 8460 §3,
        RFC 6376), prepended; unchanged without a key (or, logged, if signing fails)."""
        if self.signer is None:
            return message
        author = self.settings.from_address.rpartition("@")[2]
        domain = self.signer.signing_domain(author)
        if domain is None:
            return message
        try:
            signatures = self.signer.sign(message, domain)
        except Exception as e:  # DKIMSignError: a report is still worth sending unsigned
            log.warn("TLS report not DKIM-signed for {domain}: {error}", domain=domain, error=e)
            return message
        return b"".join(sig + b"\r\n" for sig in signatures) + message

    async def _queue(self, message: bytes, addresses: list[str], domain: str, day: str,
                     report_id: str, now: float) -> bool:
        txn = Intake(self.store, sender=self.settings.from_address)
        try:
            for address in addresses:
                rdomain = address.rpartition("@")[2].lower()
                if self.is_local(rdomain):
                    target = Recipient(address=address, kind=RecipientKind.LOCAL,
                                       original=address, mailbox=address)
                else:
                    target = Recipient(address=address, kind=RecipientKind.REMOTE,
                                       original=address)
                txn.add_recipient(address, [target])
            txn.open(buffered=True)
            txn.write(message)
            envelope = txn.envelope(created=now, smtputf8=not all(a.isascii() for a in addresses),
                                    extra={"tlsrpt_for": domain})
            await txn.commit(envelope)
        except (OSError, QueueError) as e:
            txn.abort()
            log.error("could not queue the TLS report for {domain}: {error}", domain=domain,
                      error=e)
            return False
        self.sent.append(txn.id)
        log.info("queued TLS report {queue_id} for {domain} ({day}) to {rua}", queue_id=txn.id,
                 domain=domain, day=day, rua=", ".join(addresses), report_id=report_id,
                 event="tlsrpt", result="queued")
        return True


class ForwardedCounts:
    """A worker process's TLS counter (``workers`` > 1, :mod:`mta.daemon.workers`):
    each :meth:`TLSReporter.record` call becomes one line of JSON handed to
    ``send`` (the worker's pipe to the main process), whose one TLSReporter
    counts it with :func:`record_line`.  So one process owns ``state.json`` and
    sends the daily reports: several processes writing one state file would
    each overwrite the others' counts, and each would mail its own report."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send

    def record(self, domain: str, policy_type: str, result: str, mx: str = "",
               details: dict[str, str] | str | None = None, *,
               policy_string: Sequence[str] = (), mx_patterns: Sequence[str] = ()) -> None:
        if policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}")
        if result != SUCCESS and result not in RESULT_TYPES:
            raise ValueError(f"result must be success or one of RFC 8460 §4.3's: {result!r}")
        self.send(json.dumps([domain, policy_type, result, mx, details, list(policy_string),
                              list(mx_patterns)], separators=(",", ":")).encode("utf-8"))

    def stop(self) -> None:
        pass  # nothing kept here


MAX_FORWARDED_LINE = 16384  # a forwarded count is far shorter (200-octet reasons, a policy)


def record_line(counter: Any, line: bytes) -> None:
    """Count one line of :class:`ForwardedCounts` in ``counter`` (the main
    process's TLSReporter).  ValueError when the line is not one."""
    if len(line) > MAX_FORWARDED_LINE:
        raise ValueError("forwarded TLS count too long")
    try:
        domain, policy_type, result, mx, details, policy_string, mx_patterns = json.loads(line)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a forwarded TLS count: {e}") from None
    if not (isinstance(domain, str) and isinstance(mx, str)
            and isinstance(details, (dict, str, type(None)))
            and isinstance(policy_string, list) and isinstance(mx_patterns, list)
            and all(isinstance(x, str) for x in [*policy_string, *mx_patterns])
            and (not isinstance(details, dict)
                 or all(isinstance(v, str) for v in details.values()))):
        raise ValueError("not a forwarded TLS count")
    counter.record(domain, policy_type, result, mx, details, policy_string=policy_string,
                   mx_patterns=mx_patterns)


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def parse_tlsrpt_txt(records: Sequence[str]) -> list[str]:
    """The rua URIs of the ``_smtp._tls`` TXT records (RFC 8460 §3): exactly one
    record beginning ``v=TLSRPTv1``; ``rua`` a comma-separated URI list."""
    mine = [r for r in records if re.match(r"v=TLSRPTv1\s*(;|$)", r)]
    if len(mine) != 1:
        return []
    for part in mine[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            return [u.strip() for u in value.split(",") if u.strip()]
    return []


def build_report(day: str, domain: str, entries: dict[str, dict[str, Any]],
                 settings: ReportSettings) -> dict[str, Any]:
    """The RFC 8460 §4.4 JSON object for one policy domain and one UTC day."""
    policies = []
    for key in sorted(k for k in entries if k.split(" ")[0] == domain):
        entry = entries[key]
        policy_type = key.split(" ")[1]
        failures = []
        total_failed = 0
        for fkey, count in sorted(entry["failures"].items()):
            result, mx, ip, reason, sender = (fkey.split("|", 4) + ["", "", "", ""])[:5]
            detail: dict[str, Any] = {"result-type": result, "failed-session-count": count}
            if sender:
                detail["sending-mta-ip"] = sender
            if mx:
                detail["receiving-mx-hostname"] = mx
            if ip:
                detail["receiving-ip"] = ip
            if reason:
                detail["failure-reason-code"] = reason
            failures.append(detail)
            total_failed += count
        policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
        if entry["policy"]:
            policy["policy-string"] = entry["policy"]
        if entry["mx"]:
            policy["mx-host"] = entry["mx"]
        policies.append({
            "policy": policy,
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": total_failed},
            **({"failure-details": failures} if failures else {}),
        })
    return {
        "organization-name": settings.organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": settings.contact,
        "report-id": f"{day}.{domain}.{uuid.uuid4().hex[:12]}@{settings.submitter}",
        "policies": policies,
    }


def build_report_mail(report: dict[str, Any], domain: str, to: Sequence[str],
                      settings: ReportSettings, now: float) -> bytes:
    """The report as mail (RFC 8460 §5.3): multipart/report; report-type="tlsrpt",
    a text part and the gzipped JSON as application/tlsrpt+gzip."""
    day = report["date-range"]["start-datetime"][:10]
    begin = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    end = begin + 86399
    unique = report["report-id"].split("@")[0].rsplit(".", 1)[-1]
    filename = f"{settings.submitter}!{domain}!{begin}!{end}!{unique}.json.gz"
    data = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    msg = EmailMessage()
    msg["From"] = settings.from_address
    msg["To"] = ", ".join(to)
    msg["Subject"] = (f"Report Domain: {domain} Submitter: {settings.submitter} "
                      f"Report-ID: <{report['report-id']}>")
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = make_msgid(domain=settings.submitter)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = settings.submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"This is an aggregate TLS report (RFC 8460) from {settings.submitter} "
                    f"for {domain}, {day} (UTC).\n")
    msg.add_attachment(data, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; boundary="'
                       + str(msg.get_boundary()) + '"')
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def tls_result(session: Any) -> str | None:
    """The RFC 8460 §4.3 outcome of one outbound session (a
    :class:`mta.delivery.outbound.SessionResult` under a verifying TLS policy):
    ``success`` once TLS was negotiated, a failure's result type when STARTTLS
    or the handshake failed, None when no TLS negotiation took place (the
    connection or the greeting failed first)."""
    if session.tls:
        return SUCCESS
    error = session.connection_error or ""
    if "does not offer STARTTLS" in error or "STARTTLS refused" in error:
        return "starttls-not-supported"
    if not session.tls_failed:
        return None
    lowered = error.lower()
    if "mismatch" in lowered or "verificationerror" in lowered:
        return "certificate-host-mismatch"
    if "has expired" in lowered or "not yet valid" in lowered:
        return "certificate-expired"
    if "not trusted" in lowered or "certificate verify failed" in lowered:
        return "certificate-not-trusted"
    return "validation-failure"
