"""The SMTP session's built-in checks: each existing decision as one small object.

Each class here is a check of the pipeline (:class:`mta.mail.checks.Check`;
run by :class:`mta.smtp.pipeline.Pipeline`), made by :data:`BUILTIN` from
its name in ``[checks] order`` with the server context: the configuration and
the policy objects (``ctx.config``, ``ctx.abuse``, ``ctx.spf``,
``ctx.identities``, ``ctx.aliases``, ``ctx.srs``, ``ctx.authenticator``,
``ctx.connections``, ``ctx.total_connections``).  A check reads those when it
runs, not when it is made, so a reload's new users, aliases or limits apply to
the next decision.  The decisions themselves stay in their modules (limits,
relay, spf, msgauth, srs ...); a check only asks and says what it found.

By stage, in the default order:

* CONNECT ``limits``: max_connections, max_connections_per_ip and the
  connection rate (the latter two not for relay_networks).
* HELO ``helo``: the EHLO/HELO name as ``helo_check`` says.
* MAIL ``sender_binding``, ``user_rate``: an authenticated user's envelope
  sender and message rate; ``spf``: SPF (RFC 7208) for other clients.
* RCPT ``recipient``: local users and aliases, relay (RFC 5321 §3.6); its
  verdict carries the recipient's expanded targets.
* HEADERS ``forged_authres``: our Authentication-Results fields that came with
  the message are removed (RFC 8601 §5); ``loop``: too many Received fields
  (RFC 5321 §6.3); ``submission_headers``: Date, Message-ID, no Bcc for our
  users' mail (RFC 6409 §8).
* MESSAGE ``from_binding``: an authenticated user's From addresses;
  ``msgauth``: DKIM and DMARC for inbound mail, DKIM signing for our users'
  (RFC 6376, RFC 7489); ``milter``: the milters of [milters] (also at MAIL
  and RCPT; :mod:`mta.policy.milter.check`); ``srs``: the SRS sender of
  forwarded mail.

Each says in ``applies`` (:class:`mta.mail.checks.Check`) the clients it has
nothing to decide for, so that the pipeline does not even run it for them:
``helo`` not for relay_networks, ``spf`` for neither relay_networks nor an
authenticated user, ``sender_binding``, ``user_rate``, ``submission_headers``
and ``from_binding`` only for an authenticated user.  ``check`` still tests
the same, for a caller that runs a check without the pipeline's plan.

Log events keep the session's fields: a refusal is logged by the session as
event "rejected" with the verdict's ``reason``; the limit checks log their own
"limit" events and say ``quiet``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mta.mail import replies as R
from mta.mail.address import logged_sender
from mta.mail.checks import ACCEPT, Action, CheckState, Client, Stage, Verdict, reject
from mta.mail.headers import unfold_headers
from mta.policy.milter.check import MilterCheck  # the milters (issue 17): configured in [milters]
from mta.policy.received import count_received
from mta.policy.relay import check_recipient

# The lines these checks log were the SMTP session's and keep its namespace
# (log readers match it).
log = Logger(namespace="mta.smtp.server")


class _Check:
    name = ""
    stages: frozenset[Stage] = frozenset()

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx


class ConnectionLimits(_Check):
    name = "limits"
    stages = frozenset({Stage.CONNECT})

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        ctx = self.ctx
        limits = ctx.config.limits
        if ctx.total_connections >= limits.max_connections:
            return reject(R.TOO_MANY_CONNECTIONS, reason="max_connections")
        if state.trusted:
            # Our own networks (relay_networks) are exempt from the per-address limits,
            # as Postfix exempts mynetworks; the total limit still holds.
            return ACCEPT
        if ctx.connections.get(state.client_ip, 0) >= limits.max_connections_per_ip:
            return reject(R.TOO_MANY_FROM_IP, reason="max_connections_per_ip")
        if ctx.abuse is None:
            return ACCEPT
        allowed = ctx.abuse.connection_allowed(state.client_ip)
        if allowed is True:
            return ACCEPT
        if allowed is False:
            return self._rate_limited(state.client_ip)
        # Shared counters (Redis): a Deferred firing with the answer.
        return allowed.addCallback(lambda ok: ACCEPT if ok else self._rate_limited(state.client_ip))

    @staticmethod
    def _rate_limited(ip: str) -> Verdict:
        log.info("connection rate limit for {ip}", ip=ip, event="limit", limit="connection_rate")
        return reject(R.CONNECTION_RATE, quiet=True)


class HeloName(_Check):
    """EHLO/HELO: the name is checked as ``helo_check`` says (501 5.5.2 when refused;
    not for relay_networks clients, whose own set-up is trusted)."""

    name = "helo"
    stages = frozenset({Stage.HELO})

    @staticmethod
    def applies(client: Client) -> bool:
        return not client.trusted

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        mode = self.ctx.config.helo_check
        if mode == "off" or state.trusted:
            return ACCEPT
        from mta.mail.address import helo_name_problem

        problem = helo_name_problem(state.helo, strict=mode == "strict" and state.listener_kind == "mx")
        if problem is None:
            return ACCEPT
        return reject(R.HELO_NOT_FQDN if problem == "not_fqdn" else R.HELO_INVALID)


class SenderBinding(_Check):
    """An authenticated user may use only their own addresses as envelope sender."""

    name = "sender_binding"
    stages = frozenset({Stage.MAIL})

    @staticmethod
    def applies(client: Client) -> bool:
        return client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        ctx = self.ctx
        user = state.auth_user
        if user is None or not ctx.config.sender_binding or ctx.identities is None:
            return ACCEPT
        sender = state.sender or ""
        identities = ctx.identities
        if getattr(identities, "blocking", False):  # SQL: the user's own address needs no lookup
            if sender and identities.own_address(user, sender):
                return ACCEPT
            return identities.defer(identities.may_send_as, user, sender).addCallbacks(
                lambda ok: ACCEPT if ok else reject(R.sender_not_owned(sender),
                                                    reason="sender_binding"),
                _directory_failed)
        if identities.may_send_as(user, sender):
            return ACCEPT
        return reject(R.sender_not_owned(sender), reason="sender_binding")


class UserRate(_Check):
    """limits.messages_per_user_per_hour for an authenticated user (450 4.7.1)."""

    name = "user_rate"
    stages = frozenset({Stage.MAIL})

    @staticmethod
    def applies(client: Client) -> bool:
        return client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        abuse = self.ctx.abuse
        user = state.auth_user
        if user is None or abuse is None:
            return ACCEPT
        allowed = abuse.message_allowed(user)
        if allowed is True:
            return ACCEPT
        if allowed is False:
            return self._rate_limited(user)
        # Shared counters (Redis): a Deferred firing with the answer.
        return allowed.addCallback(lambda ok: ACCEPT if ok else self._rate_limited(user))

    @staticmethod
    def _rate_limited(user: str) -> Verdict:
        log.info("message rate limit for {user}", user=user, event="limit",
                 limit="user_messages")
        return reject(R.USER_RATE_LIMIT, quiet=True)


class SPF(_Check):
    """SPF of MAIL FROM (RFC 7208) for clients neither authenticated nor in
    relay_networks.  Its verdict adds Received-SPF (above our Received, RFC
    7208 §9.1), the ``spf=`` Authentication-Results clause, and the result as
    the fact ``spf`` (DMARC's input at the end of the message)."""

    name = "spf"
    stages = frozenset({Stage.MAIL})

    @staticmethod
    def applies(client: Client) -> bool:
        return not client.trusted and not client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        ctx = self.ctx
        if (state.auth_user is not None or state.trusted or ctx.spf is None
                or not ctx.config.spf.enabled):
            return ACCEPT
        sender = state.sender or ""
        return ctx.spf.check(state.client_ip, sender, state.helo).addCallback(
            self._decided, state.client_ip, sender, state.helo)

    def _decided(self, result: Any, ip: str, sender: str, helo: str) -> Verdict:
        from mta.policy import spf as spf_policy

        config = self.ctx.config
        log.info("spf {result} for {sender} from {ip}", result=result.result,
                 sender=logged_sender(sender), ip=ip, event="spf")
        if result.result == "fail" and config.spf.reject_fail:
            return reject(R.spf_fail(result.explanation or "not permitted"), reason="spf")
        received = spf_policy.fold_header(spf_policy.received_spf_header(
            result, ip, sender, helo, config.hostname)).encode("utf-8")
        return Verdict(headers=(received,),
                       auth_results=(spf_policy.authentication_results_spf(result, sender, helo),),
                       facts={"spf": result})


class RecipientLookup(_Check):
    """Local users and aliases, and relay only for authenticated users and
    relay_networks (:func:`mta.policy.relay.check_recipient`).  Its verdict
    carries the expanded targets of the recipient."""

    name = "recipient"
    stages = frozenset({Stage.RCPT})

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        ctx = self.ctx
        if getattr(ctx.aliases, "blocking", False):  # an SQL directory (mta.policy.directory)
            return self._ask_directory(state)
        decision = check_recipient(
            state.recipient,
            local_domains=ctx.config.local_domains,
            aliases=ctx.aliases,
            may_relay=state.auth_user is not None or state.trusted,
            srs=ctx.srs,
        )
        if decision.reply is not None:
            return reject(decision.reply)
        return Verdict(targets=decision.targets)

    def _ask_directory(self, state: CheckState) -> Verdict | Deferred[Verdict]:
        """The same decision with an SQL directory: a recipient in a local domain
        is decided at once from the directory's cache when every answer is there,
        else looked up off the reactor thread (a Deferred); one elsewhere is
        relayed or refused at once, from the domains the directory last read.
        The database down: 451 4.3.0, never 5xx, never relayed."""
        ctx = self.ctx
        address = state.recipient
        may_relay = state.auth_user is not None or state.trusted
        domains = ctx.directory.local_domains() if ctx.directory is not None else None
        if domains is None:
            if address.domain not in ctx.config.local_domains:
                # Never read the domains: this one may be ours, so neither relay nor refuse.
                return reject(R.DIRECTORY_UNAVAILABLE, reason="directory")
            domains = frozenset(ctx.config.local_domains)
        if address.domain not in domains:
            decision = check_recipient(address, domains, ctx.aliases, may_relay, ctx.srs)
            return reject(decision.reply) if decision.reply is not None \
                else Verdict(targets=decision.targets)

        def decided(decision: Any) -> Verdict:
            if decision.reply is not None:
                return reject(decision.reply)
            return Verdict(targets=decision.targets)

        from mta.policy.sqldirectory import NeedsLookup

        try:  # every answer cached (seen within cache_ttl): at once, no thread
            return decided(ctx.aliases.from_cache(check_recipient, address, domains,
                                                  ctx.aliases, may_relay, ctx.srs))
        except NeedsLookup:
            pass
        d = ctx.aliases.defer(check_recipient, address, domains, ctx.aliases, may_relay, ctx.srs)
        return d.addCallbacks(decided, _directory_failed)


class ForgedAuthResults(_Check):
    """RFC 8601 §5: an Authentication-Results field claiming to be ours is forged."""

    name = "forged_authres"
    stages = frozenset({Stage.HEADERS})

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        from mta.policy.authresults import strip_forged

        lines = state.header_lines
        kept = strip_forged(lines, self.ctx.config.hostname)
        return ACCEPT if len(kept) == len(lines) else Verdict(header_lines=kept)


class ReceivedLoop(_Check):
    """More than limits.max_received_headers Received fields: a mail loop (RFC 5321
    §6.3); refused with 554 5.4.6 once the message has ended."""

    name = "loop"
    stages = frozenset({Stage.HEADERS})

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        names = [name for name, _ in unfold_headers(state.header_lines)]
        if count_received(names) > self.ctx.config.limits.max_received_headers:
            return reject(R.LOOP_DETECTED)
        return ACCEPT


def format_datetime_now() -> str:
    return format_datetime(datetime.now(UTC))


class SubmissionHeaders(_Check):
    """Our users' mail is completed with Date and Message-ID and loses Bcc (RFC 6409 §8)."""

    name = "submission_headers"
    stages = frozenset({Stage.HEADERS})

    @staticmethod
    def applies(client: Client) -> bool:
        return client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        if state.auth_user is None:
            return ACCEPT
        from mta.policy.submission import complete_headers

        return Verdict(header_lines=complete_headers(state.header_lines, self.ctx.config.hostname,
                                                     format_datetime_now))


class FromBinding(_Check):
    """With sender_binding_from: every From address must be one the user may use."""

    name = "from_binding"
    stages = frozenset({Stage.MESSAGE})

    @staticmethod
    def applies(client: Client) -> bool:
        return client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        ctx = self.ctx
        user = state.auth_user
        if user is None or not ctx.config.sender_binding_from or ctx.identities is None:
            return ACCEPT
        from mta.policy.identities import header_from_addresses

        addresses = header_from_addresses(state.header_lines)
        identities = ctx.identities
        if getattr(identities, "blocking", False) and addresses:  # SQL: looked up off the reactor thread
            return identities.defer(lambda: all(identities.may_send_as(user, a)
                                                for a in addresses)).addCallbacks(
                lambda ok: ACCEPT if ok else reject(R.FROM_NOT_OWNED), _directory_failed)
        if addresses and all(identities.may_send_as(user, a) for a in addresses):
            return ACCEPT
        return reject(R.FROM_NOT_OWNED)


class MessageAuth(_Check):
    """DKIM and DMARC for inbound mail (their Authentication-Results clauses, and
    a DMARC refusal when dmarc.reject says so), DKIM signing for our users'
    mail (the signatures as headers to add).  Only for a message held in
    memory (up to dkim.max_message_size): dkimpy needs it whole."""

    name = "msgauth"
    stages = frozenset({Stage.MESSAGE})

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        auth = self.ctx.authenticator
        message = state.message
        if auth is None or message is None:
            return ACCEPT
        if state.auth_user is None and not state.trusted:
            return Deferred.fromCoroutine(self._verify(auth, message, state))
        domain = auth.signing_domain(state.header_lines)
        if domain:
            return Deferred.fromCoroutine(self._sign(auth, message, domain))
        return ACCEPT

    @staticmethod
    async def _verify(auth: Any, message: bytes, state: CheckState) -> Verdict:
        result = await auth.verify(message, state.header_lines, state.facts.get("spf"))
        facts = {"dmarc": result.dmarc}
        if result.reject is not None:
            return Verdict(Action.REJECT, result.reject, auth_results=tuple(result.clauses),
                           facts=facts, reason="dmarc")
        return Verdict(auth_results=tuple(result.clauses), facts=facts)

    @staticmethod
    async def _sign(auth: Any, message: bytes, domain: str) -> Verdict:
        signatures = await auth.sign(message, domain)
        return Verdict(headers=tuple(signatures)) if signatures else ACCEPT


class ForwardingSRS(_Check):
    """Forwarded mail (a local alias to a remote address) gets an SRS sender,
    recorded in the envelope (:func:`mta.policy.srs.forwarding_extra`)."""

    name = "srs"
    stages = frozenset({Stage.MESSAGE})

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        ctx = self.ctx
        local_domains = ctx.config.local_domains
        if ctx.srs is None or not local_domains:  # only a local alias forwards
            return ACCEPT
        from mta.policy.srs import forwarding_extra

        extra = forwarding_extra(state.sender or "", state.expanded, ctx.srs, local_domains)
        return Verdict(envelope=extra) if extra else ACCEPT


# --- issue 17: DNS blocklists and greylisting (run only when [checks] order names them) ---


def _exempt(recipient: Any, exempt: tuple[str, ...]) -> bool:
    """``recipient`` is one of ``exempt``: a local part (at any domain) or an address."""
    if recipient is None:
        return False
    local = recipient.local.lower()
    return local in exempt or f"{local}@{recipient.domain.lower()}" in exempt


class DNSBlocklist(_Check):
    """``[dnsbl]``: the client refused with 554 5.7.1 naming the lists, when its
    summed weight reaches the threshold (:mod:`mta.policy.dnsbl`).  At CONNECT
    (``stage = "connect"``) the refusal is the greeting and the session then
    only takes QUIT (RFC 5321 §3.1); at RCPT each recipient is refused but
    ``exempt_recipients`` (postmaster, abuse: RFC 2142 §4, a listed sender must
    still be able to reach them).  Never for relay_networks or an authenticated
    client, and only on ``mx`` listeners: the submission ports' users
    authenticate, and often send from addresses that policy lists (dynamic
    ranges) name.  A lookup that fails counts as not listed (logged by the screen)."""

    name = "dnsbl"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        from mta.policy.dnsbl import Screen
        from mta.system.dns import make_resolver

        config = ctx.config
        self.stages = frozenset({Stage.CONNECT if config.dnsbl.stage == "connect" else Stage.RCPT})
        self.screen = Screen(config.dnsbl, make_resolver(config.dns), ctx.clock)
        ctx.screen = self.screen  # what the greylist asks about DNS allowlisting

    @staticmethod
    def applies(client: Client) -> bool:
        return client.listener_kind == "mx" and not client.trusted and not client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict | Deferred[Verdict]:
        if state.trusted or state.auth_user is not None or state.listener_kind != "mx":
            return ACCEPT
        if stage is Stage.RCPT and _exempt(state.recipient, self.screen.config.exempt_recipients):
            return ACCEPT
        score = self.screen.score(state.client_ip)
        if isinstance(score, tuple):  # every answer was in the cache
            return self._decided(score, state.client_ip)
        return score.addCallback(self._decided, state.client_ip)

    def _decided(self, score: Any, ip: str) -> Verdict:
        if score.total < self.screen.config.threshold:
            return ACCEPT
        return reject(R.dnsbl_listed(ip, score.names()), reason="dnsbl")


class Greylisting(_Check):
    """``[greylist]`` (:mod:`mta.policy.greylist`): 451 4.7.1 for a triplet's first
    attempt at RCPT, as postgrey; never for relay_networks, an authenticated
    client or one a DNS allowlist vouches for (dnsbl.allowlist_threshold)."""

    name = "greylist"
    stages = frozenset({Stage.RCPT})

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        import sqlite3

        from mta.config import ConfigError
        from mta.policy.greylist import Greylist

        try:
            self.greylist = Greylist(ctx.config.greylist, ctx.clock)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError("greylist.db", f"cannot open {ctx.config.greylist.db}: {e}") from None

    @staticmethod
    def applies(client: Client) -> bool:
        return not client.trusted and not client.authenticated

    def check(self, stage: Stage, state: CheckState) -> Verdict:
        if state.trusted or state.auth_user is not None or state.recipient is None:
            return ACCEPT
        screen = getattr(self.ctx, "screen", None)
        if screen is not None and screen.allowlisted(state.client_ip):
            return ACCEPT
        decision = self.greylist.check(state.client_ip, state.sender or "", str(state.recipient))
        if decision.passed:
            return ACCEPT
        return reject(R.greylisted(decision.wait), reason=f"greylist_{decision.why}")


# Name in [checks] order -> the class, called with the server context.
def _directory_failed(failure: Any) -> Verdict:
    """An SQL directory that could not answer (logged by it, event ``directory``):
    a temporary refusal (RFC 3463 4.3.0), so the client tries again later."""
    from mta.policy.directory import DirectoryUnavailable

    failure.trap(DirectoryUnavailable)
    return reject(R.DIRECTORY_UNAVAILABLE, reason="directory")


BUILTIN: dict[str, Any] = {cls.name: cls for cls in (
    ConnectionLimits, HeloName, SenderBinding, UserRate, SPF, RecipientLookup,
    ForgedAuthResults, ReceivedLoop, SubmissionHeaders, FromBinding, MessageAuth, MilterCheck,
    ForwardingSRS,
    DNSBlocklist, Greylisting,  # issue 17: optional, named in [checks] order
)}
