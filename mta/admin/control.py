"""The control channel's client: one blocking request to the running daemon.

Plain blocking code for the ``mta`` and ``sendmail`` commands, which run no
reactor; the protocol (one JSON object per line each way) and the server are
in :mod:`mta.daemon.control`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

MAX_RESPONSE = 1024 * 1024


# --- the client (blocking) -----------------------------------------------------------


class ControlUnavailable(Exception):
    """The daemon cannot be asked: no permission, no answer, or a garbled answer."""


class DaemonNotRunning(ControlUnavailable):
    """Nothing listens on the control socket: the daemon is not running."""


class ControlError(Exception):
    """The daemon answered ``ok: false``; ``code`` names the kind of error."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def call(path: Path, command: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon and return its (``ok: true``) answer.

    Raises DaemonNotRunning, ControlUnavailable or ControlError.
    """
    request = json.dumps({"command": command, **args}, ensure_ascii=False).encode("utf-8")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"the mta daemon is not running (nothing listens on "
                                   f"{path})") from None
        except PermissionError:
            raise ControlUnavailable(f"permission denied on {path}: only root and the "
                                     "daemon's user may use the control socket") from None
        except OSError as e:
            raise ControlUnavailable(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            sock.sendall(request + b"\n")
            line = _read_line(sock)
        except TimeoutError:
            raise ControlUnavailable(f"the daemon did not answer within {timeout:g} "
                                     "seconds") from None
        except OSError as e:
            raise ControlUnavailable(f"control connection failed: {e.strerror or e}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlUnavailable(f"unexpected answer from the daemon: {line[:200]!r}")
    if not answer["ok"]:
        raise ControlError(str(answer.get("error", "unknown error")), str(answer.get("code", "")))
    return answer


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlUnavailable("the daemon closed the control connection without "
                                     "answering")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise ControlUnavailable("the daemon's answer is too long")
