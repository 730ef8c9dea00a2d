"""Local submission: a message handed over by ``sendmail`` (via the control channel).

:func:`submit_message` takes a sender, recipients and the message bytes and
queues them the way the SMTP server does for an authenticated submission, with
the same building blocks so there is one way to build a queued message:

* each recipient is checked with :func:`mta.policy.relay.check_recipient`
  (local domains expanded through the aliases; other domains relayed, since a
  local user may send anywhere), at most ``limits.max_recipients`` of them;
* the message goes through :class:`mta.mail.reader.DataReader`: lines must end
  in CRLF (bare CR or LF refused), line and size limits apply;
* our Received header comes first (:mod:`mta.policy.received`); Bcc is removed
  and Date / Message-ID are added when missing (RFC 6409 §8);
* more than ``limits.max_received_headers`` Received headers is a mail loop.

Nothing here touches the network; the queue store notifies the runner on commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any

from twisted.logger import Logger

from mta.config import Config
from mta.mail.address import AddressError, parse_mailbox
from mta.mail.headers import unfold_headers
from mta.mail.reader import DataError, DataReader
from mta.policy.received import TraceInfo, count_received, received_header
from mta.policy.relay import check_recipient
from mta.policy.srs import rewrite_forwarded
from mta.policy.submission import complete_headers
from mta.queue.envelope import Envelope, Recipient, RecipientKind
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


def dot_stuff(message: bytes) -> bytes:
    """The message as a DATA stream: dot-stuffed and terminated (RFC 5321 §4.5.2)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def _parse_sender(sender: str) -> str:
    if sender in ("", "<>"):
        return ""
    try:
        return str(parse_mailbox(sender.strip("<>"), smtputf8=True))
    except AddressError as e:
        raise SubmitError(f"bad sender address {sender!r}: {e}", USAGE) from None


def resolve_recipients(addresses: Sequence[str], config: Config, aliases: Any,
                       srs: Any = None) -> tuple[list[Recipient], list[str]]:
    """The envelope recipients for ``addresses`` and their canonical texts.

    SubmitError listing every refused address if any is refused.
    """
    if not addresses:
        raise SubmitError("no recipients", USAGE)
    if len(addresses) > config.limits.max_recipients:
        raise SubmitError(f"too many recipients ({len(addresses)}; the limit is "
                          f"{config.limits.max_recipients})", USAGE)
    recipients: list[Recipient] = []
    originals: list[str] = []
    refused: list[str] = []
    known: set[tuple[RecipientKind, str]] = set()
    for text in addresses:
        try:
            address = parse_mailbox(text.strip().strip("<>"), smtputf8=True)
        except AddressError as e:
            refused.append(f"{text}: {e}")
            continue
        decision = check_recipient(address, config.local_domains, aliases, may_relay=True,
                                   srs=srs)
        if decision.reply is not None:
            refused.append(f"{address}: {decision.reply}")
            continue
        original = str(address)
        if original not in originals:
            originals.append(original)
        # One copy per mailbox, as for SMTP (see SMTPSession.smtp_RCPT).
        for target in decision.targets:
            kind = RecipientKind(target.kind)
            key = (kind, target.mailbox or target.address)
            if key not in known:
                known.add(key)
                recipients.append(Recipient(address=target.address, kind=kind,
                                            original=original, mailbox=target.mailbox))
    if refused:
        raise SubmitError("recipient refused: " + "; ".join(refused), RECIPIENT)
    return recipients, originals


def submit_message(store: QueueStore, config: Config, aliases: Any, sender: str,
                   recipients: Sequence[str], message: bytes,
                   submitter: Submitter | None = None,
                   clock: Callable[[], float] = time.time, *, srs: Any = None) -> str:
    """Queue ``message`` (CRLF lines, not dot-stuffed) and return its queue id.

    ``aliases`` is the daemon's current :class:`~mta.policy.aliases.AliasResolver`,
    ``srs`` its :class:`~mta.policy.srs.SRSRewriter` (or None).
    Raises :class:`SubmitError`; then nothing is left in the queue.
    """
    submitter = submitter or Submitter()
    sender_text = _parse_sender(sender)
    rcpts, originals = resolve_recipients(recipients, config, aliases, srs)
    smtputf8 = not (sender_text.isascii() and all(o.isascii() for o in originals))
    try:
        writer = store.new_message()
    except QueueError as e:
        raise SubmitError(f"cannot write to the queue: {e}", TEMPORARY) from None
    try:
        written = _write(writer, config, originals, smtputf8, submitter, message, clock)
        envelope = Envelope(
            id=writer.id, sender=sender_text, recipients=rcpts, created=clock(),
            body_8bit=written.eight_bit, smtputf8=smtputf8, client_helo="localhost",
            extra={"local_uid": submitter.uid} if submitter.uid is not None else {})
        rewrite_forwarded(envelope, srs, config.local_domains)
    except BaseException:
        writer.abort()
        raise
    try:
        writer.commit(envelope)
    except QueueError as e:
        raise SubmitError(f"cannot write to the queue: {e}", TEMPORARY) from None
    log.info("queued {id} from={sender} to={rcpts} size={size} client=local uid={uid}",
             id=envelope.id, sender=sender_text or "<>", rcpts=",".join(originals),
             size=envelope.size, uid=submitter.uid, event="queued")
    return envelope.id


@dataclass
class _Result:
    eight_bit: bool


def _write(writer: Any, config: Config, originals: list[str], smtputf8: bool,
           submitter: Submitter, message: bytes, clock: Callable[[], float]) -> _Result:
    """Write the Received header and the message; SubmitError if the message is refused."""
    limits = config.limits
    trace = TraceInfo(
        helo="localhost", client_ip="127.0.0.1",
        client_name=f"uid={submitter.uid}" if submitter.uid is not None else "",
        hostname=config.hostname, queue_id=writer.id, esmtp=True, tls_version="",
        tls_cipher="", authenticated=False, smtputf8=smtputf8, recipients=tuple(originals),
    )
    received = 0

    def on_headers(lines: list[bytes]) -> list[bytes]:
        nonlocal received
        received = count_received([name for name, _ in unfold_headers(lines)])
        return complete_headers(lines, config.hostname, lambda: _date(clock))

    try:
        writer.write(received_header(trace) + b"\r\n")
        reader = DataReader(sink=writer.write, on_headers=on_headers,
                            max_size=limits.max_message_size,
                            max_line_length=limits.max_line_length,
                            max_header_size=limits.max_header_size)
        rest = reader.feed(dot_stuff(message))
    except OSError as e:
        raise SubmitError(f"cannot write to the queue: {e}", TEMPORARY) from None
    assert rest == b"", "dot_stuff always ends the stream"
    if reader.error is not None:
        problem = _DATA_PROBLEMS[reader.error].format(
            max_line=limits.max_line_length, max_size=limits.max_message_size,
            max_header=limits.max_header_size)
        raise SubmitError(problem, DATA)
    if received > limits.max_received_headers:
        raise SubmitError(f"mail loop: {received} Received headers (limit "
                          f"{limits.max_received_headers})", DATA)
    return _Result(eight_bit=reader.eight_bit)


def _date(clock: Callable[[], float]) -> str:
    from datetime import UTC, datetime

    return format_datetime(datetime.fromtimestamp(clock(), UTC))
