"""Receiving a transaction's message: DATA and BDAT, to the queue.

:class:`MessageReception` is the part of :class:`mta.smtp.server.SMTPSession`
that takes the message of a transaction in and queues it:

* DATA (RFC 5321 §4.1.1.4): the octets go through
  :class:`mta.mail.reader.DataReader` to the terminator; BDAT (CHUNKING, RFC
  3030): exactly the announced octets of each chunk, whatever the reply, into
  a :class:`mta.mail.reader.ChunkReader` (the same checks, no dot-unstuffing;
  BODY=BINARYMIME skips the body's line rules);
* the message is held in memory up to ``dkim.max_message_size`` (one write at
  the end, and the whole message for the MESSAGE checks), past that it goes
  to the queue file as it arrives;
* the HEADERS checks run as the header section completes (they may rewrite
  it), the MESSAGE checks after the end (headers on top, envelope
  annotations, or a refusal);
* the queue writer and our Received header are made as soon as the 354 (or
  the first chunk's reply) has gone out, off the time between the end of the
  message and its 250;
* the 250 goes out only once the message is on disk (``_store``, ``_commit``,
  ``_queued``: the hand-over to the queue).

Its state lives as long as one message's reception (the reader, the queue
writers, the chunks held, the trace, the BDAT chunk being read); the
transaction's own state is in :class:`mta.smtp.state.Transaction`.
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.mail import replies as R
from mta.mail.address import logged_sender
from mta.mail.checks import ACCEPT, EMPTY, Action, Stage, Verdict
from mta.mail.reader import ChunkReader, DataError, DataReader
from mta.mail.replies import Reply
from mta.policy.received import TraceInfo, received_header
from mta.queue.envelope import Envelope
from mta.queue.store import MessageWriter, QueueError
from mta.smtp.framing import Phase
from mta.smtp.state import Transaction

# The session's log lines keep the namespace they always had (log readers match it).
log = Logger(namespace="mta.smtp.server")

# RFC 3030 §2: "BDAT" SP chunk-size [SP "LAST"]; at most 20 digits (the size is
# bounded: whatever it is, that many octets are read before the reply).
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?: (LAST))? *", re.IGNORECASE)


class MessageReception:
    """DATA, BDAT and the hand-over to the queue (see the module docstring)."""

    ctx: Any
    config: Any
    limits: Any
    listener: Any
    pipeline: Any
    view: Any
    _plan: Any  # the checks of each stage for this client (Pipeline.plan)
    client_ip: str
    helo: str | None
    esmtp: bool
    tls_version: str
    tls_cipher: str
    auth_user: str | None
    txn: Transaction | None
    accepted: int
    phase: Phase

    def _init_reception(self) -> None:
        self._data: DataReader | None = None
        self._writer: MessageWriter | None = None
        # The next message's queue writer with its trace headers, made right after
        # the 354 went out, while the client sends the message (see _prepare_writer).
        self._ready_writer: MessageWriter | None = None
        self._ready_trace = b""  # its trace headers, written by _open_writer
        self._prepare_after_flush = False
        self._header_refusal: Verdict | None = None  # a HEADERS check refused: said at the end
        self._chunks: list[bytes] | None = []  # the message held in memory during DATA
        self._held = 0
        self._spill_prefix = 0  # a spilled message's first octet in its queue file
        self._trace: TraceInfo | None = None
        # The BDAT chunk being read (RFC 3030): octets still to come, whether it
        # is the LAST one, the refusal decided at the command (its octets are
        # then dropped), and the octets of this message's chunks so far.
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._bdat_octets = 0

    # --- DATA (RFC 5321 §4.1.1.4) -----------------------------------------------------

    def smtp_DATA(self, arg: str) -> Reply | None:  # noqa: N802
        if self.txn is None:
            return R.NEED_MAIL
        if not self.txn.rcpt_addresses:
            return R.NO_RECIPIENTS
        if self._data is not None:
            return R.DATA_AFTER_BDAT
        if self.txn.binarymime:
            return R.DATA_AFTER_BINARYMIME
        if arg.strip():
            return R.NO_ARGUMENTS
        self._begin_message(chunked=False)
        self.phase = Phase.DATA
        self._prepare_after_flush = True
        return R.START_DATA

    def _begin_message(self, chunked: bool) -> None:
        """Set up the reader of the message (DATA's, or BDAT's for ``chunked``)."""
        assert self.txn is not None
        # The message is held in memory up to dkim.max_message_size (one write at
        # the end, and room to add DKIM/Authentication-Results headers on top);
        # past that it spills to the queue file and streams (see _collect).
        self._chunks = []
        self._held = 0
        self._header_refusal = None
        self._trace = TraceInfo(
            helo=self.helo or "", client_ip=self.client_ip, client_name="",
            hostname=self.config.hostname, queue_id="", esmtp=self.esmtp,
            tls_version=self.tls_version, tls_cipher=self.tls_cipher,
            authenticated=self.auth_user is not None, smtputf8=self.txn.smtputf8,
            recipients=tuple(self.txn.rcpt_addresses),
        )
        if chunked:
            self._data = ChunkReader(
                sink=self._collect,
                on_headers=self._on_headers,
                max_size=self.limits.max_message_size,
                max_line_length=self.limits.max_line_length,
                max_header_size=self.limits.max_header_size,
                binary=self.txn.binarymime,
            )
            return
        self._data = DataReader(
            sink=self._collect,
            on_headers=self._on_headers,
            max_size=self.limits.max_message_size,
            max_line_length=self.limits.max_line_length,
            max_header_size=self.limits.max_header_size,
        )

    # --- BDAT (CHUNKING, RFC 3030) ---------------------------------------------------

    def smtp_BDAT(self, arg: str) -> Reply | Deferred[Reply] | None:  # noqa: N802
        """``BDAT <size> [LAST]`` (RFC 3030 §2), followed by exactly <size> octets.

        Whatever the answer, those octets are read before it goes out (and
        dropped when the chunk is refused: no MAIL, no valid RCPT, over the
        size limit), so the session stays in step with a client that pipelines
        its chunks, and the replies go out in order.  A chunk that is not the
        LAST gets its 250 once its octets are in; the LAST chunk's 250 comes
        only once the message is on disk, as for DATA.  Only a syntax error is
        answered at once: the size is then unknown (501).
        """
        m = _BDAT_ARGS.fullmatch(arg)
        if m is None:
            return R.BDAT_SYNTAX
        size = int(m[1])
        refusal: Reply | None = None
        if self.txn is None:
            refusal = R.NEED_MAIL
        elif not self.txn.rcpt_addresses:
            refusal = R.NO_RECIPIENTS
        else:
            if self._data is None:  # the first chunk of this message
                self._begin_message(chunked=True)
                self._bdat_octets = 0
                self._prepare_after_flush = True
            if self._bdat_octets + size > self.limits.max_message_size:
                refusal = R.TOO_BIG
            self._bdat_octets += size
        self._bdat_left, self._bdat_last, self._bdat_refusal = size, m[2] is not None, refusal
        self._bdat_size = size
        if size:
            self.phase = Phase.BDAT
            return None
        return self._chunk_done()

    def _read_chunk(self) -> bool:
        """Take the chunk's octets from the input (to the reader, or dropped when
        the chunk is refused); True once all of them are in."""
        available = len(self._buf) - self._pos
        take = min(self._bdat_left, available)
        if take == available:
            chunk = self._buf[self._pos :] if self._pos else self._buf
            self._buf, self._pos, self._scan = b"", 0, 0
        else:
            chunk = self._buf[self._pos : self._pos + take]
            self._pos += take
            self._scan = self._pos
        self._bdat_left -= take
        if self._bdat_refusal is None:
            assert isinstance(self._data, ChunkReader)
            self._data.feed(chunk)
        if self._bdat_left:
            return False
        self.phase = Phase.COMMAND
        return True

    def _chunk_done(self) -> Reply | Deferred[Reply]:
        """The reply to a BDAT chunk whose octets are all in.

        A refused chunk discards the whole message of its transaction (RFC 3030
        §2: the client must not go on with it), as a refused DATA does."""
        refusal, reader, txn = self._bdat_refusal, self._data, self.txn
        self._bdat_refusal = None
        if refusal is not None:
            if refusal is R.TOO_BIG and txn is not None:
                self._rejected("data", refusal, sender=logged_sender(txn.sender_text),
                               rcpts=",".join(txn.rcpt_addresses))
                self._reset_transaction()
            return refusal
        assert isinstance(reader, ChunkReader)
        if self._bdat_last:
            reader.end()
            return self._end_of_data()
        if reader.error is not None or self._chunks is None:
            return self._end_of_data()  # answers the error and ends the transaction
        return R.chunk_received(self._bdat_size)

    # --- the message, to the queue -------------------------------------------------

    def _prepare_writer(self) -> None:
        """Make the queue writer and the Received header now that the 354 has gone
        out: the client is sending the message meanwhile, so this work is off
        the time between its final dot and our 250.  (The time stamp is the
        start of the transfer, as in Postfix's Received.)  A failure here is
        left for the end of the message, which tries again and answers 451."""
        self._prepare_after_flush = False
        if self._data is None or self._ready_writer is not None or self._writer is not None:
            return
        try:
            self._ready_writer, self._ready_trace = self._new_writer()
        except (QueueError, OSError):
            self._ready_writer = None

    def _new_writer(self) -> tuple[MessageWriter, bytes]:
        """The transaction's queue writer, opened buffered and still empty
        (:meth:`mta.queue.intake.Intake.open`), and the trace headers for the top
        of its message: Received-SPF above our Received (RFC 7208 §9.1:
        prepended, above the Received field of the receiver that did the check)."""
        txn = self.txn
        assert txn is not None
        queue_id = txn.intake.open(buffered=True)
        # The queue id goes into the Received header (RFC 5321 §4.4 "id").
        received = received_header(self._trace, queue_id=queue_id)
        writer = txn.intake.writer
        assert writer is not None
        return writer, b"\r\n".join([*txn.trace_headers, received]) + b"\r\n"

    def _open_writer(self, extra_headers: list[bytes], buffered: bool = False) -> MessageWriter:
        """The queue writer with ``extra_headers``, then the trace headers (``buffered``:
        a message already in memory, written out by the group commit; else the
        file in tmp/ is started now and the rest written to it as it arrives).

        ``extra_headers`` (Authentication-Results, our DKIM-Signature) are made
        last, at the end of DATA, and so go on top: each field is prepended to
        the header as the hop adds it (RFC 8601 §5, RFC 6376 §5.6)."""
        writer, self._ready_writer = self._ready_writer, None
        trace, self._ready_trace = self._ready_trace, b""
        self._prepare_after_flush = False
        if writer is None:
            writer, trace = self._new_writer()
        try:
            if extra_headers:
                writer.write(b"\r\n".join(extra_headers) + b"\r\n")
            writer.write(trace)
            if not buffered:
                writer.spill()
        except BaseException:
            writer.abort()
            raise
        return writer

    def _collect(self, block: bytes) -> None:
        """The DataReader's sink: hold the message, or spill it to disk past the limit.

        ``self._chunks`` is None once writing failed: the rest is only scanned
        for the terminator and the message is refused with 451."""
        if self._chunks is None:
            return
        if self._writer is None:
            if self._held + len(block) <= self.config.dkim.max_message_size:
                self._chunks.append(block)
                self._held += len(block)
                return
            txn = self.txn
            assert txn is not None
            extra = self._top_headers(txn, txn.auth_results, log_it=False)
            try:
                self._writer = self._open_writer(extra)
                self._spill_prefix = self._writer.size  # where the message begins in its file
                self._writer.writelines(self._chunks)
            except (QueueError, OSError) as e:
                self._write_failed(e)
                return
            self._chunks = []
        try:
            self._writer.write(block)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, error: Exception) -> None:
        log.error("queue write failed: {err}", err=error)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._chunks = None

    def _top_headers(self, txn: Transaction, auth_results: tuple[Any, ...], dmarc: Any = None,
                     log_it: bool = True) -> list[bytes]:
        """The headers the checks add on top of the message: one
        Authentication-Results field with every entry (RFC 8601 §5), then those
        of HEADERS (and MESSAGE, added by the caller)."""
        if not auth_results:
            return list(txn.top_headers)
        from mta.policy.msgauth import results_header

        return [results_header(self.config.hostname, auth_results, dmarc, log_it), *txn.top_headers]

    def _on_headers(self, lines: list[bytes]) -> list[bytes]:
        """The DataReader's header callback: the HEADERS checks, at once (they may
        rewrite the lines; a refusal is answered after the message's end)."""
        view = self.view
        view.header_lines = lines
        checks = self._plan[Stage.HEADERS]  # none: the shared ACCEPT at once
        # (run with now=True is run_now, without the extra call.)
        verdict = self.pipeline.run(Stage.HEADERS, view, checks, True) if checks else ACCEPT
        lines, view.header_lines = view.header_lines, ()
        txn = self.txn
        if txn is not None:
            txn.header_lines = lines
            if verdict is not ACCEPT:
                txn.add(verdict, top=True)
        if verdict.action is not Action.ACCEPT:
            self._header_refusal = verdict
        return lines

    def _end_of_data(self) -> Reply | Deferred[Reply]:
        reader, writer, txn = self._data, self._writer, self.txn
        assert reader is not None and txn is not None
        self._data = None
        self.phase = Phase.COMMAND
        error = reader.error
        reply: Reply | None = None
        refusal = self._header_refusal
        if error is DataError.TOO_BIG:
            reply = R.TOO_BIG
        elif error is DataError.HEADER_TOO_BIG:
            reply = R.HEADER_TOO_BIG
        elif error is DataError.BARE_LINE_ENDING:
            reply = R.BARE_LINE_ENDING
        elif error is DataError.LINE_TOO_LONG:
            reply = R.DATA_LINE_TOO_LONG
        elif refusal is not None:
            self._reset_transaction()
            return self._refused("data", refusal, sender=logged_sender(txn.sender_text),
                                 rcpts=",".join(txn.rcpt_addresses))
        elif self._chunks is None:
            reply = R.QUEUE_WRITE_FAILED
        if reply is not None:
            self._rejected("data", reply, sender=logged_sender(txn.sender_text),
                           rcpts=",".join(txn.rcpt_addresses))
            self._reset_transaction()
            return reply
        message = None
        if writer is None:  # else spilled: streamed to disk already
            message = b"".join(self._chunks)
            self._chunks = []
        view = self.view
        view.header_lines, view.message = txn.header_lines, message
        checks = self._plan[Stage.MESSAGE]  # none: the shared ACCEPT at once
        verdict = self.pipeline.run(Stage.MESSAGE, view, checks) if checks else ACCEPT
        if verdict is not ACCEPT and not isinstance(verdict, Verdict):  # a Deferred: a check needs I/O
            return verdict.addCallback(self._message_decided, writer, message, txn, reader.eight_bit)
        return self._message_decided(verdict, writer, message, txn, reader.eight_bit)

    def _message_decided(self, verdict: Verdict, writer: MessageWriter | None, message: bytes | None,
                         txn: Transaction, eight_bit: bool) -> Reply | Deferred[Reply]:
        """Queue the message as the MESSAGE checks said (headers on top, envelope
        annotations), or refuse it."""
        view = self.view
        view.header_lines, view.message = (), None
        auth_results = txn.auth_results + verdict.auth_results
        top: list[bytes] = []
        if message is not None and (auth_results or txn.top_headers):
            top = self._top_headers(txn, auth_results, (verdict.facts or EMPTY).get("dmarc"))
        if verdict.action is not Action.ACCEPT:
            # Also drops the queue writer made ready after the 354, whose Received
            # header names this transaction's recipient: never reused by the next one.
            self._reset_transaction()
            return self._refused("data", verdict, sender=logged_sender(txn.sender_text),
                                 rcpts=",".join(txn.rcpt_addresses))
        if verdict.discard or verdict.edits is not None or (
                verdict.header_lines is not None and verdict.header_lines is not txn.header_lines):
            kept, message = self._apply_edits(verdict, writer, message, txn)  # a milter's (issue 17)
            if not kept:
                return R.MILTER_DISCARDED
        envelope = txn.intake.envelope(
            created=time.time(),
            body_8bit=txn.body_8bit or eight_bit,
            binarymime=txn.binarymime,
            smtputf8=txn.smtputf8,
            client_ip=self.client_ip,
            client_helo=self.helo or "",
            auth_user=self.auth_user or "",
            tls=f"{self.tls_version} {self.tls_cipher}".strip(),
            ret=txn.ret,
            envid=txn.envid,
            dsn=txn.dsn,
            requiretls=txn.requiretls,
        )
        if verdict.envelope:
            envelope.extra.update(verdict.envelope)
        if verdict.edits is not None and verdict.edits.sender is not None:
            envelope.sender = verdict.edits.sender
        if verdict.quarantine:  # issue 17: committed (the 250), but held, not delivered
            envelope.hold = verdict.quarantine
        if writer is not None:
            return self._commit(writer, envelope, txn)
        assert message is not None
        if verdict.headers:
            top += verdict.headers
        return self._store(message, top, envelope, txn)

    def _apply_edits(self, verdict: Verdict, writer: MessageWriter | None, message: bytes | None,
                     txn: Transaction) -> tuple[bool, bytes | None]:
        """A milter's end-of-message changes (issue 17), before the envelope is made:
        the header section rewritten (``verdict.header_lines``), the body replaced,
        recipients deleted then added (``verdict.edits``).  Returns whether the
        message is kept, and the message as it is now (None for one on disk);
        not kept: discarded by the milter, or left without a recipient (the 250
        then says Ok)."""
        edits = verdict.edits
        if edits is not None:
            for address in edits.delete:
                txn.intake.remove_recipient(address)
            for address, targets in edits.add:
                txn.intake.add_recipient(address, targets)
        if verdict.discard or not txn.recipients:
            log.info("discarded from={sender} to={rcpts} client={ip}: {why}",
                     sender=logged_sender(txn.sender_text), rcpts=",".join(txn.rcpt_addresses),
                     ip=self.client_ip, why="a milter discarded it" if verdict.discard
                     else "a milter removed every recipient", event="discarded")
            self._reset_transaction()
            return False, None
        lines = verdict.header_lines if verdict.header_lines is not None else txn.header_lines
        body = edits.body if edits is not None else None
        if lines is txn.header_lines and body is None:
            return True, message
        from mta.policy.milter.check import header_section

        lines, old_lines = header_section(lines), header_section(txn.header_lines)
        head = b"\r\n".join(lines) + b"\r\n" if lines else b""
        old_head = len(b"\r\n".join(old_lines) + b"\r\n") if old_lines else 0
        txn.header_lines = lines
        if writer is None:
            assert message is not None
            if body is None:
                return True, head + message[old_head:]
            return True, head + b"\r\n" + body.read()
        # On disk: the file is rewritten after our trace headers (what _collect wrote first).
        writer.rewrite(self._spill_prefix, head + (b"\r\n" if body is not None else b""),
                       self._spill_prefix + old_head, body)
        return True, None

    def _store(self, message: bytes, extra_headers: list[bytes], envelope: Envelope,
               txn: Transaction) -> Deferred[Reply]:
        try:
            writer = self._open_writer(extra_headers, buffered=True)
        except (QueueError, OSError):
            self.txn = None
            return succeed(R.QUEUE_WRITE_FAILED)
        try:
            writer.write(message)
        except OSError:
            writer.abort()
            self.txn = None
            return succeed(R.QUEUE_WRITE_FAILED)
        return self._commit(writer, envelope, txn)

    def _commit(self, writer: MessageWriter, envelope: Envelope, txn: Transaction) -> Deferred[Reply]:
        """Hand the message to the group commit through the transaction's intake
        (``writer`` is its writer); reply 250 only once it is on disk.  The
        store tells the queue runner (or a worker's announcer) on the next
        reactor turn, after the 250 has gone out."""
        envelope.id = writer.id
        self._writer = None
        self.txn = None
        d = txn.intake.commit(envelope)

        def failed(failure: Failure) -> Reply:
            failure.trap(QueueError)
            return R.QUEUE_WRITE_FAILED

        return d.addCallbacks(lambda _: self._queued(envelope, txn), failed)

    def _queued(self, envelope: Envelope, txn: Transaction) -> Reply:
        self.accepted += 1
        # Logged right after the 250 has gone out (the client need not wait for
        # it); _async_done runs this even if the client has gone meanwhile.
        self._after_reply.append(partial(
            log.info, "queued {queue_id} from={sender} to={rcpts} size={size} client={ip}",
            queue_id=envelope.id, sender=logged_sender(envelope.sender), rcpts=",".join(txn.rcpt_addresses),
            size=envelope.size, ip=self.client_ip, event="queued",
            auth=self.auth_user or "-", tls=self.tls_version or "no", kind=self.listener.kind,
        ))
        if envelope.hold:  # issue 17: the one event of the hold, with its reason
            self._after_reply.append(partial(
                log.info, "held {queue_id} in the hold queue: {reason}", queue_id=envelope.id,
                reason=envelope.hold, sender=logged_sender(envelope.sender), ip=self.client_ip,
                event="held"))
        return R.queued(envelope.id)

    def _abort_message(self) -> None:
        self._data = None
        self._chunks, self._held = [], 0
        self._prepare_after_flush = False
        for writer in (self._writer, self._ready_writer):
            if writer is not None:
                writer.abort()
        self._writer = self._ready_writer = None
        if self.phase is Phase.DATA:
            self.phase = Phase.COMMAND
