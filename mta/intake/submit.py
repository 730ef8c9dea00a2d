"""Local submission: a message handed over by ``sendmail`` (via the control channel).

:func:`submit_message` takes a sender, recipients and the message bytes and
queues them the way the SMTP server does for an authenticated submission,
through the one intake transaction (:class:`mta.queue.intake.Intake`):

* each recipient is checked with :func:`mta.policy.relay.check_recipient`
  (local domains expanded through the aliases; other domains relayed, since a
  local user may send anywhere), at most ``limits.max_recipients`` of them,
  and added with :meth:`~mta.queue.intake.Intake.add_recipient` (one copy per
  mailbox, as for SMTP);
* the message is read as it is, like a BDAT chunk
  (:class:`mta.mail.reader.ChunkReader`; nothing to dot-stuff or unstuff):
  lines must end in CRLF (bare CR or LF refused), line and size limits apply;
* our Received header comes first (:mod:`mta.policy.received`); Bcc is removed
  and Date / Message-ID are added when missing (RFC 6409 §8);
* more than ``limits.max_received_headers`` Received headers is a mail loop;
* the commit is the group commit's, as for SMTP; the store tells the runner
  on the next reactor turn.
* with ``[milters] local`` (Postfix's non_smtpd_milters) the message goes
  through those milters first, at its end (:func:`submit_filtered`): their
  refusal refuses it, their changes (headers, body, recipients, sender) are
  what is queued, their quarantine holds it, their discard drops it.

Nothing here touches the network, but the milters of ``[milters] local``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import Config
from mta.mail.address import AddressError, logged_sender, parse_mailbox
from mta.mail.headers import unfold_headers
from mta.mail.reader import ChunkReader, DataError
from mta.policy.received import TraceInfo, count_received, received_header
from mta.policy.relay import check_recipient
from mta.policy.srs import rewrite_forwarded
from mta.policy.submission import complete_headers
from mta.queue.envelope import Envelope
from mta.queue.intake import Intake
from mta.queue.store import QueueError, QueueStore

log = Logger()

# What went wrong, for the caller's exit status (sendmail maps these to sysexits).
USAGE = "usage"  # bad sender, no recipients, too many recipients
RECIPIENT = "recipient"  # a recipient was refused (unknown local user, alias loop)
DATA = "data"  # the message itself is unacceptable (line endings, size, loop)
TEMPORARY = "temporary"  # the queue could not be written: try again later


class SubmitError(Exception):
    """The message was not queued; ``kind`` is one of the constants above."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_DATA_PROBLEMS = {
    DataError.BARE_LINE_ENDING: "the message has a bare CR or LF (lines must end in CRLF)",
    DataError.LINE_TOO_LONG: "a line of the message is longer than {max_line} octets "
                             "(RFC 5322 §2.1.1)",
    DataError.TOO_BIG: "the message is larger than the limit of {max_size} octets",
    DataError.HEADER_TOO_BIG: "the header section is larger than {max_header} octets",
}


@dataclass(frozen=True)
class Submitter:
    """Who handed the message over, for the Received header and the log."""

    uid: int | None = None
    pid: int | None = None


def _parse_sender(sender: str) -> str:
    if sender in ("", "<>"):
        return ""
    try:
        return str(parse_mailbox(sender.strip("<>"), smtputf8=True))
    except AddressError as e:
        raise SubmitError(f"bad sender address {sender!r}: {e}", USAGE) from None


def add_recipients(txn: Intake, addresses: Sequence[str], config: Config, aliases: Any,
                   srs: Any = None, local_domains: Any = None) -> None:
    """Check each of ``addresses`` as the SMTP server checks a RCPT of a local
    user (:func:`mta.policy.relay.check_recipient`, relaying allowed) and add
    the accepted ones, expanded, to ``txn`` (:meth:`Intake.add_recipient`: one
    copy per mailbox).

    SubmitError listing every refused address if any is refused.
    ``local_domains``: an SQL directory's (default: the configuration's).
    """
    domains = config.local_domains if local_domains is None else local_domains
    if not addresses:
        raise SubmitError("no recipients", USAGE)
    if len(addresses) > config.limits.max_recipients:
        raise SubmitError(f"too many recipients ({len(addresses)}; the limit is "
                          f"{config.limits.max_recipients})", USAGE)
    refused: list[str] = []
    for text in addresses:
        try:
            address = parse_mailbox(text.strip().strip("<>"), smtputf8=True)
        except AddressError as e:
            refused.append(f"{text}: {e}")
            continue
        decision = check_recipient(address, domains, aliases, may_relay=True, srs=srs)
        if decision.reply is not None:
            refused.append(f"{address}: {decision.reply}")
            continue
        txn.add_recipient(str(address), decision.targets)
    if refused:
        raise SubmitError("recipient refused: " + "; ".join(refused), RECIPIENT)


