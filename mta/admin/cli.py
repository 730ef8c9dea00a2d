"""The ``mta`` admin command: queue, users, aliases, configuration check, reload.

Every subcommand takes ``--config PATH`` (default: the embedded demo
configuration, as ``twistd -n mta`` without ``--config``; nothing is created).

* ``queue list`` and ``queue show`` read the queue directory directly, so they
  work with the daemon stopped;
* ``queue flush|bounce``, ``reload`` and ``status`` ask the running daemon over
  the control socket (:mod:`mta.daemon.control`) and fail clearly when it is not
  running; ``queue delete`` goes through the daemon when it runs (so the runner
  forgets the message) and removes the files itself when it does not;
* ``user add|passwd|remove`` edit the users file and then ask a running daemon
  to reload (with an SQL directory they edit its tables instead, and every node
  sees the change within directory.cache_ttl: :mod:`mta.admin.directory_cli`,
  which also has ``alias add|remove``, ``domain ...`` and ``directory ...``).

Output is an aligned table for people, ``--json`` for scripts where offered;
errors go to stderr as ``mta: ...`` with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from mta.admin import directory_cli
from mta.admin.control import ControlError, ControlUnavailable, DaemonNotRunning, call
from mta.config import Config, ConfigError, load_config
from mta.daemon.control import valid_queue_id
from mta.queue.envelope import Envelope
from mta.queue.layout import QueuedMessage, is_queued, list_ids
from mta.queue.layout import load_envelope as queued_envelope

MAX_HEADER_READ = 1024 * 1024


class CLIError(Exception):
    """A problem to print as ``mta: ...`` with exit status 1."""


# --- output helpers -----------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
        lines.append("  ".join(cells).rstrip())
    return lines


def human_size(n: int) -> str:
    """Octets as people read them: 512, 1.2K, 3.4M."""
    if n < 1024:
        return str(n)
    value = n / 1024
    unit = "K"
    for bigger in ("M", "G"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


class Progress:
    """``label n/total`` on one self-rewriting stderr line, for long operations.

    Shown only on a terminal and only when there is enough to do; at most one
    update per ``interval`` seconds.
    """

    def __init__(self, stream: TextIO, total: int, label: str, enabled: bool | None = None,
                 min_total: int = 200, interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if enabled is None:
            enabled = stream.isatty()
        self.stream = stream
        self.total = total
        self.label = label
        self.enabled = enabled and total >= min_total
        self.interval = interval
        self.clock = clock
        self._last = -interval
        self._shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self._last < self.interval and done < self.total:
            return
        self._last = now
        self.stream.write(f"\r{self.label} {done}/{self.total}")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(f"mta: {line}\n")


def _print_json(value: Any) -> None:
    _out(json.dumps(value, indent=2, ensure_ascii=False))


# --- reading the queue directly ----------------------------------------------------------


def read_queue(queue_dir: Path, stderr: TextIO | None = None) -> list[Envelope]:
    """Every committed envelope in ``queue_dir``, oldest first; unreadable ones are
    reported on stderr and skipped, ones removed meanwhile are skipped."""
    stderr = stderr or sys.stderr
    msg_dir = queue_dir / "msg"
    if not msg_dir.is_dir():
        raise CLIError(f"no queue at {queue_dir} (wrong --config, or the daemon has never "
                       "run with this configuration?)")
    try:
        ids = list_ids(msg_dir)
    except OSError as e:
        raise CLIError(f"cannot read {msg_dir}: {e.strerror or e}") from None
    progress = Progress(stderr, len(ids), "reading envelopes")
    envelopes = []
    for i, queue_id in enumerate(ids, 1):
        progress.update(i)
        try:
            envelopes.append(queued_envelope(msg_dir, queue_id))
        except FileNotFoundError:
            continue  # delivered and removed while we listed
        except (OSError, ValueError, KeyError, TypeError) as e:
            stderr.write(f"mta: cannot read the envelope of {queue_id} in {msg_dir}: {e}\n")
    progress.finish()
    envelopes.sort(key=lambda env: (env.created, env.id))
    return envelopes


def load_envelope(queue_dir: Path, queue_id: str) -> Envelope:
    _check_id(queue_id)
    try:
        return queued_envelope(queue_dir / "msg", queue_id)
    except FileNotFoundError:
        raise CLIError(f"no message {queue_id} in the queue at {queue_dir}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"cannot read the envelope of {queue_id}: {e}") from None


def read_headers(data_path: Path, limit: int = MAX_HEADER_READ) -> str:
    """The header section of a queued message (up to the blank line), as text."""
    lines = []
    size = 0
    with QueuedMessage(data_path).open() as f:
        for line in f:
            if line in (b"\r\n", b"\n"):
                break
            size += len(line)
            if size > limit:
                lines.append(b"[... header section truncated ...]\r\n")
                break
            lines.append(line)
    return b"".join(lines).decode("utf-8", "replace").replace("\r\n", "\n")


def _check_id(queue_id: str) -> None:
    if not valid_queue_id(queue_id):
        raise CLIError(f"{queue_id!r} is not a queue id")


def _envelope_json(env: Envelope, now: float) -> dict[str, Any]:
    data = json.loads(env.to_bytes())
    data.pop("version", None)
    data["age"] = round(now - env.created, 3)
    return data


def _recipient_label(address: str, original: str) -> str:
    return address if original in ("", address) else f"{address} (for {original})"


def queue_rows(envelopes: Sequence[Envelope], now: float) -> list[list[str]]:
    rows = []
    for env in envelopes:
        first = [env.id, human_age(now - env.created), human_size(env.size),
                 f"<{env.sender}>" if env.sender == "" else env.sender]
        for i, r in enumerate(env.recipients or []):
            lead = first if i == 0 else ["", "", "", ""]
            state = "held" if env.hold and not r.state.final else str(r.state)  # issue 17
            rows.append(lead + [_recipient_label(r.address, r.original), state,
                                r.last_reply])
        if not env.recipients:
            rows.append(first + ["", "", ""])
    return rows


# --- the control channel -----------------------------------------------------------------


def _ask(config: Config, command: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Ask the daemon; a stopped daemon or an error becomes a CLIError."""
    try:
        return call(config.control_socket, command, timeout=timeout, **args)
    except DaemonNotRunning as e:
        raise CLIError(f"{e}; start it first (systemctl start mta, or twistd -n mta "
                       "--config ...)") from None
    except (ControlUnavailable, ControlError) as e:
        raise CLIError(str(e)) from None


