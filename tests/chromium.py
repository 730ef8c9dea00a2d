"""Debian's chromium, headless, for the tests of what a browser shows.

* :func:`run`: one command-line run (``--dump-dom URL``, ``--screenshot=PATH URL``).
* :func:`dom_without_javascript`: the DOM of a page loaded with script execution
  disabled.  ``--dump-dom`` itself reads the DOM with JavaScript, so this one
  drives chromium over the DevTools protocol instead (``--remote-debugging-port``;
  ``Emulation.setScriptExecutionDisabled``, ``Page.navigate``,
  ``DOM.getOuterHTML``), through the small RFC 6455 client below (the standard
  library has none, and one page load needs no dependency for it).

As root chromium needs ``--no-sandbox``; each run gets a profile of its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

TIMEOUT = 90.0


def flags(profile: str) -> list[str]:
    out = ["--headless=new", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--window-size=1280,2400", f"--user-data-dir={profile}"]
    if os.geteuid() == 0:
        out.append("--no-sandbox")
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="mta-chromium-") as profile:
        return subprocess.run(["chromium", *flags(profile), *args], capture_output=True,
                              text=True, timeout=TIMEOUT)


class WebSocket:
    """Just enough of an RFC 6455 client for the DevTools protocol: text frames."""

    def __init__(self, url: str, timeout: float) -> None:
        m = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert m, url
        self.sock = socket.create_connection((m[1], int(m[2])), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {m[3]} HTTP/1.1\r\nHost: {m[1]}:{m[2]}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed the connection"
            head += chunk
        assert head.split(b" ", 2)[1] == b"101", head
        self.buffer = head.partition(b"\r\n\r\n")[2]
        self.next_id = 0
        self.seen: set[str] = set()  # the events received so far

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "DevTools closed the connection"
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                  bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> dict[str, Any]:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode in (0x1, 0x0):
                message += payload
                if first & 0x80:
                    return json.loads(message)
            # ping/pong/close frames are not expected from DevTools here

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; the names of the events that came
        before it are kept in :attr:`seen`."""
        self.next_id += 1
        self.send({"id": self.next_id, "method": method, "params": params})
        while True:
            answer = self.receive()
            if "method" in answer:
                self.seen.add(answer["method"])
            elif answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer.get("result", {})

    def wait_for(self, event: str, deadline: float) -> None:
        while event not in self.seen and time.monotonic() < deadline:
            self.seen.add(self.receive().get("method", ""))
        if event in self.seen:
            return
        raise TimeoutError(event)

    def close(self) -> None:
        self.sock.close()


def dom_without_javascript(url: str, headers: dict[str, str] | None = None) -> str:
    """The outer HTML of ``url`` loaded with script execution disabled (and
    ``headers`` added to every request)."""
    deadline = time.monotonic() + TIMEOUT
    with tempfile.TemporaryDirectory(prefix="mta-chromium-") as profile:
        proc = subprocess.Popen(["chromium", *flags(profile), "--remote-debugging-port=0",
                                 "about:blank"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            port = None
            while port is None:
                line = proc.stderr.readline()
                assert line or proc.poll() is None, "chromium exited"
                m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
                port = m and int(m[1])
                assert time.monotonic() < deadline, "no DevTools port"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.load(r) if t["type"] == "page")
            ws = WebSocket(target["webSocketDebuggerUrl"], timeout=TIMEOUT)
            try:
                ws.call("Emulation.setScriptExecutionDisabled", value=True)
                ws.call("Network.enable")
                if headers:
                    ws.call("Network.setExtraHTTPHeaders", headers=headers)
                ws.call("Page.enable")
                ws.call("Page.navigate", url=url)
                ws.wait_for("Page.loadEventFired", deadline)
                root = ws.call("DOM.getDocument", depth=-1)["root"]
                return ws.call("DOM.getOuterHTML", nodeId=root["nodeId"])["outerHTML"]
            finally:
                ws.close()
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
