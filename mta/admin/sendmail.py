"""A ``sendmail``-compatible command for local programs (cron, mail(1), scripts).

Installed as ``mta-sendmail`` (and ``mta-mailq``); an administrator makes it
the system's sendmail with ``ln -s $(command -v mta-sendmail) /usr/sbin/sendmail``.
It reads a message on stdin and hands it to the running daemon over the
control socket (``submit``); the daemon checks and queues it exactly as for
SMTP submission (:mod:`mta.intake.submit`).  If the daemon is not running nothing is
queued anywhere: the command says so and exits 75 (EX_TEMPFAIL), which
well-behaved callers treat as "try again later".

Supported: ``-t`` (recipients from To/Cc/Bcc, or from Resent-To/Cc/Bcc when
present; added to those on the command line, as Postfix does; Bcc removed),
``-i`` / ``-oi`` (a line with a single ``.`` does not end the input),
``-f``/``-r`` sender (``<>`` for the null sender), ``-F`` full name for an added
From:, ``-bm`` (the default), ``-bp`` (list the queue, like mailq), ``-bi``
(newaliases: nothing to rebuild), ``-q`` (flush the queue), ``-C`` the mta
configuration file.  Options sendmail accepts that mean nothing here
(``-oem``, ``-odb``, ``-v``, ``-B 8BITMIME``, ``-N``, ``-R``, ``-V`` ...) are
ignored; other modes (``-bs``, ``-bd``, ``-bv``) are refused.

The configuration is ``-C PATH``, else ``$MTA_CONFIG``, else
``/etc/mta/mta.toml`` when it exists, else the embedded demo configuration.

Exit status follows sysexits(3): 0, 64 usage, 65 bad message, 67 recipient
refused, 70 internal error, 75 try again later, 78 configuration error.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses
from pathlib import Path
from typing import BinaryIO

from mta.admin.control import ControlError, ControlUnavailable, DaemonNotRunning, call
from mta.config import Config, ConfigError, load_config

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

DEFAULT_CONFIG = Path("/etc/mta/mta.toml")

# Flags without a value, and flags that take one (attached or as the next word).
_FLAGS = set("tivUGmns")
_WITH_VALUE = set("frFCBNRVLOXhpde")
_MODES_SUPPORTED = {"m", "p", "i"}

# A header field line (RFC 5322 §2.2): name, optional blanks, colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\r|\n")

# The daemon's error kinds (mta.intake.submit) as exit statuses.
_EXIT_FOR = {"usage": EX_USAGE, "recipient": EX_NOUSER, "data": EX_DATAERR,
             "temporary": EX_TEMPFAIL, "unavailable": EX_TEMPFAIL}


class UsageError(Exception):
    pass


@dataclass
class Options:
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    mode: str = "m"  # -bX
    flush: bool = False  # -q
    verbose: bool = False  # -v
    config: str | None = None  # -C
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """Sendmail's getopt-style options: clustered flags, values attached or separate."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.recipients += argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        j = 1
        while j < len(arg):
            flag = arg[j]
            rest = arg[j + 1:]
            if flag == "o":  # -oX: a sendmail.cf option; only -oi means something here
                if rest == "i":
                    opts.ignore_dots = True
                break
            if flag == "b":
                mode = rest
                if not mode:
                    if i >= len(argv):
                        raise UsageError("option -b needs a mode")
                    mode, i = argv[i], i + 1
                if mode not in _MODES_SUPPORTED:
                    raise UsageError(f"-b{mode} is not supported (only -bm, -bp and -bi)")
                opts.mode = mode
                break
            if flag == "q":
                if rest:
                    raise UsageError(f"-q{rest}: periodic queue runs are the daemon's job; "
                                     "use -q alone to flush")
                opts.flush = True
                break
            if flag in _WITH_VALUE:
                value = rest
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"option -{flag} needs a value")
                    value, i = argv[i], i + 1
                _set_value(opts, flag, value)
                break
            if flag not in _FLAGS:
                raise UsageError(f"unknown option -{flag}")
            if flag == "t":
                opts.extract = True
            elif flag == "i":
                opts.ignore_dots = True
            elif flag == "v":
                opts.verbose = True
            j += 1
    return opts


def _set_value(opts: Options, flag: str, value: str) -> None:
    if flag in "fr":
        opts.sender = value
    elif flag == "F":
        opts.full_name = value
    elif flag == "C":
        opts.config = value
    # B (body type), N (DSN notify), R (DSN return), V (envid), L, O, X, h, p, d, e: ignored.


# --- reading and preparing the message ---------------------------------------------------


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """Stdin up to EOF, or (without -i) up to a line holding a single ``.``.

    UsageError-like ValueError when the input exceeds ``limit`` octets (nothing
    more is read then).
    """
    if ignore_dots:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"the message is larger than the limit of {limit} octets")
        return data
    chunks: list[bytes] = []
    size = 0
    while True:
        line = stream.readline(limit + 2)
        if not line or line.rstrip(b"\r\n") == b".":
            break
        chunks.append(line)
        size += len(line)
        if size > limit:
            raise ValueError(f"the message is larger than the limit of {limit} octets")
    return b"".join(chunks)


def normalize_line_endings(data: bytes) -> bytes:
    """LF, CR and CRLF line ends all become CRLF; a last line without one gets one."""
    data = _LINE_END.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """``(header lines, rest)``: rest starts with the blank line, or is a body that had none."""
    lines = data.split(b"\r\n")
    headers: list[bytes] = []
    i = 0
    while i < len(lines) - 1:
        line = lines[i]
        if line[:1] in (b" ", b"\t") and headers:
            headers.append(line)
        elif _FIELD.match(line):
            headers.append(line)
        else:
            break
        i += 1
    return headers, b"\r\n".join(lines[i:])


