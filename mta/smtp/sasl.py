"""The SASL exchange of AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN, under TLS only.

:class:`SASLExchange` is the part of :class:`mta.smtp.server.SMTPSession`
that runs AUTH: the command (``smtp_AUTH``), its continuation lines (the
session's framing hands each line to ``_auth_step`` while ``phase`` is AUTH,
up to 12288 octets, RFC 4954 §4), the password check (``ctx.users``, in a
thread), a delay before each 535 that grows with each failure, and the blocks
of :class:`mta.policy.limits.AbuseLimits` (454 4.7.0 while an address or an
account is blocked; too many failures in a session close it with 421).  On
success it sets the connection's ``auth_user``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mta.mail import replies as R
from mta.mail.replies import Reply
from mta.smtp.framing import Phase

# The session's log lines keep the namespace they always had (log readers match it).
log = Logger(namespace="mta.smtp.server")


class SASLExchange:
    """AUTH and its continuation lines (see the module docstring)."""

    ctx: Any
    limits: Any
    client_ip: str
    helo: str | None
    esmtp: bool
    tls_active: bool
    auth_user: str | None
    auth_failures: int
    txn: Any
    _set_auth_user: Any  # the session's: sets auth_user where the checks see it too
    phase: Phase

    def _init_sasl(self) -> None:
        self._auth_step: Any = None  # what takes the next continuation line

    def smtp_AUTH(self, arg: str) -> Reply | Deferred[Reply] | None:  # noqa: N802
        if self.helo is None or not self.esmtp:
            return R.NEED_HELO
        if not self.tls_active:
            return R.AUTH_NEEDS_TLS
        if self.auth_user is not None:
            return R.AUTH_ALREADY
        if self.txn is not None:
            return R.AUTH_IN_TRANSACTION
        if self.ctx.abuse is not None:
            blocked = self.ctx.abuse.auth_blocked(self.client_ip)
            if blocked is True:
                return self._auth_blocked()
            if blocked is not False:  # shared counters (Redis): a Deferred
                return blocked.addCallback(
                    lambda b: self._auth_blocked() if b else self._auth_start(arg))
        return self._auth_start(arg)

    def _auth_start(self, arg: str) -> Reply | Deferred[Reply] | None:
        words = arg.split()
        if not words or len(words) > 2:
            return R.AUTH_UNKNOWN_MECHANISM
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        self.auth_mechanism = mechanism  # the milters' {auth_type}, once AUTH succeeds
        if mechanism == "PLAIN":
            if initial is None:
                return self._ask(b"334 \r\n", self._auth_plain)
            return self._auth_plain(initial)
        if mechanism == "LOGIN":
            if initial is None:
                return self._ask(b"334 VXNlcm5hbWU6\r\n", self._auth_login_user)
            return self._auth_login_user(initial)
        return R.AUTH_UNKNOWN_MECHANISM

    def _ask(self, challenge: bytes, step: Any) -> None:
        self._write(challenge)
        self.phase = Phase.AUTH
        self._auth_step = step
        return None

    def _sasl_text(self, line: str) -> str:
        from mta.policy.auth import SASLCancelled, decode_b64_line

        if line.strip() == "*":
            raise SASLCancelled()
        return decode_b64_line(line.strip())

    def _auth_plain(self, line: str) -> Reply | Deferred[Reply]:
        """The PLAIN response (RFC 4616), as initial response or continuation line.

        Undecodable base64 is ``501 5.5.2`` and not counted as a failure (RFC 4954 §4,
        as for LOGIN); a decodable message without its two NULs or with an empty
        identity or password is a failed attempt (535, counted)."""
        from mta.policy.auth import SASLCancelled, SASLError, SASLUndecodable, decode_plain

        self.phase = Phase.COMMAND
        line = line.strip()
        if line == "*":
            return R.AUTH_CANCELLED
        try:
            _authzid, authcid, password = decode_plain("" if line == "=" else line)
        except SASLCancelled:
            return R.AUTH_CANCELLED
        except SASLUndecodable:
            return R.AUTH_SYNTAX
        except SASLError:
            return self._auth_failed()
        return self._check_password(authcid, password)

    def _auth_login_user(self, line: str) -> Reply | None:
        from mta.policy.auth import SASLCancelled, SASLError

        try:
            user = self._sasl_text(line)
        except SASLCancelled:
            self.phase = Phase.COMMAND
            return R.AUTH_CANCELLED
        except SASLError:
            self.phase = Phase.COMMAND
            return R.AUTH_SYNTAX
        return self._ask(b"334 UGFzc3dvcmQ6\r\n", lambda ln: self._auth_login_password(user, ln))

    def _auth_login_password(self, user: str, line: str) -> Reply | Deferred[Reply]:
        from mta.policy.auth import SASLCancelled, SASLError

        self.phase = Phase.COMMAND
        try:
            password = self._sasl_text(line)
        except SASLCancelled:
            return R.AUTH_CANCELLED
        except SASLError:
            return R.AUTH_SYNTAX
        return self._check_password(user, password)

    def _check_password(self, user: str, password: str) -> Deferred[Reply] | Reply:
        if self.ctx.abuse is not None:
            blocked = self.ctx.abuse.auth_blocked(self.client_ip, user.lower())
            if blocked is True:
                # The password is not even checked: right or wrong, the answer is the same.
                return self._auth_blocked(user)
            if blocked is not False:  # shared counters (Redis): a Deferred
                return blocked.addCallback(
                    lambda b: self._auth_blocked(user) if b else self._verify(user, password))
        return self._verify(user, password)

    def _verify(self, user: str, password: str) -> Deferred[Reply]:
        d = maybeDeferred(self.ctx.users.authenticate, user, password)

        def checked(canonical: str | None) -> Reply | Deferred[Reply]:
            if canonical:
                self._set_auth_user(canonical)
                log.info("auth ok for {user} from {ip}", user=canonical, ip=self.client_ip,
                         event="auth", result="ok")
                if self.ctx.abuse is not None:
                    remembered = self.ctx.abuse.auth_succeeded(self.client_ip, user.lower())
                    if remembered is not None:  # shared counters: answer once it is stored
                        return remembered.addCallback(lambda _: R.AUTH_OK)
                return R.AUTH_OK
            return self._auth_failed(user, "bad_credentials")

        return d.addCallbacks(checked, self._auth_unavailable, errbackArgs=(user,))

    def _auth_unavailable(self, failure: Any, user: str) -> Reply:
        """An SQL directory that could not answer: ``454 4.7.0`` (RFC 4954 §6,
        temporary authentication failure), not counted as a failed guess."""
        from mta.policy.directory import DirectoryUnavailable

        failure.trap(DirectoryUnavailable)
        log.warn("auth unavailable for {user} from {ip}: the directory did not answer",
                 user=user[:64], ip=self.client_ip, event="auth", result="unavailable")
        return R.AUTH_DIRECTORY_UNAVAILABLE

    def _auth_blocked(self, user: str | None = None) -> Reply:
        """``454 4.7.0`` while the address or the account is blocked (RFC 4954 §6,
        temporary authentication failure; see AbuseLimits for the rule).  Not counted
        towards any block, so it cannot extend one; it does count towards this
        session's max_auth_failures, so one session cannot ask for ever."""
        log.info("auth blocked for {user} from {ip}", user=(user or "-")[:64], ip=self.client_ip,
                 event="auth", result="blocked")
        self.auth_failures += 1
        return R.AUTH_TOO_MANY if self.auth_failures >= self.limits.max_auth_failures else R.AUTH_BLOCKED

    def _auth_failed(self, user: str | None = None, reason: str = "malformed") -> Deferred[Reply]:
        """535 after a delay that grows with each failure; too many close the session,
        and failures across sessions block the client address and the account."""
        log.info("auth failed ({reason}) for {user} from {ip}", reason=reason,
                 user=(user or "-")[:64], ip=self.client_ip, event="auth", result="failed")
        self.auth_failures += 1
        counted = None
        if self.ctx.abuse is not None:
            counted = self.ctx.abuse.auth_failed(self.client_ip, user.lower() if user else None)
        reply = R.AUTH_TOO_MANY if self.auth_failures >= self.limits.max_auth_failures else R.AUTH_FAILED
        delay = self.limits.auth_failure_delay * self.auth_failures
        if counted is not None:  # shared counters: the delay runs once the failure is counted
            return counted.addCallback(lambda _: deferLater(self.ctx.clock, delay, lambda: reply))
        return deferLater(self.ctx.clock, delay, lambda: reply)
