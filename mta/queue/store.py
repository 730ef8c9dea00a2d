"""The durable, maildir-style queue on disk.

Layout under the queue root::

    tmp/          files being written; anything here at start-up is left over
    msg/ID.msg    the message as received, our Received header first (CRLF lines)
    msg/ID.json   the envelope (:class:`mta.queue.envelope.Envelope`), human readable

A message is committed by: writing both files in ``tmp/``, fsyncing each
(as two parts of one group-commit operation, see :mod:`mta.queue.commit`),
renaming the data and then the envelope into ``msg/``, and fsyncing ``msg/``.
Only after that does the SMTP server reply 250.  The envelope's presence in
``msg/`` is what makes a message exist: a ``.msg`` without its ``.json`` is an
uncommitted leftover and is removed by :meth:`QueueStore.recover`.

Every later change to the envelope is an atomic rewrite (tmp, fsync, rename,
directory fsync), so a crash leaves either the old or the new state, never a
mixture.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.fsutil import fsync_dir
from mta.queue.commit import GroupCommitter
from mta.queue.envelope import Envelope, Recipient, RecipientState

log = Logger()


class QueueError(Exception):
    """Writing to the queue failed; the message was not accepted."""


def new_queue_id(now: float | None = None) -> str:
    """A unique, sortable id: seconds since the epoch (hex) and 48 random bits."""
    t = int(now if now is not None else time.time())
    return f"{t:08x}{secrets.token_hex(6)}"



class MessageWriter:
    """A message being received: data goes to ``tmp/`` until :meth:`commit`.

    ``buffered``: the data is kept in memory and the file is only created when
    the message is committed, on the group-commit thread (the SMTP session
    holds a message up to ``dkim.max_message_size`` in memory anyway); a bigger
    message is written to ``tmp/`` as it arrives.
    """

    def __init__(self, store: QueueStore, queue_id: str, buffered: bool = False) -> None:
        self.store = store
        self.id = queue_id
        self.tmp_path = store.tmp_dir / f"{queue_id}.msg"
        self.envelope_tmp_path = store.tmp_dir / f"{queue_id}.json"
        self._pending: list[bytes] | None = [] if buffered else None
        self._file: BinaryIO | None = None if buffered else open(self.tmp_path, "xb")  # noqa: SIM115
        self._open = True
        self.size = 0

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

    def commit(self, envelope: Envelope) -> None:
        """Make the message durable now. Raises :class:`QueueError`; then nothing is left."""
        self._prepare(envelope)
        try:
            self._write_data()
            self._write_envelope(envelope.to_bytes())
            self._rename()
            if self.store.fsync:
                fsync_dir(self.store.msg_dir)
        except OSError as e:
            self._undo(e)
        self.store._notify(envelope)

    def commit_async(self, envelope: Envelope) -> Deferred[None]:
        """Like :meth:`commit`, with the disk work on the group-commit thread.

        The data file and the envelope are written and fsynced as two parts of
        one operation (in order when the batch has no other operation, else at
        the same time as the other parts), then renamed into ``msg/``.  The Deferred
        fires once the message, its envelope and the directory entries are on
        disk (then listeners are told), or fails with QueueError.
        """
        self._prepare(envelope)
        data = envelope.to_bytes()
        per_file = not self.store.committer.whole_filesystem
        d = self.store.committer.submit(
            self._rename, parts=[lambda: self._write_data(per_file),
                                 lambda: self._write_envelope(data, per_file)])

        def failed(failure: Failure) -> None:
            self._undo(failure.value)

        def done(_: None) -> None:
            self.store._notify(envelope)

        return d.addCallbacks(done, failed)

    def _prepare(self, envelope: Envelope) -> None:
        assert self._open and envelope.id == self.id
        envelope.size = self.size
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self._undo(e)

    def _write_data(self, sync: bool = True) -> None:
        """The data file in tmp/: written now if buffered, fsynced (unless ``sync`` is off:
        then the caller makes it all durable at once with syncfs)."""
        self._open = False
        if self._pending is not None:
            chunks, self._pending = self._pending, None
            with open(self.tmp_path, "xb") as f:
                f.writelines(chunks)
                f.flush()
                if self.store.fsync and sync:
                    os.fsync(f.fileno())
            return
        assert self._file is not None
        if self.store.fsync and sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _write_envelope(self, envelope_bytes: bytes, sync: bool = True) -> None:
        self.store._write_file(self.envelope_tmp_path, envelope_bytes, sync=sync)

    def _rename(self) -> None:
        """Into msg/: the data first, then the envelope that makes the message exist."""
        os.rename(self.tmp_path, self.store.data_path(self.id))
        os.rename(self.envelope_tmp_path, self.store.envelope_path(self.id))

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
                  self.store.envelope_path(self.id), self.store.data_path(self.id)):
            _unlink_quietly(p)
        raise QueueError(str(error)) from error

    def abort(self) -> None:
        self._open, self._pending = False, None
        if self._file is not None:
            self._file.close()
            self._file = None
        _unlink_quietly(self.tmp_path)


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
                 reactor: Any = None, syncfs: bool = False) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.msg_dir = root / "msg"
        self.fsync = fsync
        self.clock = clock
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.committer = GroupCommitter(reactor, self.msg_dir, fsync, whole_filesystem=syncfs)
        self._listeners: list[Callable[[Envelope], None]] = []
        for d in (self.root, self.tmp_dir, self.msg_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- paths -------------------------------------------------------------

    def data_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.msg"

    def envelope_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.json"

    # --- receiving -------------------------------------------------------------

    def new_message(self, buffered: bool = False) -> MessageWriter:
        """A writer for a new message (``buffered``: see :class:`MessageWriter`)."""
        try:
            return MessageWriter(self, new_queue_id(self.clock()), buffered)
        except OSError as e:
            raise QueueError(str(e)) from e

    def subscribe(self, listener: Callable[[Envelope], None]) -> None:
        """Call ``listener(envelope)`` after each message is committed."""
        self._listeners.append(listener)

    def _notify(self, envelope: Envelope) -> None:
        for listener in self._listeners:
            try:
                listener(envelope)
            except Exception:
                log.failure("queue listener failed for {id}", id=envelope.id)

    # --- the queue's contents ---------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of committed messages, oldest first."""
        return sorted(p.name[:-5] for p in self.msg_dir.iterdir() if p.name.endswith(".json"))

    def load(self, queue_id: str) -> Envelope:
        return Envelope.from_bytes(_read_all(self.envelope_path(queue_id)))

    def envelopes(self) -> Iterator[Envelope]:
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
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

        def write() -> None:
            try:
                self._write_file(tmp, data, sync=per_file)
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
        """:meth:`remove` on the group-commit thread."""
        env, data = self.envelope_path(queue_id), self.data_path(queue_id)

        def operation() -> None:
            _unlink_quietly(env)
            _unlink_quietly(data)

        return self.committer.submit(operation)

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
        """Delete a finished message: the envelope first, so no half message remains."""
        _unlink_quietly(self.envelope_path(queue_id))
        _unlink_quietly(self.data_path(queue_id))
        if self.fsync:
            fsync_dir(self.msg_dir)

    def recover(self) -> list[str]:
        """Clean up after a crash; returns the ids of the committed messages.

        Files in ``tmp/`` were never acknowledged and are removed.  A data file
        without an envelope was not committed either.  An envelope without data
        is moved aside to ``corrupt/`` and logged: it cannot be delivered.
        """
        for p in self.tmp_dir.iterdir():
            log.info("removing leftover {name} from queue tmp/", name=p.name)
            _unlink_quietly(p)
        names = {p.name for p in self.msg_dir.iterdir()}
        for name in sorted(names):
            if name.endswith(".msg") and name[:-4] + ".json" not in names:
                log.info("removing uncommitted message {name}", name=name)
                _unlink_quietly(self.msg_dir / name)
            elif name.endswith(".json") and name[:-5] + ".msg" not in names:
                corrupt = self.root / "corrupt"
                corrupt.mkdir(exist_ok=True)
                log.error("envelope {name} has no message data; moved to corrupt/", name=name)
                os.rename(self.msg_dir / name, corrupt / name)
        return self.ids()

    def _write_file(self, path: Path, data: bytes, sync: bool = True) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync and sync:
                os.fsync(fd)
        finally:
            os.close(fd)
