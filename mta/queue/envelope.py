"""The envelope of a queued message: who sent it, to whom, and each recipient's state.

It is kept as a human-readable JSON file beside the message data and is the
single source of truth for the message's state (see :mod:`mta.queue.store`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ENVELOPE_VERSION = 1
# Made once: json.dumps with any option builds a new encoder on every call.
_FIELD_PER_LINE = json.JSONEncoder(ensure_ascii=False, separators=(",\n ", ": "))
_ONE_LINE = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "))
_ASCII_LINE = json.JSONEncoder(separators=(",", ":"))


class RecipientState(StrEnum):
    PENDING = "pending"  # not tried yet, or due for a retry
    DEFERRED = "deferred"  # temporary failure; next_attempt says when to retry
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure (a bounce is owed, see dsn_sent)

    @property
    def final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.FAILED)


class RecipientKind(StrEnum):
    LOCAL = "local"  # a Maildir (or delivery agent) on this host
    REMOTE = "remote"  # another host, via MX or smarthost
    PIPE = "pipe"  # an alias target "| command"


@dataclass
class Recipient:
    address: str  # where to deliver: user@domain, or the command for a pipe
    kind: RecipientKind
    original: str  # the RCPT TO address the client gave
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    remote_mta: str = ""
    updated: float = 0.0
    dsn_sent: bool = False
    # For local recipients: the mailbox owner "user@domain" (after alias expansion).
    mailbox: str = ""
    # DSN (RFC 3461 §4.1, §4.2), as mta.smtp.dsnparams keeps them; "" = not given.
    # An alias's targets all carry the NOTIFY/ORCPT of the RCPT that named it.
    # For a DELIVERED recipient whose NOTIFY has SUCCESS, dsn_sent is the
    # success notice (ours, or the next hop's when it took the parameters).
    notify: str = ""  # "NEVER" or e.g. "SUCCESS,FAILURE"
    orcpt: str = ""  # "rfc822;alice@example.org"

    def to_json(self) -> dict[str, Any]:
        # Written out field by field: dataclasses.asdict deep-copies and is slow
        # on this hot path (every envelope save).
        d = {
            "address": self.address, "kind": str(self.kind), "original": self.original,
            "state": str(self.state), "attempts": self.attempts,
            "next_attempt": self.next_attempt, "last_reply": self.last_reply,
            "remote_mta": self.remote_mta, "updated": self.updated, "dsn_sent": self.dsn_sent,
            "mailbox": self.mailbox,
        }
        if self.notify or self.orcpt:
            # Only then: the envelope of mail without DSN is what it always was.
            d["notify"], d["orcpt"] = self.notify, self.orcpt
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipient:
        return cls(
            address=str(d["address"]),
            kind=RecipientKind(d["kind"]),
            original=str(d.get("original", d["address"])),
            state=RecipientState(d.get("state", "pending")),
            attempts=int(d.get("attempts", 0)),
            next_attempt=float(d.get("next_attempt", 0.0)),
            last_reply=str(d.get("last_reply", "")),
            remote_mta=str(d.get("remote_mta", "")),
            updated=float(d.get("updated", 0.0)),
            dsn_sent=bool(d.get("dsn_sent", False)),
            mailbox=str(d.get("mailbox", "")),
            notify=str(d.get("notify", "")),
            orcpt=str(d.get("orcpt", "")),
        )


@dataclass
class Envelope:
    id: str
    sender: str  # "" is the null sender <>
    recipients: list[Recipient]
    created: float
    size: int = 0
    body_8bit: bool = False
    # Received with BODY=BINARYMIME (RFC 3030 §3): may only leave by BDAT.
    binarymime: bool = False
    smtputf8: bool = False
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str = ""
    tls: str = ""
    first_attempt: float = 0.0
    delay_warned: bool = False
    # DSN (RFC 3461 §4.3, §4.4); "" = not given.  ``dsn`` is set when the client
    # gave any DSN parameter (on MAIL or on any RCPT): the runner reads the
    # per-recipient NOTIFY only then, so mail without DSN costs nothing more.
    ret: str = ""  # "FULL" or "HDRS"
    envid: str = ""  # decoded from xtext
    dsn: bool = False
    # Received with MAIL ... REQUIRETLS (RFC 8689 §4.1): relayed only over a
    # verified TLS hop that offers REQUIRETLS, else bounced.
    requiretls: bool = False
    # The sender before SRS rewriting, when forwarding rewrote it.
    extra: dict[str, Any] = field(default_factory=dict)
    # Issue 17, the quarantine (hold) queue: not "" while the message is held (the
    # reason: a milter's SMFIR_QUARANTINE text, a check's).  The runner never
    # delivers a held message; ``mta queue release`` clears it.
    hold: str = ""

    @property
    def done(self) -> bool:
        return all(r.state.final for r in self.recipients)

    def pending(self, now: float) -> list[Recipient]:
        """Recipients due for an attempt at ``now``."""
        return [
            r for r in self.recipients
            if r.state in (RecipientState.PENDING, RecipientState.DEFERRED) and r.next_attempt <= now
        ]

    def to_bytes(self) -> bytes:
        """The envelope file's text, ending in a newline: JSON with one field per
        line and one recipient per line (readable, and greppable), for example::

            {"id": "6b09fd83e0792c88a3e9",
             "sender": "alice@example.org",
             ...
             "version": 1,
             "extra": {},
             "recipients": [
              {"address": "bob@example.net", "kind": "remote", ...}
             ]}

        Written by json's C encoder (``indent`` would take its pure-Python one,
        three times slower, on the path of every 250).
        """
        fields = self._fields()
        extra = _ONE_LINE.encode(fields.pop("extra"))
        head = _FIELD_PER_LINE.encode(fields)[:-1]  # without the closing brace
        recipients = ",\n  ".join([_ONE_LINE.encode(r.to_json()) for r in self.recipients])
        if recipients:
            recipients = f"\n  {recipients}\n "
        return f'{head},\n "extra": {extra},\n "recipients": [{recipients}]}}\n'.encode()

    def to_line(self) -> bytes:
        """The same JSON on one ASCII line, without the newline (for a line protocol)."""
        return _ASCII_LINE.encode(self._to_dict()).encode("ascii")

    def _to_dict(self) -> dict[str, Any]:
        fields = self._fields()
        fields["recipients"] = [r.to_json() for r in self.recipients]
        return fields

    def _fields(self) -> dict[str, Any]:
        """Every field but the recipients."""
        fields = {
            "id": self.id, "sender": self.sender,
            "created": self.created, "size": self.size, "body_8bit": self.body_8bit,
            "smtputf8": self.smtputf8, "client_ip": self.client_ip,
            "client_helo": self.client_helo, "auth_user": self.auth_user, "tls": self.tls,
            "first_attempt": self.first_attempt, "delay_warned": self.delay_warned,
            "extra": self.extra, "version": ENVELOPE_VERSION,
        }
        if self.dsn:  # only then, as for the recipients
            fields["dsn"], fields["ret"], fields["envid"] = True, self.ret, self.envid
        if self.binarymime:  # only then: every other envelope stays as it was
            fields["binarymime"] = True
        if self.requiretls:  # likewise
            fields["requiretls"] = True
        if self.hold:  # only then, as binarymime
            fields["hold"] = self.hold
        return fields

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse an envelope file; any defect is a ValueError, KeyError or TypeError."""
        try:
            return cls._from_bytes(data)
        except (OverflowError, RecursionError) as e:
            raise ValueError(f"malformed envelope: {type(e).__name__}") from None

    @classmethod
    def _from_bytes(cls, data: bytes) -> Envelope:
        d = json.loads(data.decode("utf-8"))
        if not isinstance(d, dict) or d.get("version") != ENVELOPE_VERSION:
            raise ValueError("not a version 1 envelope")
        return cls(
            id=str(d["id"]),
            sender=str(d["sender"]),
            recipients=[Recipient.from_json(r) for r in d["recipients"]],
            created=float(d["created"]),
            size=int(d.get("size", 0)),
            body_8bit=bool(d.get("body_8bit", False)),
            binarymime=bool(d.get("binarymime", False)),  # absent before CHUNKING support
            smtputf8=bool(d.get("smtputf8", False)),
            client_ip=str(d.get("client_ip", "")),
            client_helo=str(d.get("client_helo", "")),
            auth_user=str(d.get("auth_user", "")),
            tls=str(d.get("tls", "")),
            first_attempt=float(d.get("first_attempt", 0.0)),
            delay_warned=bool(d.get("delay_warned", False)),
            ret=str(d.get("ret", "")),
            envid=str(d.get("envid", "")),
            dsn=bool(d.get("dsn", False)),
            requiretls=bool(d.get("requiretls", False)),  # absent before RFC 8689 support
            extra=dict(d.get("extra", {})),
            hold=str(d.get("hold", "")),  # absent: not held
        )
