"""The durable, maildir-style queue on disk.

Layout under the queue root::

    tmp/          files being written; anything here at start-up is left over
    msg/ID.msg    the message: its envelope first (see below), then the message
                  as received, our Received header first (CRLF lines)
    msg/ID.json   the envelope's current state, once it has changed (readable JSON)

**A message exists if and only if ``msg/ID.msg`` does and is readable.**  Its envelope
(:class:`mta.queue.envelope.Envelope`) is ``msg/ID.json`` when that file is
there, else the one embedded at the start of ``ID.msg``::

    mta-envelope 812        <- the length of the JSON that follows, in octets (LF)
    { "id": ..., ... }      <- the envelope as accepted, readable JSON (LF)
    Received: ...           <- the message (CRLF lines)

A message held in memory (most mail) is committed as that one file, and
usually into a *spare*: an empty file the store made in ``msg/`` ahead of
time, under a fresh queue id, write-only (mode ``RECEIVING``, 0200, as
Postfix marks an unfinished queue file by its mode), in batches whose
directory entries one directory fsync made durable (a group commit,
:mod:`mta.queue.commit`, on the thread that also removes finished messages,
so that making them never delays a commit).  The commit writes the header
and the message into the spare, makes it readable (``READY``, 0600) and
fsyncs it: one fsync, no new directory entry, between the client's final dot
and our 250.  Without a spare (the first message after start-up, a burst
that emptied the pool), it is written in ``tmp/``, fsynced, renamed into
``msg/`` and the directory fsynced.  A file in mode ``RECEIVING`` is not a
message: readers treat it as absent (:class:`MessageNotReady`) and
:meth:`QueueStore.recover` removes it.

A message too big to hold is written to ``tmp/`` as it arrives, without a
header; its envelope is written beside it and renamed into ``msg/`` *before*
the data, so the data's rename is the moment that message exists (replacing
the spare the message had, if it had one).

Every later change to the envelope is an atomic rewrite of ``ID.json`` (tmp,
fsync, rename, directory fsync), so a crash leaves either the old or the new
state, never a mixture.  A finished message is removed data first: once
``ID.msg`` is gone the message is, and an ``ID.json`` left by a crash is
cleaned up by :meth:`QueueStore.recover`.  While spares are wanted, the data
file of a finished message is not unlinked but recycled into the next spare
(made ``RECEIVING``, then renamed to a fresh id): the blocks and the inode
are reused, and a commit into it cuts it to the new message's length.  A
file whose embedded envelope names another id than its own is such a spare
(:meth:`QueueStore.recover` removes it).

Readers of the message data open it with :func:`open_message`, which skips
the envelope header; a file without one (a big message, or a queue written
by an older version) starts with the message.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.queue.commit import GroupCommitter, Steps, run_to_end
from mta.queue.envelope import Envelope, Recipient, RecipientState
from mta.system.fsutil import fsync_dir, start_write_out, write_all, write_out

log = Logger()


class QueueError(Exception):
    """Writing to the queue failed; the message was not accepted."""


def new_queue_id(now: float | None = None) -> str:
    """A unique, sortable id: seconds since the epoch (hex) and 48 random bits."""
    t = int(now if now is not None else time.time())
    return f"{t:08x}{secrets.token_hex(6)}"


# A file in msg/ that is not (yet) a message: a spare, or one whose commit never
# ended.  Write-only, so the owner cannot even open it for reading (root can:
# every reader checks the mode).  A commit makes it READY, the mode every
# queue file has always had, so older queues read as they are.
RECEIVING = 0o200
READY = 0o600
# Spares: made SPARE_BATCH at a time (one directory fsync for the batch) when
# fewer than SPARE_LOW are left; one older than SPARE_MAX_AGE seconds is
# dropped rather than used, so a queue id's time stays within a minute of
# the message's arrival.
SPARE_BATCH = 32
SPARE_LOW = 16
SPARE_MAX_AGE = 60.0
# A finished message's file becomes a spare (see QueueStore.remove_async) while
# a process keeps fewer than SPARE_KEEP of them.
SPARE_KEEP = 2 * SPARE_BATCH
# How long a removal may wait for others to share its directory sync (seconds):
# a crash in that time delivers those messages again, as one just before the
# sync would.
REMOVAL_LINGER = 0.02


class MessageNotReady(FileNotFoundError):
    """A file in msg/ that is no message: a spare, or a message still being
    committed (or whose commit a crash cut short: recovery removes it)."""


def _is_ready(mode: int) -> bool:
    return bool(mode & stat.S_IRUSR)


def _open_ready(path: Path) -> int:
    """A descriptor for reading the queue file ``path``: MessageNotReady if it is
    not a message (yet), FileNotFoundError if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        if not _is_ready(os.stat(path).st_mode):
            raise MessageNotReady(errno.ENOENT, "not a message (yet)", str(path)) from None
        raise
    if not _is_ready(os.fstat(fd).st_mode):
        os.close(fd)
        raise MessageNotReady(errno.ENOENT, "not a message (yet)", str(path))
    return fd


