"""``mta check-config``'s milter probe: connect and negotiate, blocking, bounded by the
milter's connect_timeout.  (The command runs without a reactor.)"""

from __future__ import annotations

import socket
import struct
from typing import Any

from mta.policy.milter import codec
from mta.policy.milter.protocol import endpoint_string


def address_of(spec: str) -> tuple[int, Any]:
    """(address family, address) of a milter socket (Postfix syntax or a Twisted
    ``tcp:``/``unix:`` client endpoint string)."""
    kind, _, rest = endpoint_string(spec).partition(":")
    fields: dict[str, str] = {}
    positional: list[str] = []
    for part in rest.replace("\\:", "\0").split(":"):
        part = part.replace("\0", ":")
        key, eq, value = part.partition("=")
        if eq:
            fields[key] = value
        else:
            positional.append(part)
    if kind == "unix":
        return socket.AF_UNIX, fields.get("path") or (positional[0] if positional else "")
    if kind == "tcp":
        host = fields.get("host") or (positional[0] if positional else "")
        port = int(fields.get("port") or (positional[1] if len(positional) > 1 else "0"))
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
    raise ValueError(f"cannot probe a {kind}: endpoint")


def probe(settings: Any) -> str:
    """"" when the milter answered the negotiation, else what went wrong."""
    try:
        family, address = address_of(settings.socket)
    except ValueError as e:
        return str(e)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(settings.connect_timeout)
    try:
        sock.connect(address)
        sock.sendall(codec.optneg())
        data = b""
        decoder = codec.Decoder()
        while True:  # bounded: MAX_PACKET, and the timeout on each read
            chunk = sock.recv(65536)
            if not chunk:
                return f"{settings.socket}: closed the connection during the negotiation"
            data += chunk
            packets = decoder.feed(chunk)
            if packets:
                break
        if packets[0].command != codec.OPTNEG:
            return f"{settings.socket}: answered the negotiation with {packets[0].command!r}"
        codec.parse_optneg(packets[0].data)
        sock.sendall(codec.packet(codec.QUIT))
        return ""
    except (OSError, codec.ProtocolError, struct.error) as e:
        return f"{settings.socket}: {e or type(e).__name__}"
    finally:
        sock.close()
