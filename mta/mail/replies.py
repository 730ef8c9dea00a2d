"""Every reply the SMTP server can give, in one table.

A reply is a basic code (RFC 5321 §4.2), an enhanced status code (RFC 3463,
RFC 5248 registry) and a text.  ``close`` marks the replies after which the
server closes the connection.  Reading this file shows every answer the server
can give a client.
"""

from __future__ import annotations

import functools
from typing import NamedTuple


class Reply(NamedTuple):
    code: int
    enhanced: str
    text: str
    close: bool = False

    def format(self) -> bytes:
        """The wire form; multi-line when the text contains newlines (RFC 5321 §4.2.1)."""
        return _wire_form(self)

    @property
    def is_error(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


@functools.lru_cache(maxsize=256)
def _wire_form(reply: Reply) -> bytes:
    """:meth:`Reply.format`, made once per distinct reply: most replies are the
    same few (250 Ok, 354, 221) on every message."""
    lines = reply.text.split("\n")
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        prefix = f"{reply.code}{sep}"
        if reply.enhanced:
            prefix += reply.enhanced + " "
        out.append(prefix + line + "\r\n")
    return "".join(out).encode("utf-8")


def multiline(code: int, lines: list[str]) -> bytes:
    """EHLO-style reply without enhanced codes on each line (RFC 2034 §3 excludes EHLO)."""
    out = [f"{code}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode("utf-8")


# --- connection ---------------------------------------------------------------
def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP ready")


def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection", close=True)


TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later", close=True)
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later", close=True)
TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing connection", close=True)
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session lasted too long, closing connection", close=True)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection", close=True)
SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down, try again later", close=True)
EARLY_TALKER = Reply(554, "5.5.1", "Protocol error: client sent data before the greeting", close=True)
CONNECTION_RATE = Reply(421, "4.7.0", "Too many connections from your address recently, try again later",
                        close=True)
HTTP_REFUSED = Reply(554, "5.5.1", "This is an SMTP server; HTTP is not spoken here", close=True)

# --- generic ------------------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
RSET_OK = Reply(250, "2.0.0", "Ok, transaction reset")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS AUTH\n"
                         "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321")
VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN = Reply(502, "5.5.1", "EXPN not available")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_LINE_ENDING = Reply(500, "5.5.2", "Bare CR or LF in command; lines must end in CRLF (RFC 5321 section 2.3.8)")
BAD_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL character in command")
NO_ARGUMENTS = Reply(501, "5.5.4", "This command takes no arguments")

# --- HELO/EHLO ----------------------------------------------------------------
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")


def helo_ok(hostname: str, ip: str) -> Reply:
    return Reply(250, "", f"{hostname} Hello [{ip}]")


# --- the EHLO/HELO name check (helo_check; RFC 5321 §4.1.1.1) -----------------
HELO_INVALID = Reply(501, "5.5.2", "Invalid EHLO/HELO name: give a host name or an address literal "
                                   "such as [192.0.2.1] (RFC 5321 section 4.1.1.1)")
HELO_NOT_FQDN = Reply(501, "5.5.2", "EHLO/HELO name must be a fully-qualified domain name "
                                    "or an address literal (RFC 5321 section 4.1.1.1)")


# --- MAIL ---------------------------------------------------------------------
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given; use RSET to start over")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_SENDER_DOMAIN = Reply(501, "5.1.8", "Bad sender address domain")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported parameter")
PARAM_NEEDS_EHLO = Reply(555, "5.5.4", "Parameters need EHLO, not HELO")
BAD_SIZE = Reply(501, "5.5.4", "SIZE parameter must be a number")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT, 8BITMIME or BINARYMIME")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
TOO_BIG_DECLARED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
SPF_TEMPFAIL = Reply(451, "4.4.3", "SPF check could not be completed, try again later")


def spf_fail(explanation: str) -> Reply:
    # RFC 7372 §3.2: 5.7.23 "SPF validation failed".
    return Reply(550, "5.7.23", f"SPF check failed: {explanation}")


USER_RATE_LIMIT = Reply(450, "4.7.1", "Message rate limit exceeded, try again later")


FROM_NOT_OWNED = Reply(553, "5.7.1", "From header address not owned by authenticated user")


def sender_not_owned(sender: str) -> Reply:
    return Reply(553, "5.7.1", f"<{sender}>: Sender address not owned by authenticated user")


# --- RCPT ---------------------------------------------------------------------
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL FROM first")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_RECIPIENT_DOMAIN = Reply(501, "5.1.2", "Bad recipient address domain")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
ALIAS_LOOP = Reply(550, "5.4.6", "Alias expansion loop")
TEMP_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary failure looking up recipient, try again later")


def unknown_user(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


# --- DATA ---------------------------------------------------------------------
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUE_WRITE_FAILED = Reply(451, "4.3.0", "Error writing message to the queue, try again later")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Header section too large")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains a bare CR or LF; lines must end in CRLF (RFC 5321 section 2.3.8)")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 998 octets (RFC 5322 section 2.1.1)")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received headers: mail loop detected")
EIGHTBIT_WITHOUT_8BITMIME = Reply(554, "5.6.1", "8-bit data in a message not declared BODY=8BITMIME")


