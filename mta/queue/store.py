"""The durable, maildir-style queue on disk: :class:`QueueStore`.

The store's concerns are split: the layout and file format, and the handle
readers get, in :mod:`mta.queue.layout`; writing a new message in
:mod:`mta.queue.writer` (callers use :class:`mta.queue.intake.Intake`); the
pool of spare files in :mod:`mta.queue.spares`.  Here: the directories, the
listeners told of each commit, reading, saving and removing envelopes, and
recovery after a crash.

Every later change to the envelope is an atomic rewrite of ``ID.json`` (tmp,
fsync, rename, directory fsync), so a crash leaves either the old or the new
state, never a mixture.  A finished message is removed data first: once
``ID.msg`` is gone the message is, and an ``ID.json`` left by a crash is
cleaned up by :meth:`QueueStore.recover`.  While spares are wanted the data
file is recycled into a spare instead of unlinked (:mod:`mta.queue.spares`).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mta.queue.commit import GroupCommitter, Steps, run_to_end
from mta.queue.envelope import Envelope, Recipient, RecipientState
from mta.queue.layout import (
    RECEIVING,
    QueuedMessage,
    QueueError,
    embedded_id,
    is_queued,
    is_ready,
    list_ids,
    load_envelope,
    new_queue_id,
    read_embedded_envelope,
    unlink_quietly,
)
from mta.queue.spares import SpareOutlet, SparePool
from mta.queue.writer import MessageWriter
from mta.system.fsutil import fsync_dir, write_all

log = Logger()

# How long a removal may wait for others to share its directory sync (seconds):
# a crash in that time delivers those messages again, as one just before the
# sync would.
REMOVAL_LINGER = 0.02


class QueueStore(SparePool):
    """The queue directory. All methods are synchronous and fsync as they go."""

    def __init__(self, root: Path, fsync: bool = True, clock: Callable[[], float] = time.time,
                 reactor: Any = None, syncfs: bool = False, spares: bool = True,
                 spare_outlet: SpareOutlet | None = None) -> None:
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
        self._init_spares(spares, spare_outlet)
        for d in (self.root, self.tmp_dir, self.msg_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- paths -------------------------------------------------------------

    def data_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.msg"

    def envelope_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.json"

    # --- receiving -------------------------------------------------------------

    def new_message(self, buffered: bool = False, queue_id: str = "") -> MessageWriter:
        """A writer for a new message (``buffered``: see :class:`MessageWriter`; it
        gets a spare if one is ready).  ``queue_id``: an id given out before
        (:meth:`new_id`); such a message takes no spare, a spare's id being its
        file's name."""
        if queue_id:
            try:
                return MessageWriter(self, queue_id, buffered)
            except OSError as e:
                raise QueueError(str(e)) from e
        if buffered and self.spares:
            spare = self._take_spare()
            if spare is not None:
                return MessageWriter(self, spare[0], buffered, spare_made=spare[1])
        try:
            return MessageWriter(self, new_queue_id(self.clock()), buffered)
        except OSError as e:
            raise QueueError(str(e)) from e

    def new_id(self) -> str:
        """A queue id for a message whose writer is made later (new_message's
        ``queue_id``): a milter is told the id at MAIL, as Postfix's ``i``."""
        return new_queue_id(self.clock())

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
            for listener in self._listeners:
                try:
                    listener(envelope)
                except Exception:
                    log.failure("queue listener failed for {id}", id=envelope.id)

    # --- the queue's contents ---------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of committed messages, oldest first."""
        return list_ids(self.msg_dir)

    def message(self, queue_id: str) -> QueuedMessage:
        """The handle its readers get for a queued message (nothing is read yet)."""
        return QueuedMessage(self.data_path(queue_id))

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
            unlink_quietly(tmp)
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
                unlink_quietly(tmp)
                raise

        def rename() -> None:
            try:
                os.rename(tmp, path)
            except OSError:
                unlink_quietly(tmp)
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
        envelope names the old id, which :meth:`recover` checks.

        Either way the first step that makes the message gone (the data file's
        unlink, or its chmod to ``RECEIVING``) is done at once, on the caller's
        thread, before this returns: a process killed after it never delivers
        the message again (issue 19 point 4: a kill between a server's 250 and
        the removal on the thread, up to REMOVAL_LINGER and the thread's queue
        later, gave a duplicate).  Only the syncs wait for the batch."""
        taker = self._spare_taker()
        if taker is None:
            unlink_quietly(self.data_path(queue_id))  # gone now; the thread does the rest
            return self.remover.submit(lambda: self._remove_files(queue_id), may_wait=True)
        try:
            os.chmod(self.data_path(queue_id), RECEIVING)  # gone now, to recover() and readers
        except OSError:
            pass  # _recycle_file on the thread finds out and removes it instead
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
        unlink_quietly(self.data_path(queue_id))
        unlink_quietly(self.envelope_path(queue_id))

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

        The ids come from the same one scan of ``msg/`` (one stat per message
        file), not from another: a restart with a large queue reads the
        directory once.
        """
        for p in self.tmp_dir.iterdir():
            log.info("removing leftover {name} from queue tmp/", name=p.name)
            unlink_quietly(p)
        self._spares.clear()
        names = set()
        gone: set[str] = set()  # message files removed or moved aside below
        unfinished = 0
        with os.scandir(self.msg_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".msg") and not is_ready(entry.stat().st_mode):
                    unlink_quietly(Path(entry.path))  # its state file, if any, goes below
                    unfinished += 1
                else:
                    names.add(entry.name)
        if unfinished:
            log.info("removed {count} spare or unfinished files from queue msg/", count=unfinished)
        for name in sorted(names):
            if name.endswith(".json") and name[:-5] + ".msg" not in names:
                log.info("removing state file {name} of a message no longer queued", name=name)
                unlink_quietly(self.msg_dir / name)
            elif name.endswith(".msg") and name[:-4] + ".json" not in names:
                try:
                    embedded = read_embedded_envelope(self.msg_dir / name)
                except ValueError:
                    embedded = b""
                except OSError as e:
                    log.error("cannot read {name}: {err}", name=name, err=e)
                    continue
                if embedded is not None and (not embedded or embedded_id(embedded)
                                             not in (None, name[:-4])):
                    gone.add(name)
                if embedded is None:
                    gone.add(name)
                    log.info("removing uncommitted message {name}", name=name)
                    unlink_quietly(self.msg_dir / name)
                elif embedded and (old := embedded_id(embedded)) not in (None, name[:-4]):
                    # A finished message's file recycled as a spare (remove_async),
                    # whose RECEIVING mode a crash lost while its rename survived.
                    log.info("removing {name}: a recycled spare still holding message {old}",
                             name=name, old=old)
                    unlink_quietly(self.msg_dir / name)
                elif not embedded:
                    corrupt = self.root / "corrupt"
                    corrupt.mkdir(exist_ok=True)
                    log.error("message {name} has a malformed envelope header; moved to corrupt/",
                              name=name)
                    os.rename(self.msg_dir / name, corrupt / name)
        return sorted(name[:-4] for name in names if name.endswith(".msg") and name not in gone)

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