# --- queue -------------------------------------------------------------------------------


def cmd_queue_list(config: Config, args: argparse.Namespace) -> int:
    envelopes = read_queue(config.queue_dir)
    held = getattr(args, "held", False)
    if held:  # issue 17: the hold queue only
        envelopes = [env for env in envelopes if env.hold]
    now = time.time()
    envelopes, filtered = _filtered(envelopes, args), envelopes  # issue 21 (queueviews)
    if getattr(args, "summary", False):
        return _queue_summary(envelopes, now, args.json)
    if filtered and not envelopes and not args.json:
        _out(f"no message matches (of {len(filtered)} queued)")
        return 0
    if args.json:
        _print_json([_envelope_json(env, now) for env in envelopes])
        return 0
    if not envelopes:
        _out("no held messages" if held else "queue is empty")
        return 0
    headers = ["ID", "AGE", "SIZE", "SENDER", "RECIPIENT", "STATE", "LAST REPLY"]
    for line in format_table(headers, queue_rows(envelopes, now)):
        _out(line)
    for env in envelopes:  # issue 17: why each held message is held
        if env.hold:
            _out(f"{env.id} held: {env.hold}")
    total = sum(env.size for env in envelopes)
    count = len(envelopes)
    _out(f"-- {count} message{'s' if count != 1 else ''}, {human_size(total)} in total")
    return 0


# --- queue views (issue 21): filters, the qshape-like summary, trace -----------------------


def _filtered(envelopes: list[Envelope], args: argparse.Namespace) -> list[Envelope]:
    from mta.admin.queueviews import select

    return select(envelopes, sender=getattr(args, "sender", None),
                  recipient=getattr(args, "recipient", None),
                  destination=getattr(args, "destination", None),
                  state=getattr(args, "state", None))


def _queue_summary(envelopes: list[Envelope], now: float, as_json: bool) -> int:
    from mta.admin.queueviews import bucket_labels, state_counts, states_line, summary, summary_json

    rows = summary(envelopes, now)
    states = state_counts(envelopes)  # active, deferred, held (issue 17's hold queue)
    if as_json:
        _print_json(summary_json(rows, states))
        return 0
    headers = ["DESTINATION", "T", *bucket_labels()]
    for line in format_table(headers, [[d, t, *c] for d, t, c in rows]):
        _out(line)
    _out("-- messages by age in minutes (a message counts once per destination)")
    _out(states_line(states))
    return 0