def submit_message(store: QueueStore, config: Config, aliases: Any, sender: str,
                   recipients: Sequence[str], message: bytes,
                   submitter: Submitter | None = None,
                   clock: Callable[[], float] = time.time, *, srs: Any = None,
                   local_domains: Any = None, hold: str = "") -> Deferred[str]:
    """Queue ``message`` (CRLF lines, as it is: not dot-stuffed) with an
    :class:`~mta.queue.intake.Intake`; the Deferred fires with the queue id once
    the message is durable (the store tells the runner on the next reactor turn).

    ``aliases`` is the daemon's current :class:`~mta.policy.aliases.AliasResolver`,
    ``srs`` its :class:`~mta.policy.srs.SRSRewriter` (or None); with an SQL
    directory, ``aliases`` is its :class:`~mta.policy.relay.Answers` for these
    recipients and ``local_domains`` its domains.
    ``hold``: the message goes to the hold queue with that reason (a milter's
    quarantine).
    Fails with :class:`SubmitError`; then nothing is left in the queue.
    """
    try:
        txn, envelope = _take(store, config, aliases, sender, recipients, message,
                              submitter or Submitter(), clock, srs, local_domains)
    except SubmitError:
        return fail()
    if hold:
        envelope.hold = hold

    def failed(failure: Failure) -> Failure:
        failure.trap(QueueError)
        return Failure(SubmitError(f"cannot write to the queue: {failure.value}", TEMPORARY))

    def queued(_: None) -> str:
        log.info("queued {id} from={sender} to={rcpts} size={size} client=local uid={uid}",
                 id=envelope.id, sender=logged_sender(envelope.sender), rcpts=",".join(txn.originals),
                 size=envelope.size, uid=envelope.extra.get("local_uid"), event="queued")
        return envelope.id

    return txn.commit(envelope).addCallbacks(queued, failed)


def _take(store: QueueStore, config: Config, aliases: Any, sender: str,
          recipients: Sequence[str], message: bytes, submitter: Submitter,
          clock: Callable[[], float], srs: Any,
          local_domains: Any = None) -> tuple[Intake, Envelope]:
    """The transaction with its message written, and the envelope to commit;
    SubmitError (nothing left) if anything is refused."""
    txn = Intake(store, _parse_sender(sender))
    add_recipients(txn, recipients, config, aliases, srs, local_domains)
    smtputf8 = not (txn.sender.isascii() and all(o.isascii() for o in txn.originals))
    try:
        txn.open(buffered=True)  # in memory already: one file, as the SMTP server writes it
    except QueueError as e:
        raise SubmitError(f"cannot write to the queue: {e}", TEMPORARY) from None
    try:
        eight_bit = _write(txn, config, smtputf8, submitter, message, clock)
        envelope = txn.envelope(
            created=clock(), body_8bit=eight_bit, smtputf8=smtputf8, client_helo="localhost",
            extra={"local_uid": submitter.uid} if submitter.uid is not None else {})
        rewrite_forwarded(envelope, srs, config.local_domains)
    except BaseException:
        txn.abort()
        raise
    return txn, envelope


def _write(txn: Intake, config: Config, smtputf8: bool, submitter: Submitter, message: bytes,
           clock: Callable[[], float]) -> bool:
    """Write the Received header and the message; whether it has 8-bit octets.
    SubmitError if the message is refused.

    The message is read as the octets of one BDAT chunk are (RFC 3030 §2,
    :class:`~mta.mail.reader.ChunkReader`): exactly as given, with the DATA
    reader's checks, and a final CRLF added if the last line lacks one."""
    limits = config.limits
    trace = TraceInfo(
        helo="localhost", client_ip="127.0.0.1",
        client_name=f"uid={submitter.uid}" if submitter.uid is not None else "",
        hostname=config.hostname, queue_id=txn.id, esmtp=True, tls_version="",
        tls_cipher="", authenticated=False, smtputf8=smtputf8,
        recipients=tuple(txn.originals),
    )
    received = 0

    def on_headers(lines: list[bytes]) -> list[bytes]:
        nonlocal received
        received = count_received([name for name, _ in unfold_headers(lines)])
        return complete_headers(lines, config.hostname, lambda: _date(clock))

    try:
        txn.add_headers([received_header(trace)])
        reader = ChunkReader(sink=txn.write, on_headers=on_headers,
                             max_size=limits.max_message_size,
                             max_line_length=limits.max_line_length,
                             max_header_size=limits.max_header_size)
        reader.feed(message)
        reader.end()
    except OSError as e:
        raise SubmitError(f"cannot write to the queue: {e}", TEMPORARY) from None
    if reader.error is not None:
        problem = _DATA_PROBLEMS[reader.error].format(
            max_line=limits.max_line_length, max_size=limits.max_message_size,
            max_header=limits.max_header_size)
        raise SubmitError(problem, DATA)
    if received > limits.max_received_headers:
        raise SubmitError(f"mail loop: {received} Received headers (limit "
                          f"{limits.max_received_headers})", DATA)
    return reader.eight_bit