# The first line of a queue file that carries its envelope.
ENVELOPE_MAGIC = b"mta-envelope "
# Longest first line we look for: the magic and a length of up to 12 digits.
_MAGIC_LINE_MAX = len(ENVELOPE_MAGIC) + 13
_FIRST_READ = 65536


def _read_up_to(fd: int, first: bytes, want: int) -> bytes:
    """``first`` and what follows it in ``fd``: ``want`` octets in all, fewer only
    where the file ends."""
    parts = [first[:want]]
    size = len(parts[0])
    while size < want:  # ends: each read advances, or the file ends
        chunk = os.read(fd, min(want - size, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def envelope_header(envelope_bytes: bytes) -> bytes:
    """What goes before the message in a one-file queue entry."""
    return ENVELOPE_MAGIC + b"%d\n" % len(envelope_bytes) + envelope_bytes


def _parse_header(head: bytes) -> tuple[int, int] | None:
    """(start, end) of the embedded envelope's JSON in a file starting with ``head``,
    or None if the file has no envelope header.  ValueError if it is malformed."""
    if not head.startswith(ENVELOPE_MAGIC):
        return None
    newline = head.find(b"\n", 0, _MAGIC_LINE_MAX)
    digits = head[len(ENVELOPE_MAGIC):newline]
    if newline < 0 or not digits.isdigit():
        raise ValueError("malformed envelope header")
    return newline + 1, newline + 1 + int(digits)


def read_embedded_envelope(path: Path) -> bytes | None:
    """The envelope JSON at the start of the queue file ``path``, or None if it has none.
    MessageNotReady for a file that is no message (yet)."""
    fd = _open_ready(path)
    try:
        head = os.read(fd, _FIRST_READ)
        span = _parse_header(head)
        if span is None:
            return None
        start, end = span
        envelope = _read_up_to(fd, head[start:end], end - start)
        if len(envelope) < end - start:
            raise ValueError("truncated envelope header")
        return envelope
    finally:
        os.close(fd)


def read_message_start(path: Path, limit: int) -> bytes:
    """The first ``limit`` octets of a queued message (fewer only at its end), past
    its envelope header; with plain os calls, for the common small message read
    whole (no file object: Python's ``open`` adds an fstat, a tty check and seeks).
    Raises OSError (EIO for a malformed header, MessageNotReady for no message)."""
    fd = _open_ready(path)
    try:
        head = os.read(fd, max(limit, _FIRST_READ))
        try:
            span = _parse_header(head)
        except ValueError as e:
            raise OSError(errno.EIO, str(e), str(path)) from None
        start = 0 if span is None else span[1]
        if start > len(head):  # an envelope longer than the first read
            os.lseek(fd, start, os.SEEK_SET)
            head, start = b"", 0
        return _read_up_to(fd, head[start:], limit)
    finally:
        os.close(fd)


def open_message(path: Path, buffering: int = -1) -> BinaryIO:
    """Open a queued message for reading, positioned at its first octet (past the
    envelope header if it has one).  Raises OSError (EIO for a malformed header,
    MessageNotReady for a file that is no message yet)."""
    f = open(_open_ready(path), "rb", buffering=buffering)  # noqa: SIM115 - the caller closes it
    try:
        span = _parse_header(f.read(_MAGIC_LINE_MAX))
        f.seek(0 if span is None else span[1])
    except ValueError as e:
        f.close()
        raise OSError(errno.EIO, str(e), str(path)) from None
    except BaseException:
        f.close()
        raise
    return f



class MessageWriter:
    """A message being received, until :meth:`commit` or :meth:`abort`.

    ``buffered``: the data is kept in memory (the SMTP session holds a message
    up to ``dkim.max_message_size`` in memory anyway) and written when the
    message is committed, on the group-commit thread, with the envelope in its
    header: into the spare ``spare_made`` says the writer has (the time it was
    made), else into a new file in ``tmp/``.  A bigger message is written to
    ``tmp/`` as it arrives, and its envelope goes in a file beside it.
    """

    def __init__(self, store: QueueStore, queue_id: str, buffered: bool = False,
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

    def commit_async(self, envelope: Envelope, tell: bool = True) -> Deferred[None]:
        """Like :meth:`commit`, with the disk work on the group-commit thread.
        The store tells its listeners on the next reactor turn
        (:meth:`QueueStore.announce`).  ``tell=False`` is the SMTP session's
        until it commits through :class:`mta.queue.intake.Intake`: it calls
        :meth:`QueueStore.notify` itself once its 250 has gone out.

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
            if tell:
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
            _unlink_quietly(p)
        raise QueueError(str(error)) from error

    def abort(self) -> None:
        """Drop the message: an unused spare goes back to the store's pool."""
        unused = self._open and self._pending is not None
        self._open, self._pending = False, None
        if self._file is not None:
            self._file.close()
            self._file = None
        _unlink_quietly(self.tmp_path)
        if self._spare_made is not None and unused:
            self.store._give_back_spare(self.id, self._spare_made)
        elif self._spare_made is not None or self._over_spare:
            _unlink_quietly(self.store.data_path(self.id))  # no fsync: recovery removes it anyway
        self._spare_made = None



def _message_files(msg_dir: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, path, stat) of each ``*.msg`` file in ``msg_dir``, skipping any
    removed while the directory is read."""
    with os.scandir(msg_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".msg"):
                try:
                    yield entry.name, entry.path, entry.stat()
                except FileNotFoundError:
                    continue


def _read_all(path: Path) -> bytes:
    """A small file's bytes with plain os calls (no buffered file object: Python's
    ``open`` adds an fstat, a tty check and a seek to every read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def list_ids(msg_dir: Path) -> list[str]:
    """Ids of the committed messages in a queue's ``msg/``, oldest first (not the
    spares nor files being committed: one stat each tells them apart)."""
    return sorted(name[:-4] for name, _, st in _message_files(msg_dir) if _is_ready(st.st_mode))


def is_queued(msg_dir: Path, queue_id: str) -> bool:
    """Whether ``queue_id`` is a message in ``msg_dir`` (its data file is there and
    readable: not a spare, nor a commit still going on)."""
    try:
        return _is_ready(os.stat(msg_dir / f"{queue_id}.msg").st_mode)
    except FileNotFoundError:
        return False


def load_envelope(msg_dir: Path, queue_id: str) -> Envelope:
    """A message's envelope: its state file if it has one, else its header.

    FileNotFoundError if the message is not (or no longer) queued; ValueError,
    KeyError or TypeError if the envelope cannot be read."""
    data_path = msg_dir / f"{queue_id}.msg"
    try:
        state = _read_all(msg_dir / f"{queue_id}.json")
    except FileNotFoundError:
        pass
    else:
        os.stat(data_path)  # a state file left by a removal is not a message
        return Envelope.from_bytes(state)
    embedded = read_embedded_envelope(data_path)
    if embedded is None:
        raise ValueError(f"message {queue_id} has no envelope")
    return Envelope.from_bytes(embedded)


def _embedded_id(envelope_json: bytes) -> str | None:
    """The queue id an embedded envelope names, or None if it cannot be read."""
    try:
        found = json.loads(envelope_json).get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove {path}: {err}", path=str(path), err=e)


class QueueStore:
    """The queue directory. All methods are synchronous and fsync as they go."""

    def __init__(self, root: Path, fsync: bool = True, clock: Callable[[], float] = time.time,
                 reactor: Any = None, syncfs: bool = False, spares: bool = True) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.msg_dir = root / "msg"
        self.fsync = fsync
        self.clock = clock
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.committer = GroupCommitter(reactor, self.msg_dir, fsync, whole_filesystem=syncfs)
        # Removals of finished messages and the making of spares have a
        # group-commit thread of their own: an unlink can wait for the disk (ext4
        # mounted with "discard" trims the freed blocks at once), making 32 new
        # files takes milliseconds (ext4 searches for free inodes), and a new
        # message's 250 must wait behind neither.
        # Nobody waits for a removal, so its batch lingers (REMOVAL_LINGER) to
        # share one directory sync with more of them.
        self.remover = GroupCommitter(reactor, self.msg_dir, fsync, whole_filesystem=syncfs,
                                      name="queue-files", linger=REMOVAL_LINGER)
        self.reactor = reactor
        self._listeners: list[Callable[[Envelope], None]] = []
        self._announced: list[Envelope] = []  # committed this turn, told on the next
        self.spares = spares
        self._spares: deque[tuple[str, float]] = deque()  # (queue id, when made), oldest first
        self._refilling = False
        self._making: set[str] = set()  # ids of a batch of spares being made
        self._closed = False  # discard_spares() was called: no more spares
        self._recycling = 0  # finished messages' files on their way into our pool
        self._recycled_pending: set[str] = set()  # ids of spares being recycled, any taker
        # Set by the main process's worker pool: a function giving where a
        # recycled spare should go (a worker that needs spares), or None.
        self.spare_outlet: Callable[[], Callable[[str | None], None] | None] | None = None
        for d in (self.root, self.tmp_dir, self.msg_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- paths -------------------------------------------------------------

    def data_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.msg"

    def envelope_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.json"

    # --- receiving -------------------------------------------------------------

    def new_message(self, buffered: bool = False) -> MessageWriter:
        """A writer for a new message (``buffered``: see :class:`MessageWriter`; it
        gets a spare if one is ready)."""
        if buffered and self.spares:
            spare = self._take_spare()
            if spare is not None:
                return MessageWriter(self, spare[0], buffered, spare_made=spare[1])
        try:
            return MessageWriter(self, new_queue_id(self.clock()), buffered)
        except OSError as e:
            raise QueueError(str(e)) from e

    # --- spares: empty files made ahead of time (see the module docstring) -----------

    def prepare_spares(self) -> None:
        """Start making spares now (at start-up, after :meth:`recover`)."""
        self._closed = False
        if self.spares:
            self._refill()

    def spare_count(self) -> int:
        return len(self._spares)

    def making_spares(self) -> bool:
        """Whether a batch of spares is being made (on the ``remover``'s thread)."""
        return self._refilling

    def _take_spare(self) -> tuple[str, float] | None:
        now = self.clock()
        stale = []
        spare = None
        while self._spares:  # bounded: each pass takes one out
            queue_id, made = self._spares.popleft()
            if now - made <= SPARE_MAX_AGE:
                spare = (queue_id, made)
                break
            stale.append(queue_id)
        if stale:
            # No fsync: a removed spare that a crash brings back is removed by recovery.
            self.remover.submit(lambda: self._unlink_all(stale), sync_directory=False)
        self._refill()
        return spare

    def _give_back_spare(self, queue_id: str, made: float) -> None:
        self._spares.appendleft((queue_id, made))

    def _refill(self) -> None:
        """Make SPARE_BATCH spares, on the ``remover``'s thread with one directory
        fsync for all, when fewer than SPARE_LOW are left."""
        if self._refilling or self._closed or len(self._spares) >= SPARE_LOW:
            return
        self._refilling = True
        made_at = self.clock()
        ids = [new_queue_id(made_at) for _ in range(SPARE_BATCH)]
        self._making.update(ids)
        made: list[str] = []

        def make() -> None:
            for queue_id in ids:
                fd = os.open(self.data_path(queue_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, RECEIVING)
                os.close(fd)
                made.append(queue_id)

        def done(_: None) -> None:
            self._refilling = False
            self._making.difference_update(ids)
            if self._closed:
                self._unlink_all(made)
            else:
                self._spares.extend((queue_id, made_at) for queue_id in made)

        def failed(failure: Failure) -> None:
            self._refilling = False
            self._making.difference_update(ids)
            log.warn("could not make spare queue files: {err}", err=failure.getErrorMessage())
            self._unlink_all(made)

        self.remover.submit(make).addCallbacks(done, failed)

    def sweep_unfinished(self, older_than: float) -> int:
        """Remove files in msg/ still in mode ``RECEIVING`` whose last change is more
        than ``older_than`` seconds ago: spares of a process that died (its own
        are removed at shutdown, everyone's at the next start).  Past
        SPARE_MAX_AGE no process uses its spare any more, and one taken by a
        session is written or given up within the session's lifetime, so with
        ``older_than`` above both nothing live goes (a commit that still found
        its file gone would fail with 451, never lose a message).  Returns how
        many were removed."""
        limit = self.clock() - older_than
        removed = 0
        for _, path, st in _message_files(self.msg_dir):
            if not _is_ready(st.st_mode) and st.st_mtime < limit:
                _unlink_quietly(Path(path))
                removed += 1
        return removed

    def _unlink_all(self, ids: list[str]) -> None:
        for queue_id in ids:
            _unlink_quietly(self.data_path(queue_id))

    def discard_spares(self) -> None:
        """At shutdown: make no more spares and remove the unused ones, also those
        of a batch still being made and the finished messages' files being
        recycled (waits for the group-commit threads to finish what they were
        given).  No fsync: recovery removes any a crash brought back."""
        self._closed = True
        self.committer.stop()
        self.remover.stop()
        spares, self._spares = list(self._spares), deque()
        self._unlink_all([queue_id for queue_id, _ in spares] + sorted(self._making)
                         + sorted(self._recycled_pending))
        self._making.clear()
        self._recycled_pending.clear()

    def subscribe(self, listener: Callable[[Envelope], None]) -> None:
        """Call ``listener(envelope)`` after each message is committed."""
        self._listeners.append(listener)

    def announce(self, envelope: Envelope) -> None:
        """``envelope``'s message is durably committed: tell the listeners on the
        next reactor turn, never on the committer's stack (a runner that queued
        a notice is not re-entered while it runs).  The commits of one turn are
        told in one call, in commit order."""
        if not self._announced:
            self.reactor.callLater(0, self._tell_announced)
        self._announced.append(envelope)

    def _tell_announced(self) -> None:
        envelopes, self._announced = self._announced, []
        for envelope in envelopes:
            self.notify(envelope)

    def notify(self, envelope: Envelope) -> None:
        """Tell the listeners now that ``envelope``'s message is committed (the
        SMTP session's way, after its 250; everything else goes through
        :meth:`announce`)."""
        for listener in self._listeners:
            try:
                listener(envelope)
            except Exception:
                log.failure("queue listener failed for {id}", id=envelope.id)

    # --- the queue's contents ---------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of committed messages, oldest first."""
        return list_ids(self.msg_dir)

    def exists(self, queue_id: str) -> bool:
        """Whether the message is queued (its data file is in ``msg/``, readable)."""
        return is_queued(self.msg_dir, queue_id)

    def load(self, queue_id: str) -> Envelope:
        """The envelope: FileNotFoundError if the message is gone, ValueError (or
        KeyError, TypeError) if it cannot be read."""
        return load_envelope(self.msg_dir, queue_id)

    def envelopes(self) -> Iterator[Envelope]:
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except FileNotFoundError:
                continue  # removed meanwhile
            except (OSError, ValueError, KeyError) as e:
                log.error("cannot read envelope {id}: {err}", id=queue_id, err=e)

    def save(self, envelope: Envelope) -> None:
        """Atomically replace the envelope on disk (tmp, fsync, rename, dir fsync)."""
        tmp = self.tmp_dir / f"{envelope.id}.json.{secrets.token_hex(4)}"
        try:
            self._write_file(tmp, envelope.to_bytes())
            os.rename(tmp, self.envelope_path(envelope.id))
            if self.fsync:
                fsync_dir(self.msg_dir)
        except OSError:
            _unlink_quietly(tmp)
            raise

    def save_async(self, envelope: Envelope) -> Deferred[None]:
        """:meth:`save` on the group-commit thread; fires once the new state is on disk."""
        data = envelope.to_bytes()
        tmp = self.tmp_dir / f"{envelope.id}.json.{secrets.token_hex(4)}"
        path = self.envelope_path(envelope.id)
        per_file = not self.committer.whole_filesystem

        def write() -> Steps:
            try:
                yield from self._write_file_steps(tmp, data, sync=per_file)
            except OSError:
                _unlink_quietly(tmp)
                raise

        def rename() -> None:
            try:
                os.rename(tmp, path)
            except OSError:
                _unlink_quietly(tmp)
                raise

        return self.committer.submit(rename, parts=[write])

    def remove_async(self, queue_id: str) -> Deferred[None]:
        """:meth:`remove` on the removals' group-commit thread (``remover``): the
        message is gone and the directory synced when the Deferred fires, at
        most REMOVAL_LINGER later than it could (removals share their syncs).
        The caller awaits any earlier write of the message's state first.

        While spares are wanted (here, or by a worker process: ``spare_outlet``)
        the data file is not unlinked but *recycled*: made ``RECEIVING``,
        renamed to a fresh queue id, its time stamp set to now, and handed over
        as a spare (its state file, if any, is removed).  The rename is the
        moment the message is gone, as the unlink was.  An unlink and the
        making of a new file cost ext4 an inode and its blocks freed (trimmed
        at once on a disk mounted with ``discard``) and allocated again; a
        rename keeps both, and the next message overwrites the same blocks.
        A recycled file still holds the old message until it is overwritten:
        in mode ``RECEIVING`` it is no message to any reader, and its embedded
        envelope names the old id, which :meth:`recover` checks."""
        taker = self._spare_taker()
        if taker is None:
            return self.remover.submit(lambda: self._remove_files(queue_id), may_wait=True)
        spare_id = new_queue_id(self.clock())
        recycled: list[str] = []
        self._recycled_pending.add(spare_id)  # discard_spares removes it if still here

        def recycle() -> None:
            if self._recycle_file(queue_id, spare_id):
                recycled.append(spare_id)

        def hand_over(result: Any) -> Any:
            self._recycled_pending.discard(spare_id)
            taker(spare_id if recycled else None)  # None: removed instead, no spare
            return result

        return self.remover.submit(recycle, may_wait=True).addBoth(hand_over)

    def _recycle_file(self, queue_id: str, spare_id: str) -> bool:
        """Make ``queue_id``'s data file the spare ``spare_id`` (on the remover's
        thread); whether it did.  If it cannot, the message is removed."""
        path = self.data_path(queue_id)
        try:
            os.chmod(path, RECEIVING)  # no message any more, to any reader
            os.rename(path, self.data_path(spare_id))
            os.utime(self.data_path(spare_id))  # a spare's age counts from now (sweep_unfinished)
        except OSError:
            self._remove_files(queue_id)
            _unlink_quietly(self.data_path(spare_id))
            return False
        _unlink_quietly(self.envelope_path(queue_id))
        return True

    def _spare_taker(self) -> Callable[[str | None], None] | None:
        """Where the spare a finished message's file would become goes: a worker
        process that needs spares (``spare_outlet``), else our own pool while it
        holds fewer than SPARE_KEEP; None: nobody wants one (then the file is
        removed).  The taker is called once, with the spare's id, or with None
        if the file could not be recycled."""
        if not self.spares or self._closed:
            return None
        if self.spare_outlet is not None:
            outlet = self.spare_outlet()
            if outlet is not None:
                return outlet
        if len(self._spares) + self._recycling >= SPARE_KEEP:
            return None
        self._recycling += 1
        return self._take_recycled

    def _take_recycled(self, spare_id: str | None) -> None:
        self._recycling -= 1
        if spare_id is not None:
            self.add_spares([spare_id])

    def add_spares(self, ids: list[str]) -> None:
        """Spares made elsewhere (a recycled file, here or in the main process)
        join the pool as made now; those that would take it past SPARE_KEEP +
        SPARE_BATCH, or come after :meth:`discard_spares`, are removed instead."""
        now = self.clock()
        extra = []
        for spare_id in ids:
            if self._closed or len(self._spares) >= SPARE_KEEP + SPARE_BATCH:
                extra.append(spare_id)
            else:
                self._spares.append((spare_id, now))
        if extra and self._closed:  # shutting down: the remover's thread is stopped
            self._unlink_all(extra)
        elif extra:
            # No fsync: a removed spare that a crash brings back is removed by recovery.
            self.remover.submit(lambda: self._unlink_all(extra), sync_directory=False)

    def update_recipient(self, envelope: Envelope, recipient: Recipient, state: RecipientState,
                         reply: str = "", next_attempt: float = 0.0, remote_mta: str = "") -> None:
        """Record one attempt's result for ``recipient`` and write the envelope."""
        recipient.state = state
        recipient.last_reply = reply
        recipient.next_attempt = next_attempt
        recipient.updated = self.clock()
        if remote_mta:
            recipient.remote_mta = remote_mta
        self.save(envelope)

    def remove(self, queue_id: str) -> None:
        """Delete a finished message: the data first (then the message is gone), then
        its state file, which :meth:`recover` would remove if a crash left it."""
        self._remove_files(queue_id)
        if self.fsync:
            fsync_dir(self.msg_dir)

    def _remove_files(self, queue_id: str) -> None:
        """The data first (then the message is gone), then the state file."""
        _unlink_quietly(self.data_path(queue_id))
        _unlink_quietly(self.envelope_path(queue_id))

    def recover(self) -> list[str]:
        """Clean up after a crash; returns the ids of the committed messages.

        Files in ``tmp/`` were never acknowledged and are removed, and so are
        files in ``msg/`` still in mode ``RECEIVING``: spares, and messages
        whose commit never ended (so no 250 was given for them).  A state file
        without its message was left by a removal (or by a commit that never
        got to rename the data) and is removed.  A message file with neither an
        envelope header nor a state file is a leftover of an older version's
        unfinished commit and is removed too.  A message whose envelope cannot
        be read is moved aside to ``corrupt/`` and logged.
        """
        for p in self.tmp_dir.iterdir():
            log.info("removing leftover {name} from queue tmp/", name=p.name)
            _unlink_quietly(p)
        self._spares.clear()
        names = set()
        unfinished = 0
        with os.scandir(self.msg_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".msg") and not _is_ready(entry.stat().st_mode):
                    _unlink_quietly(Path(entry.path))  # its state file, if any, goes below
                    unfinished += 1
                else:
                    names.add(entry.name)
        if unfinished:
            log.info("removed {count} spare or unfinished files from queue msg/", count=unfinished)
        for name in sorted(names):
            if name.endswith(".json") and name[:-5] + ".msg" not in names:
                log.info("removing state file {name} of a message no longer queued", name=name)
                _unlink_quietly(self.msg_dir / name)
            elif name.endswith(".msg") and name[:-4] + ".json" not in names:
                try:
                    embedded = read_embedded_envelope(self.msg_dir / name)
                except ValueError:
                    embedded = b""
                except OSError as e:
                    log.error("cannot read {name}: {err}", name=name, err=e)
                    continue
                if embedded is None:
                    log.info("removing uncommitted message {name}", name=name)
                    _unlink_quietly(self.msg_dir / name)
                elif embedded and (old := _embedded_id(embedded)) not in (None, name[:-4]):
                    # A finished message's file recycled as a spare (remove_async),
                    # whose RECEIVING mode a crash lost while its rename survived.
                    log.info("removing {name}: a recycled spare still holding message {old}",
                             name=name, old=old)
                    _unlink_quietly(self.msg_dir / name)
                elif not embedded:
                    corrupt = self.root / "corrupt"
                    corrupt.mkdir(exist_ok=True)
                    log.error("message {name} has a malformed envelope header; moved to corrupt/",
                              name=name)
                    os.rename(self.msg_dir / name, corrupt / name)
        return self.ids()

    def _write_file(self, path: Path, data: bytes, sync: bool = True) -> None:
        run_to_end(self._write_file_steps(path, data, sync))

    def _write_file_steps(self, path: Path, data: bytes, sync: bool = True) -> Steps:
        """Write a new file and fsync it: a generator that yields the descriptor
        to fsync (see mta.queue.commit)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            if self.fsync and sync:
                yield fd  # fsynced by the committer, with the batch's other files
        finally:
            os.close(fd)
