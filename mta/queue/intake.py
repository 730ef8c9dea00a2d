"""One intake: the transaction that takes a message into the queue.

The SMTP session, local submission (:mod:`mta.intake.submit`) and the
runner's bounce builder all build a queued message the same way, with an
:class:`Intake`:

* the **sender** (given when the transaction starts, at MAIL);
* the **recipients**, each accepted address with its expansion: the caller
  decides (the relay and alias decision is policy's,
  :func:`mta.policy.relay.check_recipient`, which the queue may not import)
  and hands over the targets; :meth:`Intake.add_recipient` keeps one copy
  per mailbox across the transaction (``bob+x@`` and ``bob@`` are the same
  local recipient), as RFC 5321 §3.3 lets a server do;
* the **data**: :meth:`Intake.open` makes the queue file's writer (its id goes
  into the Received header, RFC 5321 §4.4), then the extra header fields on
  top (:meth:`Intake.add_headers`: trace and authentication fields, each
  prepended by the hop that adds it, RFC 5321 §4.4, RFC 8601 §5) and the
  message, either held in memory and written by the group commit (most mail)
  or streamed to ``tmp/`` as it arrives (:meth:`Intake.spill`, for a message
  too big to hold): :meth:`Intake.write` *is* the writer's ``write``, bound
  at open, so no chunk is copied or passes through another call;
* the **commit**: :meth:`Intake.commit` hands the envelope to the group commit
  and returns the writer's Deferred, which fires once the message is durable
  (or fails with :class:`~mta.queue.store.QueueError`, and nothing is left).
  The store then tells its listeners (the runner, or a worker's announcer)
  on the next reactor turn (:meth:`~mta.queue.store.QueueStore.announce`):
  nobody calls ``notify`` by hand, and a runner that queues a bounce is not
  re-entered while its pass is on the stack.

The SMTP session's use (:mod:`mta.smtp.reception`; the session keeps its
timing: the writer is made after the 354, the message held until the final
dot, the 250 sent when the Deferred fires)::

    txn = Intake(store, sender_text)                       # MAIL
    decision = check_recipient(address, ...)                # RCPT
    txn.add_recipient(str(address), decision.targets, notify=notify, orcpt=orcpt)
    queue_id = txn.open(buffered=True)                      # after the 354
    received = received_header(trace, queue_id=queue_id)
    ...                                                     # the final dot
    txn.add_headers([*auth_results, *spf_headers, received])
    txn.write(message)                # or txn.spill(), then txn.write(block) as it comes
    envelope = txn.envelope(created=time.time(), body_8bit=..., smtputf8=..., client_ip=...)
    rewrite_forwarded(envelope, srs, local_domains)         # policy may rewrite it
    d = txn.commit(envelope)          # fires once durable: reply 250 then
    # RSET, QUIT or a refused message: txn.abort()

Nothing here adds work to that path: no Deferred of its own, no copy of the
message, no system call beyond the writer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from mta.queue.envelope import Envelope, Recipient, RecipientKind
from mta.queue.store import MessageWriter, QueueStore

CRLF = b"\r\n"


class Target(Protocol):
    """Where one accepted address goes (as :class:`mta.policy.relay.Target`)."""

    kind: Any  # "local", "remote", "pipe", or the RecipientKind
    address: str
    mailbox: str


class Intake:
    """One message being taken into the queue, from its sender to its commit.

    Not reusable: after :meth:`commit` or :meth:`abort` it is spent.  The
    methods that touch the disk raise :class:`~mta.queue.store.QueueError`
    (making the file) or OSError (writing it); after either the caller
    calls :meth:`abort`.
    """

    def __init__(self, store: QueueStore, sender: str = "") -> None:
        self.store = store
        self.sender = sender
        self.recipients: list[Recipient] = []
        # Each accepted address once, in the order given (logs, Received "for").
        self.originals: list[str] = []
        self._known: set[tuple[RecipientKind, str]] = set()
        self.writer: MessageWriter | None = None
        self.id = ""

    # --- recipients ------------------------------------------------------------

    def add_recipient(self, original: str, targets: Iterable[Target], notify: str = "",
                      orcpt: str = "") -> int:
        """Add the accepted address ``original`` with its expansion ``targets``
        (one for a plain address; an alias's members); ``notify`` and ``orcpt``
        are its DSN parameters (RFC 3461 §4).  A target whose mailbox (or, for
        a remote or pipe one, address) is already a recipient is not added
        again.  Returns how many recipients were added."""
        if original not in self.originals:
            self.originals.append(original)
        added = 0
        for target in targets:
            kind = RecipientKind(target.kind)
            key = (kind, target.mailbox or target.address)
            if key in self._known:
                continue
            self._known.add(key)
            self.recipients.append(Recipient(address=target.address, kind=kind, original=original,
                                             mailbox=target.mailbox, notify=notify, orcpt=orcpt))
            added += 1
        return added

    def remove_recipient(self, address: str) -> int:
        """Remove the recipients of ``address`` (as given, or as expanded; without
        case), as a milter's SMFIR_DELRCPT asks.  Returns how many went."""
        lower = address.lower()
        keep = [r for r in self.recipients
                if r.original.lower() != lower and r.address.lower() != lower]
        removed = len(self.recipients) - len(keep)
        if removed:
            self.recipients = keep
            self.originals = [o for o in self.originals if o.lower() != lower]
            self._known = {(r.kind, r.mailbox or r.address) for r in keep}
        return removed

    # --- the data --------------------------------------------------------------

    def open(self, buffered: bool = True) -> str:
        """Make the queue file's writer and return the queue id.

        ``buffered``: the message is held in memory and written, with its
        envelope, by the group commit (into a spare file when the store has
        one); else the file in ``tmp/`` is made now and written as data comes.
        """
        assert self.writer is None, "opened twice"
        if self.id:  # reserved (reserve_id)
            writer = self.store.new_message(buffered=buffered, queue_id=self.id)
        else:
            writer = self.store.new_message(buffered=buffered)
        self.writer, self.id = writer, writer.id
        # The writer's own methods: a chunk goes straight to it.
        self.write = writer.write
        self.writelines = writer.writelines
        self.spill = writer.spill
        return writer.id

    def reserve_id(self) -> str:
        """The queue id now, before :meth:`open` makes the file (which then takes
        it): for a milter's ``i`` macro at MAIL and RCPT.  Nothing is written, so a
        transaction that ends before DATA leaves nothing behind."""
        if not self.id:
            self.id = self.store.new_id()
        return self.id

    def write(self, data: bytes) -> None:
        """Append ``data`` to the message (bound to the writer's at :meth:`open`)."""
        raise AssertionError("write before open")

    def writelines(self, chunks: list[bytes]) -> None:
        raise AssertionError("write before open")

    def spill(self) -> None:
        """Stream to ``tmp/`` from now on (a message outgrowing memory)."""
        raise AssertionError("spill before open")

    def add_headers(self, fields: Sequence[bytes]) -> None:
        """Header fields for the top of the message, in the order given (each a
        whole field, folded lines joined by CRLF, without its final CRLF).
        Called before the message's first octet is written."""
        assert self.writer is not None and self.writer.size == 0, "headers go on top"
        if fields:
            self.writer.write(CRLF.join(fields) + CRLF)

    @property
    def size(self) -> int:
        """Octets written so far (header fields on top included)."""
        return self.writer.size if self.writer is not None else 0

    # --- the end ---------------------------------------------------------------

    def envelope(self, created: float, **fields: Any) -> Envelope:
        """The envelope to commit: this transaction's id, sender and recipients,
        and ``fields`` (the other :class:`~mta.queue.envelope.Envelope` fields).
        The caller may still change it (SRS rewrites forwarded recipients)."""
        return Envelope(id=self.id, sender=self.sender, recipients=self.recipients,
                        created=created, **fields)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        """Hand the message to the group commit: the writer's Deferred, firing once
        the message is durable, or failing with QueueError (nothing is left
        then).  The store's listeners hear of it on the next reactor turn."""
        assert self.writer is not None and envelope.id == self.id
        writer, self.writer = self.writer, None
        return writer.commit_async(envelope)

    def abort(self) -> None:
        """Give the message up (any time before :meth:`commit`): nothing stays queued,
        an unused spare goes back to the store's pool."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abort()
