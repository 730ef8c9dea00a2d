"""The milter wire format (Sendmail's libmilter protocol, version 6, as Postfix speaks it).

Every packet is ``uint32 length`` (network order, counting the command octet
and the data) + one command octet + data.  Strings are NUL-terminated.
The constants are those of libmilter's ``mfdef.h`` and ``mfapi.h``; their
use follows Postfix's ``src/milter/milter8.c``.  This module is pure: bytes
in, values out, no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

VERSION = 6
# A milter's packet larger than this is garbage (Postfix refuses > 1 MB + a little).
MAX_PACKET = 1 << 20
# SMFIC_BODY chunks are at most this long (MILTER_CHUNK_SIZE).
CHUNK = 65535

# Commands, MTA -> milter (SMFIC_*).
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# Replies, milter -> MTA (SMFIR_*).
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

# The replies that end a step (the others are modifications, at end of message,
# or progress).
FINAL = frozenset({ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE, SKIP, CONN_FAIL,
                   SHUTDOWN})
MODIFICATIONS = frozenset({ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM, ADDHEADER,
                           INSHEADER, CHGHEADER, QUARANTINE})

# Actions a milter may ask for (SMFIF_*): all of them are offered.
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
ACTIONS = 0x1FF

# Protocol steps (SMFIP_*): the NO* ones say a step is not sent, the NR_* ones
# that the milter does not answer it.
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
# What we offer: every step may be skipped or left unanswered, SMFIR_SKIP is
# understood.  Not offered: RCPT_REJ (refused recipients are not sent) and
# HDR_LEADSPC (header values go without their leading space, as Postfix's do by default).
PROTOCOL = 0x1FFFFF & ~(P_RCPT_REJ | P_HDR_LEADSPC)

# Macro stages of SMFIR_SETSYMLIST (SMFIM_*).
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)

# Postfix's defaults (milter_*_macros, Postfix 3.x), plus the client's address,
# name and port at connect, which Postfix sends when asked (and most milters ask).
DEFAULT_MACROS: dict[int, tuple[str, ...]] = {
    M_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_name}",
                "{client_port}"),
    M_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    M_ENVFROM: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
                "{mail_mailer}"),
    M_ENVRCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    M_DATA: ("i",),
    M_EOH: ("i",),
    M_EOM: ("i",),
}
# The command each macro stage's SMFIC_MACRO goes before.
MACRO_COMMAND = {M_CONNECT: CONNECT, M_HELO: HELO, M_ENVFROM: MAIL, M_ENVRCPT: RCPT,
                 M_DATA: DATA, M_EOH: EOH, M_EOM: BODYEOB}


class ProtocolError(Exception):
    """The milter sent something that is not the protocol (garbage)."""


class Packet(NamedTuple):
    command: bytes  # one octet
    data: bytes


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def strings(*values: str | bytes) -> bytes:
    """NUL-terminated strings (str as UTF-8)."""
    return b"".join((v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v) + b"\0"
                    for v in values)


def optneg(version: int = VERSION, actions: int = ACTIONS, protocol: int = PROTOCOL) -> bytes:
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


def macros(command: bytes, pairs: Iterable[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO for the command that follows it (empty values are left out)."""
    body = b"".join(strings(name, value) for name, value in pairs if value)
    return packet(MACRO, command + body)


def connect(hostname: str, address: str, port: int) -> bytes:
    """SMFIC_CONNECT: the client's name, family (4, 6, or U: unknown) and port, address."""
    if ":" in address:
        family = b"6"
    elif address and address[0].isdigit():
        family = b"4"
    else:
        return packet(CONNECT, strings(hostname) + b"U")
    return packet(CONNECT, strings(hostname) + family + struct.pack("!H", port & 0xFFFF)
                  + strings(address))


def header(name: bytes, value: bytes) -> bytes:
    return packet(HEADER, name + b"\0" + value + b"\0")


class Decoder:
    """Splits a milter's byte stream into packets (bounded: MAX_PACKET each)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf + data if self._buf else data
        out = []
        pos = 0
        while len(buf) - pos >= 4:  # bounded: each turn takes a packet or stops
            (length,) = struct.unpack_from("!I", buf, pos)
            if length < 1 or length > MAX_PACKET:
                raise ProtocolError(f"packet length {length}")
            if len(buf) - pos - 4 < length:
                break
            cmd = buf[pos + 4 : pos + 5]
            out.append(Packet(cmd, buf[pos + 5 : pos + 4 + length]))
            pos += 4 + length
        self._buf = buf[pos:]
        return out


def split_strings(data: bytes, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of ``data`` (ProtocolError if fewer)."""
    parts = data.split(b"\0", count)
    if len(parts) <= count:
        raise ProtocolError(f"expected {count} strings in {data[:40]!r}")
    return parts[:count]


class Negotiated(NamedTuple):
    version: int
    actions: int
    protocol: int
    macros: dict[int, tuple[str, ...]]


def parse_optneg(data: bytes) -> Negotiated:
    """The milter's SMFIC_OPTNEG answer, with its SMFIR_SETSYMLIST macro lists if any."""
    if len(data) < 12:
        raise ProtocolError("short OPTNEG reply")
    version, actions, protocol = struct.unpack_from("!III", data)
    if version < 2:
        raise ProtocolError(f"milter protocol version {version}")
    if actions & ~ACTIONS:
        raise ProtocolError(f"milter asks for unknown actions 0x{actions:x}")
    wanted = dict(DEFAULT_MACROS)
    rest = data[12:]
    for _ in range(8):  # bounded: at most one list per stage
        if len(rest) < 5:
            break
        (stage,) = struct.unpack_from("!I", rest)
        names, _, rest = rest[4:].partition(b"\0")
        if stage in MACRO_COMMAND:
            wanted[stage] = tuple(n for n in names.decode("ascii", "replace").split() if n)
    return Negotiated(version, actions, protocol, wanted)


def parse_index_header(data: bytes) -> tuple[int, bytes, bytes]:
    """SMFIR_CHGHEADER / SMFIR_INSHEADER: index, name, value."""
    if len(data) < 4:
        raise ProtocolError("short header change")
    (index,) = struct.unpack_from("!I", data)
    name, value = split_strings(data[4:], 2)
    return index, name, value