def _add_queue_view_arguments(parser: argparse.ArgumentParser) -> None:
    from mta.admin.queueviews import STATES

    parser.add_argument("--summary", action="store_true",
                        help="messages per destination and age, as Postfix's qshape")
    parser.add_argument("--sender", metavar="ADDRESS", help="user@domain, domain or <>")
    parser.add_argument("--recipient", metavar="ADDRESS", help="user@domain or domain")
    parser.add_argument("--destination", metavar="DOMAIN",
                        help="a domain still to deliver to (local: this host's mailboxes)")
    parser.add_argument("--state", choices=STATES)


def cmd_queue_trace(config: Config, args: argparse.Namespace) -> int:
    from mta.admin.queueviews import log_files, read_events, trace, trace_lines

    if config.log_json is None:
        raise CLIError("queue trace reads the JSON log: set log_json in the configuration "
                       "(the daemon writes it, and each worker beside it)")
    target = args.target.strip()
    is_id = valid_queue_id(target)
    if not is_id and "@" not in target:
        raise CLIError(f"{target!r} is neither a queue id nor an address")
    errors: list[str] = []
    events = trace(read_events(log_files(config.log_json), errors), target.strip("<>"), is_id)
    for error in errors:
        _err(error)
    if args.json:
        _print_json(events)
        return 0
    if not events:
        _out(f"no log events for {target} in {config.log_json} (and its worker logs)")
        return 1
    for line in trace_lines(events):
        _out(line)
    return 0


def cmd_queue_show(config: Config, args: argparse.Namespace) -> int:
    env = load_envelope(config.queue_dir, args.id)
    data_path = config.queue_dir / "msg" / f"{env.id}.msg"
    try:
        headers = read_headers(data_path)
    except OSError as e:
        headers = ""
        _err(f"cannot read {data_path}: {e.strerror or e}")
    now = time.time()
    if args.json:
        _print_json({"envelope": _envelope_json(env, now), "headers": headers})
        return 0
    created = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(env.created))
    fields = [
        ("Queue ID", env.id),
        ("Created", f"{created} ({human_age(now - env.created)} ago)"),
        ("Size", f"{env.size} bytes"),
        ("Sender", f"<{env.sender}>"),
        ("Client", " ".join(x for x in (env.client_ip, env.client_helo and
                                         f"helo={env.client_helo}") if x) or "-"),
        ("Auth user", env.auth_user or "-"),
        ("TLS", env.tls or "-"),
        ("Body", ("8bit" if env.body_8bit else "7bit") + (" SMTPUTF8" if env.smtputf8 else "")),
    ]
    if env.extra:
        fields.append(("Extra", json.dumps(env.extra, ensure_ascii=False)))
    if env.hold:  # issue 17
        fields.append(("Held", env.hold))
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        _out(f"{(name + ':').ljust(width)} {value}")
    _out()
    rows = []
    for r in env.recipients:
        nxt = "-"
        if not r.state.final and r.next_attempt:
            nxt = "now" if r.next_attempt <= now else f"in {human_age(r.next_attempt - now)}"
        rows.append([_recipient_label(r.address, r.original), str(r.kind), str(r.state),
                     str(r.attempts), nxt, r.last_reply])
    for line in format_table(["RECIPIENT", "KIND", "STATE", "ATTEMPTS", "NEXT", "LAST REPLY"],
                             rows):
        _out(line)
    _out()
    _out(headers.rstrip("\n"))
    return 0


def cmd_queue_flush(config: Config, args: argparse.Namespace) -> int:
    if args.id is not None:
        _check_id(args.id)
        answer = _ask(config, "flush", id=args.id)
    else:
        answer = _ask(config, "flush")
    n = answer.get("messages", 0)
    _out(f"flushed {n} message{'s' if n != 1 else ''}: delivery is being attempted now")
    return 0


def cmd_queue_delete(config: Config, args: argparse.Namespace) -> int:
    _check_id(args.id)
    try:
        call(config.control_socket, "delete", id=args.id)
    except DaemonNotRunning:
        delete_files(config.queue_dir, args.id)
        _out(f"deleted {args.id} (the daemon is not running: removed its queue files)")
        return 0
    except (ControlUnavailable, ControlError) as e:
        raise CLIError(str(e)) from None
    _out(f"deleted {args.id}")
    return 0