def join_message(headers: list[bytes], rest: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    if headers and rest and not rest.startswith(b"\r\n"):
        head += b"\r\n"  # a body without its blank line: put one back
    return head + rest


def _fields(headers: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """``(lower-cased name, physical lines)`` per field."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in headers:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            fields.append((name, [line]))
    return fields


def _value(lines: list[bytes]) -> str:
    text = b"".join(lines).decode("utf-8", "replace")
    return text.split(":", 1)[1] if ":" in text else ""


def extract_recipients(headers: list[bytes]) -> tuple[list[str], list[bytes]]:
    """Recipients from To/Cc/Bcc (or Resent-To/Cc/Bcc if any), and the headers without Bcc."""
    fields = _fields(headers)
    names = {name for name, _ in fields}
    resent = names & {"resent-to", "resent-cc", "resent-bcc"}
    wanted = {"resent-to", "resent-cc", "resent-bcc"} if resent else {"to", "cc", "bcc"}
    values = [_value(lines) for name, lines in fields if name in wanted]
    recipients = []
    for _, address in getaddresses(values):
        if address and "@" in address and address not in recipients:
            recipients.append(address)
    kept = [line for name, lines in fields if name not in ("bcc", "resent-bcc") for line in lines]
    return recipients, kept


def default_sender(config: Config) -> str:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = f"uid{os.getuid()}"
    return f"{user}@{config.hostname}"


def prepare(data: bytes, opts: Options, sender: str) -> tuple[bytes, list[str]]:
    """The message to submit and its recipients, after -t, Bcc removal and From:."""
    headers, rest = split_message(normalize_line_endings(data))
    recipients = list(opts.recipients)
    if opts.extract:
        found, headers = extract_recipients(headers)
        recipients += [r for r in found if r not in recipients]
    if not any(name == "from" for name, _ in _fields(headers)):
        address = sender or f"MAILER-DAEMON@{sender.rpartition('@')[2] or 'localhost'}"
        headers.append(b"From: " + formataddr((opts.full_name or "", address)).encode("utf-8"))
    return join_message(headers, rest), recipients


# --- the commands ------------------------------------------------------------------------


def config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("MTA_CONFIG"):
        return Path(os.environ["MTA_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _err(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    prog = "sendmail"
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except UsageError as e:
        _err(prog, str(e))
        return EX_USAGE
    path = config_path(opts.config)
    try:
        config = load_config(path)
    except ConfigError as e:
        _err(prog, f"configuration error: {e}")
        return EX_CONFIG
    if opts.mode == "p":
        return _mailq(path)
    if opts.mode == "i":
        sys.stdout.write("mta reads the aliases files (domains/<domain>/aliases) when it starts "
                         "and on `mta reload`; there is nothing to rebuild.\n")
        return EX_OK
    if opts.flush:
        return _flush(prog, config)
    return _send(prog, config, opts)


def _send(prog: str, config: Config, opts: Options) -> int:
    limit = config.limits.max_message_size
    try:
        data = read_message(sys.stdin.buffer, opts.ignore_dots, limit)
    except ValueError as e:
        _err(prog, f"{e}; message NOT sent")
        return EX_DATAERR
    sender = opts.sender if opts.sender is not None else default_sender(config)
    sender = "" if sender in ("<>", "") else sender
    message, recipients = prepare(data, opts, sender)
    if not recipients:
        _err(prog, "no recipients (give them as arguments, or use -t); message NOT sent")
        return EX_USAGE
    try:
        answer = call(config.control_socket, "submit",
                      timeout=60.0 + len(message) / (1024 * 1024),
                      sender=sender, recipients=recipients,
                      message=base64.b64encode(message).decode("ascii"))
    except DaemonNotRunning as e:
        _err(prog, f"{e}; message NOT sent, nothing was queued")
        return EX_TEMPFAIL
    except ControlUnavailable as e:
        _err(prog, f"{e}; message NOT sent")
        return EX_TEMPFAIL
    except ControlError as e:
        _err(prog, f"{e}; message NOT sent")
        return _EXIT_FOR.get(e.code, EX_SOFTWARE)
    if opts.verbose:
        sys.stderr.write(f"{prog}: queued as {answer.get('id')}\n")
    return EX_OK


def _flush(prog: str, config: Config) -> int:
    try:
        call(config.control_socket, "flush")
    except ControlUnavailable as e:
        _err(prog, str(e))
        return EX_TEMPFAIL
    except ControlError as e:
        _err(prog, str(e))
        return EX_SOFTWARE
    return EX_OK


def _mailq(path: Path | None) -> int:
    from mta.admin import cli

    args = ["queue", "list"] + (["--config", str(path)] if path is not None else [])
    return cli.main(args)


def mailq_main(argv: Sequence[str] | None = None) -> int:
    """``mailq``: the queue, as ``mta queue list``; ``-C PATH`` picks the configuration."""
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = None
    i = 0
    while i < len(argv):
        if argv[i] == "-C" and i + 1 < len(argv):
            explicit = argv[i + 1]
            i += 2
        elif argv[i].startswith("-C") and len(argv[i]) > 2:
            explicit = argv[i][2:]
            i += 1
        else:
            i += 1  # mailq's other options (-v, -Ac ...) change nothing here
    return _mailq(config_path(explicit))


if __name__ == "__main__":
    raise SystemExit(main())
