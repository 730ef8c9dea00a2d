"""The queue's on-disk layout and file format, and the handle readers get.

Only the queue package knows this format: couriers, the DSN builder and the
commands read a message through :class:`QueuedMessage`.

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

A file in ``msg/`` in mode ``RECEIVING`` (0200: write-only, as Postfix marks
an unfinished queue file by its mode) is not a message: a spare
(:mod:`mta.queue.spares`) or a commit still going on
(:mod:`mta.queue.writer`); readers treat it as absent (:class:`MessageNotReady`)
and recovery removes it.  A commit makes it ``READY`` (0600).  A file whose
embedded envelope names another id than its own is a recycled spare.  A file
without an envelope header (a big message, whose envelope is in ``ID.json``,
or a queue written by an older version) starts with the message.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from twisted.logger import Logger

from mta.queue.envelope import Envelope

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


class MessageNotReady(FileNotFoundError):
    """A file in msg/ that is no message: a spare, or a message still being
    committed (or whose commit a crash cut short: recovery removes it)."""


def is_ready(mode: int) -> bool:
    return bool(mode & stat.S_IRUSR)


def _open_ready(path: Path) -> int:
    """A descriptor for reading the queue file ``path``: MessageNotReady if it is
    not a message (yet), FileNotFoundError if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        if not is_ready(os.stat(path).st_mode):
            raise MessageNotReady(errno.ENOENT, "not a message (yet)", str(path)) from None
        raise
    if not is_ready(os.fstat(fd).st_mode):
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


def message_files(msg_dir: Path) -> Iterator[tuple[str, str, os.stat_result]]:
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
    return sorted(name[:-4] for name, _, st in message_files(msg_dir) if is_ready(st.st_mode))


def is_queued(msg_dir: Path, queue_id: str) -> bool:
    """Whether ``queue_id`` is a message in ``msg_dir`` (its data file is there and
    readable: not a spare, nor a commit still going on)."""
    try:
        return is_ready(os.stat(msg_dir / f"{queue_id}.msg").st_mode)
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


def embedded_id(envelope_json: bytes) -> str | None:
    """The queue id an embedded envelope names, or None if it cannot be read."""
    try:
        found = json.loads(envelope_json).get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove {path}: {err}", path=str(path), err=e)


class QueuedMessage:
    """A committed message as its readers see it: couriers, the DSN builder and
    ``mta queue show`` read it through this handle, never the file itself.

    ``path`` is the message's data file (``msg/ID.msg``, what the runner hands
    a courier).  Reading never changes anything; each method raises OSError
    (:class:`MessageNotReady` or FileNotFoundError for a message that is not,
    or no longer, queued; EIO for a malformed envelope header).
    """

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def id(self) -> str:
        return self.path.name[:-4]

    def envelope(self) -> Envelope:
        """Its current envelope (the state file if it has one, else its header);
        ValueError, KeyError or TypeError if that cannot be read."""
        return load_envelope(self.path.parent, self.id)

    @property
    def size(self) -> int:
        """The message's size in octets (past the envelope header)."""
        fd = _open_ready(self.path)
        try:
            span = _parse_header(os.read(fd, _MAGIC_LINE_MAX))
            return os.fstat(fd).st_size - (0 if span is None else span[1])
        except ValueError as e:
            raise OSError(errno.EIO, str(e), str(self.path)) from None
        finally:
            os.close(fd)

    def open(self, buffering: int = -1) -> BinaryIO:
        """The message as a binary stream positioned at its first octet (the caller
        closes it)."""
        return open_message(self.path, buffering)

    def read_start(self, limit: int) -> bytes:
        """The first ``limit`` octets of the message (fewer only at its end), read
        with plain os calls: for the common small message read whole."""
        return read_message_start(self.path, limit)

    def read_headers(self, limit: int) -> bytes:
        """The header section (up to the empty line, not included), CRLF lines, at
        most ``limit`` octets, cut at a line boundary."""
        out: list[bytes] = []
        size = 0
        with self.open() as f:
            while size < limit:  # ends: each line read counts, or the file ends
                line = f.readline(limit - size + 2)
                if not line or line in (b"\r\n", b"\n"):
                    break
                if not line.endswith(b"\n"):
                    break  # a line longer than what is left: stop before it
                line = line.rstrip(b"\r\n") + b"\r\n"
                out.append(line)
                size += len(line)
        return b"".join(out)
