"""The LMTP courier: local recipients handed to a mail store (Dovecot, Cyrus) over LMTP.

It implements :class:`mta.queue.courier.Courier` for recipients of kind
``local``, as the third way of local delivery beside Maildir files and a
delivery-agent command (``delivery.lmtp`` in the configuration).

One connection per call, made with ``clientFromString`` from a Twisted client
endpoint description (``unix:/var/run/dovecot/lmtp``, ``tcp:127.0.0.1:24``),
one transaction for all recipients: ``MAIL FROM:<envelope sender>`` and
``RCPT TO:<user@domain>`` for each distinct mailbox.  The dialogue is the
outbound client's (:func:`mta.delivery.client.send` with ``lmtp=True``), so the
message streams from the queue file, dot-stuffed, without being loaded whole.
It goes as it is, with CRLF line endings and no ``Return-Path`` or
``Delivered-To`` added: the LMTP server writes those itself from the envelope.

Each recipient's outcome is its own reply (RFC 2033 §4.2): a RCPT refusal, or
its reply after the end of DATA -- 2xx delivered, 4xx deferred, 5xx failed.
A recipient without an answer (connect failure, the connection lost before its
reply) is deferred with the reason; ``deliver`` never errbacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from mta.delivery.client import ClientOptions, OutboundMessage, SessionResult, Timeouts, send
from mta.queue.courier import DeliveryResult, Outcome
from mta.queue.envelope import Envelope, Recipient

log = Logger()


def _unusable_mailbox(rcpt: Recipient) -> DeliveryResult | None:
    """A FAILED result for a recipient that cannot be named in RCPT TO, or None."""
    mailbox = rcpt.mailbox
    if not mailbox:
        # An alias named a local address that is neither user nor alias.
        return DeliveryResult(rcpt, Outcome.FAILED,
                              f"550 5.1.1 <{rcpt.address}>: no such user here", status="5.1.1")
    if "@" not in mailbox or any(ord(c) < 0x20 or c == "\x7f" for c in mailbox):
        # Control characters would end the RCPT command early (command injection).
        return DeliveryResult(rcpt, Outcome.FAILED,
                              f"553 5.1.3 mailbox {mailbox!r} is not a valid address",
                              status="5.1.3")
    return None


class LMTPCourier:
    """Delivers local recipients to an LMTP server at ``endpoint_description``.

    ``hostname`` is sent in LHLO.  ``timeouts`` are the client's stage timers
    (default :class:`~mta.delivery.client.Timeouts`); they run on ``reactor``.
    """

    def __init__(self, endpoint_description: str, reactor: Any, hostname: str,
                 timeouts: Timeouts | None = None) -> None:
        self.endpoint_description = endpoint_description
        self.reactor = reactor
        self.hostname = hostname
        self.timeouts = timeouts or Timeouts()

    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        async def guarded() -> list[DeliveryResult]:
            try:
                return await self._deliver(envelope, recipients, data_path)
            except Exception as e:  # never errback: a courier answers for everyone
                log.failure("LMTP delivery of {id} failed unexpectedly", id=envelope.id)
                reason = f"451 4.3.0 internal error during LMTP delivery: {type(e).__name__}: {e}"
                return [DeliveryResult(r, Outcome.DEFERRED, reason, status="4.3.0")
                        for r in recipients]

        return Deferred.fromCoroutine(guarded())

    async def _deliver(self, envelope: Envelope, recipients: list[Recipient],
                       data_path: Path) -> list[DeliveryResult]:
        results: dict[int, DeliveryResult] = {}
        by_mailbox: dict[str, list[Recipient]] = {}
        for r in recipients:
            refused = _unusable_mailbox(r)
            if refused is not None:
                results[id(r)] = refused
            else:
                by_mailbox.setdefault(r.mailbox, []).append(r)
        if by_mailbox:
            session = await self._send(envelope, list(by_mailbox), data_path)
            for res in self._results(session, by_mailbox):
                results[id(res.recipient)] = res
        return [results[id(r)] for r in recipients]

    async def _send(self, envelope: Envelope, mailboxes: list[str], data_path: Path) -> SessionResult:
        size = envelope.size or os.stat(data_path).st_size
        tx = OutboundMessage(sender=envelope.sender, recipients=mailboxes, data_path=data_path,
                             size=size, body_8bit=envelope.body_8bit, smtputf8=envelope.smtputf8,
                             binarymime=envelope.binarymime)
        # The default "opportunistic" policy means no STARTTLS for LMTP (see tlspolicy.py).
        options = ClientOptions(helo_name=self.hostname, timeouts=self.timeouts, lmtp=True)
        endpoint = clientFromString(self.reactor, self.endpoint_description)
        return await send(self.reactor, endpoint, [tx], options, server=self.endpoint_description)

    def _results(self, session: SessionResult,
                 by_mailbox: dict[str, list[Recipient]]) -> list[DeliveryResult]:
        replies = session.transactions[0].replies
        error = f"LMTP {session.server}: {session.connection_error or 'no reply'}"
        status = session.error_status or "4.4.2"
        results = []
        for mailbox, group in by_mailbox.items():
            reply = replies.get(mailbox)
            for r in group:
                if reply is None:  # unanswered: try again later
                    results.append(DeliveryResult(r, Outcome.DEFERRED, error, status=status))
                else:
                    results.append(DeliveryResult(r, reply.outcome, str(reply),
                                                  status=reply.enhanced))
        return results
