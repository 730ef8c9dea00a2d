"""Writing a new message into the queue, until it is committed or aborted.

A message held in memory is committed as one file (its envelope in the
header, :mod:`mta.queue.layout`), usually into a spare (:mod:`mta.queue.spares`):
the commit writes the header and the message into it, makes it readable
(``READY``) and fsyncs it: one fsync, no new directory entry, between the
client's final dot and our 250.  Without a spare it is written in ``tmp/``,
fsynced, renamed into ``msg/`` and the directory fsynced.

A message too big to hold is written to ``tmp/`` as it arrives, without a
header; its envelope is written beside it and renamed into ``msg/`` *before*
the data, so the data's rename is the moment that message exists (replacing
the spare the message had, if it had one).

The disk work runs on the store's group-commit thread (:mod:`mta.queue.commit`).
Callers use :class:`mta.queue.intake.Intake`, which wraps a writer.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.queue.commit import Steps, run_to_end
from mta.queue.envelope import Envelope
from mta.queue.layout import READY, QueueError, envelope_header, unlink_quietly
from mta.system.fsutil import fsync_dir, start_write_out, write_all, write_out

log = Logger()


class MessageWriter:
    """A message being received, until :meth:`commit` or :meth:`abort`.

    ``buffered``: the data is kept in memory (the SMTP session holds a message
    up to ``dkim.max_message_size`` in memory anyway) and written when the
    message is committed, on the group-commit thread, with the envelope in its
    header: into the spare ``spare_made`` says the writer has (the time it was
    made), else into a new file in ``tmp/``.  A bigger message is written to
    ``tmp/`` as it arrives, and its envelope goes in a file beside it.
    ``store`` is the :class:`~mta.queue.store.QueueStore` that made the writer
    (not imported here: the store imports this module).
    """

    def __init__(self, store: Any, queue_id: str, buffered: bool = False,
                 spare_made: float | None = None) -> None:
        self.store = store
        self.id = queue_id
        self.tmp_path = store.tmp_dir / f"{queue_id}.msg"
        self.envelope_tmp_path = store.tmp_dir / f"{queue_id}.json"
        self._pending: list[bytes] | None = []
        self._file: BinaryIO | None = None
        self._open = True
        self._embedded = False  # the data file carries the envelope in its header
        self._spare_made = spare_made  # msg/ID.msg is our spare, unused so far
        self._over_spare = False  # spilled: the data's rename replaces our spare
        self.size = 0
        if not buffered:
            self.spill()

    def write(self, data: bytes) -> None:
        assert self._open
        if self._pending is not None:
            self._pending.append(data)
        else:
            assert self._file is not None
            self._file.write(data)
        self.size += len(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def spill(self) -> None:
        """Create the file in tmp/ now, with what is held, and write the rest to it
        as it arrives (an unbuffered writer does this at once; a buffered one when
        its message outgrows memory)."""
        if self._pending is None:
            return
        if self._spare_made is not None:
            self._spare_made, self._over_spare = None, True
        self._file = open(self.tmp_path, "xb")  # noqa: SIM115 - closed by commit or abort
        chunks, self._pending = self._pending, None
        self._file.writelines(chunks)

    def flush(self) -> None:
        """What was written so far into the file in tmp/ (spilled), for a reader of it."""
        if self._file is not None:
            self._file.flush()

    def rewrite(self, keep: int, middle: bytes, rest_from: int, rest: BinaryIO | None = None) -> None:
        """Change a spilled message's file (a milter's header and body changes): its
        first ``keep`` octets, then ``middle``, then the old file from ``rest_from``
        or else ``rest`` (a replacement body), copied in blocks, never held whole."""
        assert self._open and self._file is not None, "only a spilled message is rewritten"
        self._file.flush()
        new_path = self.tmp_path.with_name(self.tmp_path.name + ".new")
        try:
            with open(self.tmp_path, "rb") as old, open(new_path, "xb") as new:
                new.write(old.read(keep))
                new.write(middle)
                if rest is None:
                    old.seek(rest_from)
                    rest = old
                shutil.copyfileobj(rest, new, 1 << 16)
            self._file.close()
            os.replace(new_path, self.tmp_path)
        except BaseException:
            unlink_quietly(new_path)
            raise
        self._file = open(self.tmp_path, "ab")  # noqa: SIM115 - closed by commit or abort
        self.size = os.path.getsize(self.tmp_path)

    def commit(self, envelope: Envelope) -> None:
        """Make the message durable now. Raises :class:`QueueError`; then nothing is left."""
        self._prepare(envelope)
        data = envelope.to_bytes()
        in_spare = self._spare_made is not None
        try:
            run_to_end(self._write_data(envelope=data))
            if not self._embedded:
                run_to_end(self._write_envelope(data))
            self._rename()
            if self.store.fsync and not in_spare:
                fsync_dir(self.store.msg_dir)
        except OSError as e:
            self._undo(e)
        self.store.announce(envelope)

    def commit_async(self, envelope: Envelope) -> Deferred[None]:
        """Like :meth:`commit`, with the disk work on the group-commit thread.
        The store tells its listeners on the next reactor turn
        (:meth:`mta.queue.store.QueueStore.announce`), for every commit alike.

        A buffered message is one file (its envelope in the header), written
        and fsynced as the one part of the operation: into its spare, which
        needs no directory fsync, else in ``tmp/``.  A message already in
        ``tmp/`` and its envelope file are two parts.  The parts of a batch's
        operations are written together, a step at a time (mta.queue.commit).
        What is in ``tmp/`` is then renamed into ``msg/``.  The Deferred fires
        once the message, its envelope and the directory entries are on disk
        (then listeners are told), or fails with QueueError.
        """
        self._prepare(envelope)
        data = envelope.to_bytes()
        per_file = not self.store.committer.whole_filesystem
        if self._pending is not None:
            parts = [lambda: self._write_data(per_file, envelope=data)]
        else:
            parts = [lambda: self._write_data(per_file),
                     lambda: self._write_envelope(data, per_file)]
        in_spare = self._spare_made is not None
        d = self.store.committer.submit(self._rename, parts=parts, sync_directory=not in_spare)

        def failed(failure: Failure) -> None:
            self._undo(failure.value)

        def done(_: None) -> None:
            self.store.announce(envelope)

        return d.addCallbacks(done, failed)

    def _prepare(self, envelope: Envelope) -> None:
        assert self._open and envelope.id == self.id
        envelope.size = self.size
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self._undo(e)

    def _write_data(self, sync: bool = True, envelope: bytes = b"") -> Steps:
        """The data file: written now if buffered (``envelope`` in its header),
        into the spare or in tmp/, and fsynced (unless ``sync`` is off: then the
        caller makes it all durable at once with syncfs).  A generator: it
        yields where it would wait for the disk, with the descriptor to fsync
        when there is one (see mta.queue.commit)."""
        self._open = False
        if self._pending is not None:
            chunks, self._pending = self._pending, None
            if self._spare_made is not None:
                yield from self._write_spare([envelope_header(envelope), *chunks], sync)
                return
            with open(self.tmp_path, "xb") as f:
                self._embedded = True
                f.write(envelope_header(envelope))
                f.writelines(chunks)
                f.flush()
                if self.store.fsync and sync:
                    yield f.fileno()  # fsynced by the committer, with the batch's other files
            return
        assert self._file is not None
        if self.store.fsync and sync:
            yield self._file.fileno()
        self._file.close()
        self._file = None

    def _write_spare(self, chunks: list[bytes], sync: bool) -> Steps:
        """Fill our spare in msg/ and make it a message (``READY``), durably; in
        steps (see :meth:`_write_data`)."""
        self._embedded = True
        fd = os.open(self.store.data_path(self.id), os.O_WRONLY | os.O_CLOEXEC)
        try:
            data = b"".join(chunks)
            write_all(fd, data)
            os.ftruncate(fd, len(data))  # a recycled spare: the end of what it held before
            if self.store.fsync:
                # The data on disk before the READY mode can be (a journal commit
                # of someone else's could carry the chmod before our fsync).
                start_write_out(fd)
                yield  # the disk writes this while the batch's other files are written
                write_out(fd)
            os.fchmod(fd, READY)
            if self.store.fsync and sync:
                yield fd  # fsynced by the committer once the batch's files all have their mode
            if os.fstat(fd).st_nlink == 0:
                # Removed meanwhile (a recovery run by a second instance): not queued.
                raise OSError(errno.ENOENT, "spare queue file removed while being written",
                              str(self.store.data_path(self.id)))
        finally:
            os.close(fd)

    def _write_envelope(self, envelope_bytes: bytes, sync: bool = True) -> Steps:
        return self.store._write_file_steps(self.envelope_tmp_path, envelope_bytes, sync=sync)

    def _rename(self) -> None:
        """Into msg/: the envelope file first (if any), then the data, whose
        arrival makes the message exist (a spare became the message in place)."""
        if self._spare_made is not None:
            return
        if not self._embedded:
            os.rename(self.envelope_tmp_path, self.store.envelope_path(self.id))
        os.rename(self.tmp_path, self.store.data_path(self.id))

    def _undo(self, error: BaseException) -> None:
        log.error("queue write failed for {id}: {err}", id=self.id, err=error)
        self._open, self._pending = False, None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        for p in (self.tmp_path, self.envelope_tmp_path,
                  self.store.data_path(self.id), self.store.envelope_path(self.id)):
            unlink_quietly(p)
        raise QueueError(str(error)) from error

    def abort(self) -> None:
        """Drop the message: an unused spare goes back to the store's pool."""
        unused = self._open and self._pending is not None
        self._open, self._pending = False, None
        if self._file is not None:
            self._file.close()
            self._file = None
        unlink_quietly(self.tmp_path)
        if self._spare_made is not None and unused:
            self.store._give_back_spare(self.id, self._spare_made)
        elif self._spare_made is not None or self._over_spare:
            unlink_quietly(self.store.data_path(self.id))  # no fsync: recovery removes it anyway
        self._spare_made = None
