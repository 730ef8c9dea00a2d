"""Linux AIO fsync (mta.system.aiofsync) on real files and descriptors."""

from __future__ import annotations

import errno
import os

import pytest

from mta.system.aiofsync import AioFsync


@pytest.fixture
def aio():
    aio = AioFsync.open(capacity=4)
    assert aio is not None  # Linux, x86_64 or arm64: the platforms this MTA is run on
    yield aio
    aio.close()


def files(tmp_path, count):
    fds = []
    for n in range(count):
        fd = os.open(tmp_path / f"f{n}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 4096)
        fds.append(fd)
    return fds


def test_files_are_fsynced_in_rounds_of_the_capacity(aio, tmp_path):
    fds = files(tmp_path, 10)  # three rounds of at most 4
    try:
        assert aio.fsync_all(fds) == [0] * 10
        assert aio.fsync_all(fds[:1]) == [0] and aio.fsync_all([]) == []
    finally:
        for fd in fds:
            os.close(fd)


def test_each_descriptor_gets_its_own_error(aio, tmp_path):
    """A pipe has no fsync (the kernel refuses the request at submission) and a
    closed descriptor is no file: each gets its errno, the files around them 0."""
    fds = files(tmp_path, 3)
    reader, writer = os.pipe()
    closed = os.open(tmp_path / "closed", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(closed)
    try:
        assert aio.fsync_all([fds[0], writer, fds[1], closed, fds[2]]) == [
            0, errno.EINVAL, 0, errno.EBADF, 0]
    finally:
        for fd in (*fds, reader, writer):
            os.close(fd)


def test_a_closed_context_is_closed_once(tmp_path):
    aio = AioFsync.open()
    assert aio is not None
    aio.close()
    aio.close()
    with pytest.raises(AssertionError):
        aio.fsync_all([0])
