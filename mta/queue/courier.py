"""The one small interface every courier (local Maildir, pipe, remote SMTP) offers.

Owned by the queue, its caller: :mod:`mta.delivery` implements it and the queue
never imports :mod:`mta.delivery`.  The queue runner hands a courier the envelope, the recipients due now and the
path of the message data; the courier answers with one result per recipient.
A courier never touches the envelope file: recording results is the runner's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred

from mta.queue.envelope import Envelope, Recipient


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # temporary: try again later
    FAILED = "failed"  # permanent: bounce


@dataclass(frozen=True)
class DeliveryResult:
    recipient: Recipient
    outcome: Outcome
    # The reply that decided it, as text: "250 2.0.0 Ok queued as X" or our own reason.
    reply: str
    # The host that gave the reply, for the DSN's Remote-MTA field ("" if local).
    remote_mta: str = ""
    # RFC 3463 status for the DSN, e.g. "5.1.1"; derived from reply when empty.
    status: str = ""
    # Outbound TLS of the connection that gave the reply ("TLSv1.3 <cipher>"; "" = none).
    tls: str = ""
    # The next hop took the recipient's DSN parameters (it offered DSN, RFC 3461
    # §5.2): success and delay notices are its job from now on, not ours.
    dsn_passed: bool = False
    # That TLS connection's certificate was verified (a "verify" policy, DANE or
    # MTA-STS); shown per destination by the status page (issue 21).
    tls_verified: bool = False
    # No server of the destination could be talked to at all (connection refused
    # or timed out, TLS or greeting failure on every one): the queue then holds
    # the destination's other messages back for a while (mta.queue.destinations).
    destination_down: bool = False


class Courier(Protocol):
    def deliver(self, envelope: Envelope, recipients: list[Recipient],
                data_path: Path) -> Deferred[list[DeliveryResult]]:
        """Deliver ``data_path`` to ``recipients``; one result per recipient, never errback."""
        ...