def _date(clock: Callable[[], float]) -> str:
    from datetime import UTC, datetime

    return format_datetime(datetime.fromtimestamp(clock(), UTC))


# --- through the milters of [milters] local (issue 17) --------------------------------

DISCARDED = ""  # the "queue id" of a message a milter discarded: accepted, not queued


def submit_filtered(milter: Any, store: QueueStore, config: Config, aliases: Any, sender: str,
                    recipients: Sequence[str], message: bytes, submitter: Submitter | None = None,
                    clock: Callable[[], float] = time.time, **kwargs: Any) -> Deferred[str]:
    """:func:`submit_message` after the milters of ``[milters] local``
    (``milter``: a :class:`mta.policy.milter.check.MilterCheck`), as Postfix's
    non_smtpd_milters: the message as it would be queued (Bcc removed, Date and
    Message-ID added) goes to :meth:`MilterCheck.local`; a 5xx refusal is a
    ``data`` SubmitError naming the reply, a 4xx one (a milter down with
    default_action tempfail) ``temporary``; their changes are what is queued;
    a quarantine holds the message; a discard (or every recipient deleted)
    fires with :data:`DISCARDED` and queues nothing.  Only called when
    [milters] local names a milter."""
    return Deferred.fromCoroutine(_filtered(milter, store, config, aliases, sender, recipients,
                                            message, submitter, clock, kwargs))


async def _filtered(milter: Any, store: QueueStore, config: Config, aliases: Any, sender: str,
                    recipients: Sequence[str], message: bytes, submitter: Submitter | None,
                    clock: Callable[[], float], kwargs: dict[str, Any]) -> str:
    from mta.policy.milter.check import header_section

    sender_ = _parse_sender(sender)
    lines, whole = _as_queued(message, config, clock)
    verdict = await milter.local(sender_, list(recipients), lines, whole)
    reply = verdict.reply
    if not verdict.accepted and reply is not None:
        raise SubmitError(f"refused by a milter: {reply.code} {reply.enhanced} {reply.text}",
                          DATA if reply.code >= 500 else TEMPORARY)
    edits = verdict.edits
    rcpts = list(recipients)
    if edits is not None:
        gone = {a.lower() for a in edits.delete}
        rcpts = [r for r in rcpts if r.strip().strip("<>").lower() not in gone]
        rcpts += [address for address, _ in edits.add if address not in rcpts]
        if edits.sender is not None:
            sender = edits.sender or "<>"
    if verdict.discard or not rcpts:
        log.info("discarded from={sender} to={rcpts} client=local: {why}", sender=logged_sender(sender_),
                 rcpts=",".join(recipients), why="a milter discarded it" if verdict.discard
                 else "a milter removed every recipient", event="discarded")
        return DISCARDED
    if verdict.header_lines is not None or (edits is not None and edits.body is not None):
        head = header_section(lines)
        body = whole[len(b"\r\n".join(head) + b"\r\n\r\n") if head else 0:]
        if verdict.header_lines is not None:
            head = header_section(verdict.header_lines)
        if edits is not None and edits.body is not None:
            new = edits.body
            body = new if isinstance(new, bytes) else new.read(config.limits.max_message_size + 1)
            if not isinstance(new, bytes):
                new.close()
        whole = (b"\r\n".join(head) + b"\r\n" if head else b"") + b"\r\n" + body
    return await submit_message(store, config, aliases, sender, rcpts, whole, submitter, clock,
                                hold=verdict.quarantine, **kwargs)


def _as_queued(message: bytes, config: Config, clock: Callable[[], float]) -> tuple[list[bytes], bytes]:
    """The message as :func:`_write` would queue it, without our Received header:
    its header lines and the whole of it; SubmitError as :func:`_write`'s."""
    limits = config.limits
    out: list[bytes] = []
    header: list[bytes] = []

    def on_headers(lines: list[bytes]) -> list[bytes]:
        header[:] = complete_headers(lines, config.hostname, lambda: _date(clock))
        return header

    reader = ChunkReader(sink=out.append, on_headers=on_headers, max_size=limits.max_message_size,
                         max_line_length=limits.max_line_length, max_header_size=limits.max_header_size)
    reader.feed(message)
    reader.end()
    if reader.error is not None:
        raise SubmitError(_DATA_PROBLEMS[reader.error].format(
            max_line=limits.max_line_length, max_size=limits.max_message_size,
            max_header=limits.max_header_size), DATA)
    return header, b"".join(out)