# --- BDAT (CHUNKING and BINARYMIME, RFC 3030) -----------------------------------
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
# RFC 3030 §3: a BODY=BINARYMIME message can only be sent with BDAT.
DATA_AFTER_BINARYMIME = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")
# RFC 3030 §2: one transaction uses DATA or BDAT, never both.
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT in the same transaction")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT not allowed after BDAT in the same transaction")


def chunk_received(size: int) -> Reply:
    """The reply to a BDAT chunk that is not the LAST one (RFC 3030 §2)."""
    return Reply(250, "2.0.0", f"{size} octets received")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# --- STARTTLS -----------------------------------------------------------------
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

# --- AUTH (RFC 4954) ----------------------------------------------------------
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_SYNTAX = Reply(501, "5.5.2", "Cannot decode the authentication data")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY = Reply(421, "4.7.0", "Too many authentication failures, closing connection", close=True)
AUTH_BLOCKED = Reply(454, "4.7.0", "Too many authentication failures, try again later")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available")

# --- DSN parameters (RFC 3461 §4) and repeated parameters -----------------------
# Each names the parameter and the syntax it wants (RFC 3461 §4.1-§4.4);
# 501 5.5.4 is "invalid command arguments" (RFC 3463 §3.6).
BAD_RET = Reply(501, "5.5.4", "RET must be FULL or HDRS (RFC 3461 section 4.3)")
BAD_ENVID = Reply(501, "5.5.4", "ENVID must be xtext of at most 100 printable US-ASCII characters (RFC 3461 section 4.4)")
BAD_NOTIFY = Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY without repeats (RFC 3461 section 4.1)")
BAD_ORCPT = Reply(501, "5.5.4", "ORCPT must be addr-type;xtext, e.g. rfc822;user+40example.org (RFC 3461 section 4.2)")


def duplicate_param(keyword: str) -> Reply:
    # A keyword given twice has no single meaning: refused rather than guessed.
    return Reply(501, "5.5.4", f"Parameter {keyword} given more than once")


# --- the check pipeline (mta.smtp.pipeline): a check that failed or timed out ---
# RFC 3463 §3.4: 4.3.0 "other or undefined mail system status", a temporary
# failure of ours; at connect the connection is closed (RFC 5321 §3.8: 421).
CHECK_FAILED = Reply(451, "4.3.0", "Temporary failure checking the message, try again later")
CHECK_FAILED_CONNECT = Reply(421, "4.3.0", "Temporary failure checking the connection, try again later",
                             close=True)


# --- REQUIRETLS (RFC 8689) -------------------------------------------------------
# Its MAIL parameter takes no value (§3) and is only valid over TLS, after which
# alone the extension is offered (§3, §4.1).
BAD_REQUIRETLS = Reply(501, "5.5.4", "REQUIRETLS takes no value")
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS connection: STARTTLS first")


# --- milters (mta.policy.milter; issue 17) ----------------------------------------
# What Postfix's milter client answers for a milter's plain SMFIR_REJECT and
# SMFIR_TEMPFAIL, and for a milter that failed under default_action = tempfail
# (RFC 3463 §3.8: 5.7.1 delivery not authorized; 4.7.1 the same, for now).
MILTER_REJECT = Reply(550, "5.7.1", "Command rejected")
MILTER_TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
# A message a milter discarded (SMFIR_DISCARD): accepted, then dropped, as the
# milter asked; the client hears a plain acceptance (Postfix says the same).
MILTER_DISCARDED = Reply(250, "2.0.0", "Ok")


def milter_reply(code: int, enhanced: str, text: str) -> Reply:
    """A milter's own SMFIR_REPLYCODE (its code, RFC 3463 code and text; lines joined by \\n)."""
    return Reply(code, enhanced, text)


# --- the directory (mta.policy.directory): an SQL back end that cannot answer ---
# Never a 5xx (the address may well exist) and never an acceptance (that could
# relay): RFC 3463 §3.4 4.3.0, a temporary failure of our mail system, at RCPT
# and MAIL; for AUTH, RFC 4954 §6 "454 4.7.0 Temporary authentication failure"
# (the server could not check the credentials; the client may try again).
DIRECTORY_UNAVAILABLE = Reply(451, "4.3.0", "Directory temporarily unavailable, try again later")
AUTH_DIRECTORY_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")


# --- issue 17: DNS blocklists (mta.policy.dnsbl) and greylisting (mta.policy.greylist) ---
def dnsbl_listed(ip: str, zones: str) -> Reply:
    """A client the DNS blocklists listed (RFC 3463 §3.8: 5.7.1, delivery not
    authorized).  Not ``close``: at connect it is the greeting, and then the
    session waits for QUIT, answering :data:`GREETING_REFUSED` to anything
    else (RFC 5321 §3.1)."""
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {zones}")


# RFC 5321 §3.1: after a 554 greeting, "503 bad sequence of commands" to all but QUIT.
GREETING_REFUSED = Reply(503, "5.5.1", "Bad sequence of commands: this connection was refused; send QUIT")


def greylisted(wait: int) -> Reply:
    """First sight of a (client network, sender, recipient) triplet: try again
    later (RFC 5321 §4.5.4.1 retries; RFC 3463 4.7.1, as postgrey answers)."""
    return Reply(451, "4.7.1", f"Greylisted: try again in {max(1, wait)} seconds")