def delete_files(queue_dir: Path, queue_id: str) -> None:
    """Remove a message's files while no daemon runs: the data first, as the store does."""
    msg = queue_dir / "msg"
    data = msg / f"{queue_id}.msg"
    if not is_queued(msg, queue_id):  # a spare queue file is no message either
        raise CLIError(f"no message {queue_id} in the queue at {queue_dir}")
    for path in (data, msg / f"{queue_id}.json"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CLIError(f"cannot remove {path}: {e.strerror or e}") from None


def cmd_queue_release(config: Config, args: argparse.Namespace) -> int:
    """Issue 17: a held message back into the active queue (through the daemon,
    whose runner delivers it at once)."""
    _check_id(args.id)
    _ask(config, "release", id=args.id)
    _out(f"released {args.id}: delivery is being attempted now")
    return 0


def cmd_queue_bounce(config: Config, args: argparse.Namespace) -> int:
    _check_id(args.id)
    answer = _ask(config, "bounce", id=args.id)
    n = answer.get("failed", 0)
    _out(f"bounced {args.id}: {n} recipient{'s' if n != 1 else ''} failed, the sender is "
         "notified")
    return 0


# --- users -------------------------------------------------------------------------------


def _local_domain(config: Config, domain: str) -> str:
    from mta.mail.address import AddressError, normalize_domain

    try:
        normalized = normalize_domain(domain)
    except AddressError as e:
        raise CLIError(f"{domain!r}: {e}") from None
    if normalized not in config.local_domains:
        known = ", ".join(config.local_domains) or "none"
        raise CLIError(f"{domain} is not a local domain of this configuration "
                       f"(local_domains: {known})")
    return normalized


def read_password(stdin: TextIO | None = None) -> str:
    """Twice with getpass on a terminal; otherwise the first line of stdin. Never argv."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Repeat password: ")
        if first != second:
            raise CLIError("the passwords do not match")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CLIError("empty password")
    return password


def _owner_reference(path: Path) -> os.stat_result | None:
    """The stat of ``path`` or of its nearest existing ancestor (whose owner a new file gets)."""
    for candidate in (path, *path.parents):
        try:
            return candidate.stat()
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def _keep_owner(path: Path, reference: os.stat_result | None) -> None:
    """Give a rewritten file its previous owner and group (when running as root).

    The daemon reads users files as its own user after a reload; a file
    rewritten by root must not become unreadable to it.
    """
    if reference is None or os.geteuid() != 0:
        return
    st = path.stat()
    if (st.st_uid, st.st_gid) != (reference.st_uid, reference.st_gid):
        os.chown(path, reference.st_uid, reference.st_gid)


def _edit_users(config: Config, args: argparse.Namespace, edit: Callable[[Path], None]) -> int:
    from mta.policy.auth import UserEditError, UsersFileError

    domain = _local_domain(config, args.domain)
    path = config.users_file(domain)
    reference = _owner_reference(path)
    try:
        edit(path)
    except (UserEditError, UsersFileError, ValueError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
    _keep_owner(path, reference)
    return _reload_after_change(config, f"{path} updated")


def _reload_after_change(config: Config, what: str) -> int:
    try:
        call(config.control_socket, "reload", timeout=60.0)
    except DaemonNotRunning:
        _out(f"{what} (the daemon is not running; it reads the change when it starts)")
        return 0
    except (ControlUnavailable, ControlError) as e:
        _out(what)
        _err(f"the daemon did not reload, so the change is not in effect yet: {e}")
        return 1
    _out(f"{what}; the daemon has reloaded")
    return 0


def cmd_user_add(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import add_user, check_local

    if directory_cli.sql(config):
        return directory_cli.user_add(config, args)

    try:
        check_local(args.user)
    except ValueError as e:
        raise CLIError(str(e)) from None
    password = read_password()
    return _edit_users(config, args, lambda path: add_user(path, args.user, password))


def cmd_user_passwd(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import UsersFileError, check_local, read_users_file, set_password

    if directory_cli.sql(config):
        return directory_cli.user_passwd(config, args)
    domain = _local_domain(config, args.domain)
    try:
        folded = check_local(args.user)
        users = read_users_file(config.users_file(domain))
    except (ValueError, UsersFileError) as e:
        raise CLIError(str(e)) from None
    if folded not in users:
        raise CLIError(f"no user {folded!r} in {config.users_file(domain)}")
    password = read_password()
    return _edit_users(config, args, lambda path: set_password(path, args.user, password))


def cmd_user_remove(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import remove_user

    if directory_cli.sql(config):
        return directory_cli.user_remove(config, args)
    return _edit_users(config, args, lambda path: remove_user(path, args.user))


def cmd_user_list(config: Config, args: argparse.Namespace) -> int:
    from mta.policy.auth import UsersFileError, read_users_file

    if directory_cli.sql(config):
        return directory_cli.user_list(config, args)
    domain = _local_domain(config, args.domain)
    try:
        users = sorted(read_users_file(config.users_file(domain)))
    except UsersFileError as e:
        raise CLIError(str(e)) from None
    if args.json:
        _print_json(users)
    elif not users:
        _out(f"no users in {domain}")
    else:
        for user in users:
            _out(f"{user}@{domain}")
    return 0


# --- aliases -----------------------------------------------------------------------------


def _srs_rewriter(config: Config) -> Any:
    """The daemon's SRS rewriter (to follow SRS0= bounce addresses), if its secret is readable.

    Never creates the secret file: that is the daemon's job.
    """
    from mta.policy.srs import SRSRewriter

    secret = config.srs_secret
    if secret is None:
        try:
            secret = (config.data_dir / "srs-secret").read_text().strip()
        except OSError:
            return None
    return SRSRewriter(secret)


def cmd_alias_resolve(config: Config, args: argparse.Namespace) -> int:
    aliases, local_domains, close = _directory_aliases(config)
    try:
        return _resolve_and_show(config, args, aliases, local_domains)
    finally:
        if close is not None:
            close()


def _directory_aliases(config: Config) -> tuple[Any, Any, Callable[[], None] | None]:
    """``(aliases, local domains, close)`` from the configured directory: the
    files, or the SQL back end (then ``close`` closes it)."""
    from mta.policy.aliases import AliasFileError, AliasResolver
    from mta.policy.auth import UserDB, UsersFileError

    try:
        if directory_cli.sql(config):
            return directory_cli.resolver(config)
        users = UserDB.load(config.domains_dir, config.local_domains)
        return (AliasResolver.load(config.domains_dir, config.local_domains, users, config.aliases),
                config.local_domains, None)
    except (UsersFileError, AliasFileError) as e:
        raise CLIError(str(e)) from None


def _resolve_and_show(config: Config, args: argparse.Namespace, aliases: Any,
                      local_domains: Any) -> int:
    from mta.mail.address import AddressError, parse_mailbox
    from mta.policy.directory import DirectoryUnavailable
    from mta.policy.relay import check_recipient

    try:
        address = parse_mailbox(args.address.strip().strip("<>"), smtputf8=True)
    except AddressError as e:
        raise CLIError(f"{args.address!r} is not an address: {e}") from None
    # may_relay: show where an authenticated sender's mail would go.
    try:
        decision = check_recipient(address, local_domains, aliases, may_relay=True,
                                   srs=_srs_rewriter(config))
    except DirectoryUnavailable as e:
        raise CLIError(f"the directory cannot be reached: {e}") from None
    if decision.reply is not None:
        raise CLIError(f"{address}: refused with {decision.reply}")
    targets = [{"kind": t.kind, "address": t.address, "mailbox": t.mailbox}
               for t in decision.targets]
    if args.json:
        _print_json(targets)
        return 0
    rows = [[t["kind"], t["address"], t["mailbox"] or ("-" if t["kind"] != "local"
                                                        else "(unknown: fails 5.1.1)")]
            for t in targets]
    for line in format_table(["KIND", "ADDRESS", "MAILBOX"], rows):
        _out(line)
    if address.domain not in local_domains:
        _out(f"({address.domain} is not local: relayed only for authenticated senders and "
             "relay_networks)")
    return 0


# --- route explain -----------------------------------------------------------------------


def cmd_route_explain(config: Config, args: argparse.Namespace) -> int:
    """Every step of the routing decision for one recipient (mta.admin.explain)."""
    from mta.admin.explain import Explainer
    from mta.mail.address import AddressError, parse_mailbox
    from mta.policy.relay import check_recipient

    try:
        address = parse_mailbox(args.address.strip().strip("<>"), smtputf8=True)
    except AddressError as e:
        raise CLIError(f"{args.address!r} is not an address: {e}") from None
    # The aliases of the configured directory (files or SQL), as the daemon sees them.
    aliases, local_domains, close = _directory_aliases(config)
    try:
        decision = check_recipient(address, local_domains, aliases, may_relay=True,
                                   srs=_srs_rewriter(config))
    finally:
        if close is not None:
            close()
    refused = str(decision.reply) if decision.reply is not None else None
    result = _in_reactor(lambda reactor: Explainer(
        config, _mx_resolver(config, reactor), dane=_dane(config, reactor),
        local_domains=local_domains).explain(
        address, list(decision.targets), refused))
    if args.json:
        _print_json(result)
    else:
        for line in format_table(["STEP", "SOURCE", "DETAIL"],
                                 [[s["step"], s["source"], s["detail"]] for s in result["steps"]]):
            _out(line)
    return 0


def _mx_resolver(config: Config, reactor: Any) -> Any:
    from mta.delivery.mx import MXResolver
    from mta.system.dns import make_resolver

    return MXResolver(make_resolver(config.dns, reactor), own_names=(config.hostname,))


def _dane(config: Config, reactor: Any) -> Any:
    """The daemon's DANE policy (its resolver check started), or None without [dane]."""
    from mta.delivery.wiring import build_dane

    return build_dane(config, reactor)


def _in_reactor(make: Callable[[Any], Any]) -> Any:
    """Run the coroutine ``make(reactor)`` on a reactor started for it; its result."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    box: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(make(reactor))
        d.addBoth(box.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# --- check-config ------------------------------------------------------------------------


def _dir_problem(path: Path, key: str) -> str | None:
    """Why the daemon could not write in ``path`` (or create it), or None."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:  # pragma: no cover - "/" always exists
        return f"{key}: {path}: no existing parent directory"
    if not existing.is_dir():
        return f"{key}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is not writable" if existing == path else f"cannot be created ({existing} is " \
                                                          "not writable)"
        return f"{key}: {path} {verb}"
    return None


def config_problems(config: Config) -> list[str]:
    """Everything wrong with the files and directories ``config`` names."""
    from mta.daemon.control import MAX_SOCKET_PATH
    from mta.policy.aliases import (
        CATCH_ALL,
        AliasFileError,
        AliasLoopError,
        AliasResolver,
        read_aliases_file,
    )
    from mta.policy.auth import UserDB, UsersFileError, read_users_file
    from mta.system.tls import TLSConfigError, server_tls

    problems: list[str] = []
    try:
        server_tls(config.tls)
    except TLSConfigError as e:
        problems.append(f"tls: {e}")
    if config.mta_sts.cert_file is not None:  # issue 21: the MTA-STS policy's own certificate
        from mta.daemon.mtasts import policy_tls

        try:
            policy_tls(config)
        except TLSConfigError as e:
            problems.append(f"mta_sts: {e}")
    users: dict[str, dict[str, str]] = {}
    rules: dict[str, dict[str, Any]] = {}
    for domain in config.local_domains:
        try:
            users[domain] = read_users_file(config.users_file(domain))
        except UsersFileError as e:
            problems.append(str(e))
        try:
            rules[domain] = read_aliases_file(config.aliases_file(domain), domain)
        except AliasFileError as e:
            problems.append(str(e))
    resolver = AliasResolver(rules, UserDB(users), config.aliases, config.local_domains)
    for domain, table in rules.items():
        for name in table:
            if name == CATCH_ALL:
                continue
            try:
                resolver.resolve(f"{name}@{domain}")
            except AliasLoopError as e:
                problems.append(f"{config.aliases_file(domain)}: alias {name!r}: {e}")
    try:
        from mta.policy.identities import Identities, IdentitiesFileError
    except ImportError:  # pragma: no cover - older trees
        pass
    else:
        try:
            Identities.load(config.domains_dir, config.local_domains,
                            config.aliases.suffix_separators)
        except IdentitiesFileError as e:
            problems.append(str(e))
    if directory_cli.sql(config):  # the SQL directory: reachable, and at this schema
        try:
            directory_cli._admin(config).store.close()
        except CLIError as e:
            problems.append(f"directory: {e}")
    for key, path in (("queue_dir", config.queue_dir), ("queue_dir", config.queue_dir / "tmp"),
                      ("queue_dir", config.queue_dir / "msg"), ("mail_dir", config.mail_dir),
                      ("control_socket", config.control_socket.parent)):
        problem = _dir_problem(path, key)
        if problem and problem not in problems:
            problems.append(problem)
    problems.extend(_bind_problems(config))
    for entry in config.delivery.routes:
        key = f'delivery.route."{entry.key}".tls'
        if entry.tls == "dane" and not config.dane.enabled:
            problems.append(f"{key}: dane needs [dane] enabled = true (until then mail for "
                            f"{entry.key} is deferred)")
        elif entry.tls == "mta-sts" and not config.delivery_sts.enabled:
            problems.append(f"{key}: mta-sts needs [delivery.mta_sts] enabled = true (until "
                            f"then mail for {entry.key} is deferred)")
    if len(os.fsencode(config.control_socket)) > MAX_SOCKET_PATH:
        problems.append(f"control_socket: {config.control_socket} is longer than "
                        f"{MAX_SOCKET_PATH} octets (the limit for a Unix socket path)")
    problems += milter_problems(config)
    return problems


def milter_problems(config: Config) -> list[str]:
    """Each configured milter that cannot be reached or does not negotiate (issue 17),
    and milters configured for listeners while ``milter`` is not in [checks] order."""
    from mta.policy.milter.probe import probe

    milters = config.milters
    problems = []
    if (milters.smtpd or milters.by_kind) and "milter" not in config.checks.order:
        problems.append("milters: listeners have milters, but milter is not in checks.order")
    for m in milters.milters:
        problem = probe(m)
        if problem:
            problems.append(f"milters.{m.name}: unreachable: {problem}")
    return problems


def _bind_problems(config: Config) -> list[str]:
    """Outbound source addresses (delivery.bind_address*, route entries) this host
    cannot send from: every connection from them would fail."""
    import socket

    d = config.delivery
    keys = [("delivery.", d.bind_address, d.bind_address6)]
    keys += [(f'delivery.route."{e.key}".', e.bind_address, e.bind_address6) for e in d.routes]
    problems = []
    for prefix, v4, v6 in keys:
        for name, address, family in (("bind_address", v4, socket.AF_INET),
                                      ("bind_address6", v6, socket.AF_INET6)):
            if address is None:
                continue
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((address, 0))
            except OSError as e:
                problems.append(f"{prefix}{name}: cannot send from {address} on this host "
                                f"({e.strerror or e})")
    return problems


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    problems = config_problems(config)
    for problem in problems:
        _out(problem)
    if problems:
        return 1
    _out("configuration OK")
    return 0


# --- daemon ------------------------------------------------------------------------------


def cmd_reload(config: Config, args: argparse.Namespace) -> int:
    answer = _ask(config, "reload", timeout=60.0)
    _out("reloaded" + (f": {answer['message']}" if answer.get("message") else ""))
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    answer = _ask(config, "status")
    answer.pop("ok", None)
    if args.json:
        _print_json(answer)
        return 0
    _out(f"running: pid {answer.get('pid')}, {answer.get('hostname')}, up "
         f"{human_age(answer.get('uptime', 0))}")
    _out(f"queue: {answer.get('queued')} messages, {answer.get('in_flight')} in delivery"
         + ("" if answer.get("delivery") else " (delivery is off)"))
    for lst in answer.get("listeners", []):
        _out(f"listener {lst['name']}: {lst['endpoint']} ({lst['kind']})")
    return 0


def cmd_dkim_keygen(config: Config, args: argparse.Namespace) -> int:
    """Write a new DKIM key and print the DNS record to publish and the config to add."""
    from mta.mail.address import AddressError, normalize_domain
    from mta.policy.dkim import dns_record_name, generate_key

    try:
        domain = normalize_domain(args.domain)
    except AddressError as e:
        raise CLIError(f"bad domain {args.domain!r}: {e}") from None
    if not args.selector.replace("-", "").replace("_", "").isalnum():
        raise CLIError(f"bad selector {args.selector!r}: letters, digits, - and _ only")
    key_file = Path(args.key_file) if args.key_file else (
        config.domains_dir / domain / f"dkim-{args.selector}.pem")
    try:
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        record = generate_key(args.type, key_file)
    except FileExistsError:
        raise CLIError(f"{key_file} exists already; choose another selector") from None
    except OSError as e:
        raise CLIError(f"cannot write {key_file}: {e.strerror}") from None
    name = dns_record_name(args.selector, domain)
    # TXT strings are at most 255 octets (RFC 1035 §3.3); split long keys.
    chunks = [record[i:i + 250] for i in range(0, len(record), 250)]
    _out(f"wrote {key_file}")
    _out("publish this DNS record:")
    _out(f'{name}. IN TXT ( {" ".join(chr(34) + c + chr(34) for c in chunks)} )')
    _out("and add to the configuration, then reload:")
    _out(f'[[dkim.keys]]\ndomain = "{domain}"\nselector = "{args.selector}"\nkey_file = "{key_file}"')
    return 0


def cmd_dns_check(config: Config, args: argparse.Namespace) -> int:
    """The records to publish and what DNS answers (:mod:`mta.admin.dnscheck`)."""
    from mta.admin import dnscheck

    if args.domain:
        domains = [_local_domain(config, args.domain)]
    elif config.local_domains:
        domains = list(config.local_domains)
    else:
        raise CLIError("no local_domains in this configuration: nothing to check")
    reports, host = dnscheck.run_checks(config, domains, https_port=args.https_port)
    if args.json:
        _print_json(dnscheck.report_json(config.hostname, reports, host))
    else:
        for line in dnscheck.report_lines(config.hostname, reports, host):
            _out(line)
    return 0 if dnscheck.all_ok(reports, host) else 1


# --- argument parsing --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", default=argparse.SUPPRESS,
                        help="the TOML configuration file (default: the embedded demo "
                             "configuration, as for `twistd -n mta`)")
    parser = argparse.ArgumentParser(prog="mta", parents=[common],
                                     description="Administer the mta mail transfer agent.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(parent: Any, name: str, func: Callable[[Config, argparse.Namespace], int],
            help: str, json_flag: bool = False) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    queue = sub.add_parser("queue", help="list, inspect, flush, delete or bounce queued mail")
    qsub = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(qsub, "list", cmd_queue_list, "list queued messages", json_flag=True)
    p.add_argument("--held", action="store_true", help="only the held (quarantined) messages")
    p = add(qsub, "show", cmd_queue_show, "show a message's envelope and headers",
            json_flag=True)
    p.add_argument("id")
    p = add(qsub, "flush", cmd_queue_flush, "attempt delivery now (all messages, or one)")
    p.add_argument("id", nargs="?")
    p = add(qsub, "delete", cmd_queue_delete, "remove a message without notifying anyone")
    p.add_argument("id")
    p = add(qsub, "release", cmd_queue_release,
            "release a held (quarantined) message: deliver it now")
    p.add_argument("id")
    p = add(qsub, "bounce", cmd_queue_bounce,
            "give up on a message: fail its pending recipients and notify the sender")
    p.add_argument("id")

    _add_queue_view_arguments(qsub.choices["list"])  # issue 21
    p = add(qsub, "trace", cmd_queue_trace, "every log event of a message (or of an "
            "address's messages), from the main process and the workers, by time",
            json_flag=True)
    p.add_argument("target", metavar="ID|ADDRESS")

    user = sub.add_parser("user", help="manage the users (SMTP AUTH accounts) of a domain")
    usub = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, text in (("add", cmd_user_add, "add a user (password from a prompt or "
                                                   "the first line of stdin)"),
                             ("passwd", cmd_user_passwd, "change a user's password"),
                             ("remove", cmd_user_remove, "remove a user")):
        p = add(usub, name, func, text)
        p.add_argument("domain")
        p.add_argument("user", help="the local part, without @domain")
    p = add(usub, "list", cmd_user_list, "list a domain's users", json_flag=True)
    p.add_argument("domain")

    alias = sub.add_parser("alias", help="aliases")
    asub = alias.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(asub, "resolve", cmd_alias_resolve, "show where mail to an address goes",
            json_flag=True)
    p.add_argument("address")
    # alias add/remove, domain ..., directory ...
    directory_cli.register(sub, add, asub, sys.modules[__name__])

    route = sub.add_parser("route", help="routing of outbound mail")
    rsub = route.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(rsub, "explain", cmd_route_explain, "show every step of the routing decision for "
            "one recipient: aliases, route, MX hosts, TLS policy and its source", json_flag=True)
    p.add_argument("address")

    p = add(sub, "dkim-keygen", cmd_dkim_keygen,
            "create a DKIM signing key and print its DNS record")
    p.add_argument("domain")
    p.add_argument("selector")
    p.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (2048 bits, default) or ed25519 (RFC 8463)")
    p.add_argument("--key-file", help="where to write the key (default: "
                                      "domains_dir/DOMAIN/dkim-SELECTOR.pem)")

    p = add(sub, "dns-check", cmd_dns_check, "show the DNS records to publish for the local "
            "domains and check what DNS answers (exit 1 if any check fails)", json_flag=True)
    p.add_argument("domain", nargs="?", help="one local domain (default: all)")
    p.add_argument("--https-port", type=int, default=443, metavar="PORT",
                   help="where to fetch the MTA-STS policy (443, as senders do; for tests)")
    add(sub, "check-config", cmd_check_config,
        "check the configuration and every file it names")
    add(sub, "reload", cmd_reload, "make the daemon re-read its configuration and files")
    add(sub, "status", cmd_status, "show whether the daemon runs, and its queue",
        json_flag=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    path = getattr(args, "config", None)
    try:
        config = load_config(Path(path) if path else None)
    except ConfigError as e:
        _err(f"configuration error: {e}")
        return 1
    try:
        return func(config, args)
    except CLIError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
