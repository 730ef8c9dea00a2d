"""Users and passwords: the per-domain users file, scrypt hashes and SASL decoding.

Each local domain has a human-readable file ``<domains_dir>/<domain>/users``::

    # comments and blank lines are allowed
    alice $scrypt$n=16384,r=8,p=1$<salt base64>$<key base64>

Local parts are stored folded (case-folded, NFC) so ``Alice`` and ``alice`` are
one user.  :class:`UserDB` is an immutable snapshot of every domain's users; its
``authenticate`` runs the (deliberately slow) scrypt check in a thread so the
reactor keeps serving other sessions.  ``add_user``, ``set_password`` and
``remove_user`` rewrite a users file atomically for the admin command.

``decode_plain`` and ``decode_b64_line`` turn the SASL responses of AUTH PLAIN
(RFC 4616) and AUTH LOGIN into text; they never see the network.

Passwords are never logged, and never part of an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from mta.mail.address import AddressError, fold_local, normalize_domain, parse_mailbox
from mta.system.fsutil import fsync_dir

log = Logger()

# --- password hashes ------------------------------------------------------------

SCHEME = "scrypt"
DEFAULT_N = 16384  # 2**14: ~16 MiB and some tens of milliseconds per check
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Bounds on what a users file may ask for, so that a hostile or corrupted file
# cannot make one AUTH attempt allocate gigabytes or burn minutes of CPU.
MIN_N, MAX_N = 2**10, 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 128 * 1024 * 1024  # 128 * n * r bytes
MAX_WORK = 2**21  # n * r * p: 16 times the default, a couple of seconds per check
SALT_RANGE = (8, 64)
KEY_RANGE = (16, 64)

_HASH = re.compile(r"\$scrypt\$n=(\d{1,12}),r=(\d{1,6}),p=(\d{1,6})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})\Z")


class HashFormatError(ValueError):
    """A stored hash string is not a well-formed, acceptably bounded scrypt hash."""


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        return f"${SCHEME}$n={self.n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HashFormatError("bad base64 in hash") from None


def parse_hash(stored: str) -> ScryptHash:
    """Parse and bound-check ``$scrypt$n=..,r=..,p=..$salt$key``."""
    m = _HASH.match(stored)
    if not m:
        raise HashFormatError("not a $scrypt$n=N,r=R,p=P$salt$key hash")
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    salt, key = _unb64(m.group(4)), _unb64(m.group(5))
    if not (MIN_N <= n <= MAX_N) or n & (n - 1):
        raise HashFormatError(f"n must be a power of two between {MIN_N} and {MAX_N}")
    if not 1 <= r <= MAX_R:
        raise HashFormatError(f"r must be between 1 and {MAX_R}")
    if not 1 <= p <= MAX_P:
        raise HashFormatError(f"p must be between 1 and {MAX_P}")
    if 128 * n * r > MAX_MEMORY or n * r * p > MAX_WORK:
        raise HashFormatError("scrypt parameters ask for too much memory or work")
    if not SALT_RANGE[0] <= len(salt) <= SALT_RANGE[1]:
        raise HashFormatError("salt length out of range")
    if not KEY_RANGE[0] <= len(key) <= KEY_RANGE[1]:
        raise HashFormatError("key length out of range")
    return ScryptHash(n, r, p, salt, key)


def _prepare(password: str) -> bytes:
    """The octets hashed for ``password``.

    A light SASLprep (RFC 4013 §2): non-ASCII spaces become U+0020, then NFKC,
    so the same password typed on systems that compose characters differently
    still matches.
    """
    password = "".join(" " if ch.isspace() and not ch.isascii() else ch for ch in password)
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _scrypt(password: str, h: ScryptHash) -> bytes:
    # OpenSSL needs a little more than 128*n*r for its own bookkeeping.
    maxmem = 128 * h.n * h.r + 128 * h.r * h.p + 1024 * 1024
    return hashlib.scrypt(_prepare(password), salt=h.salt, n=h.n, r=h.r, p=h.p,
                          dklen=len(h.key), maxmem=maxmem)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> str:
    """A new salted scrypt hash of ``password`` in the users-file format."""
    template = ScryptHash(n, r, p, secrets.token_bytes(SALT_BYTES), bytes(KEY_BYTES))
    parse_hash(str(template))  # the same bounds as for reading
    return str(ScryptHash(n, r, p, template.salt, _scrypt(password, template)))


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches ``stored``; False also for a malformed hash."""
    try:
        h = parse_hash(stored)
    except HashFormatError:
        return False
    try:
        key = _scrypt(password, h)
    except (ValueError, MemoryError) as e:  # OpenSSL refused the parameters
        log.error("scrypt check failed: {err}", err=str(e))
        return False
    return hmac.compare_digest(key, h.key)


# Checked for unknown users so that a failure takes as long as for a known one.
# Its key is not the hash of anything a client can send in practice.
_DUMMY_HASH = str(ScryptHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, bytes(range(SALT_BYTES)),
                             bytes(KEY_BYTES)))


# --- the users file ---------------------------------------------------------------


class UsersFileError(Exception):
    """A users file cannot be read or has a malformed line."""

    def __init__(self, path: Path, lineno: int | None, problem: str) -> None:
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.lineno = lineno
        self.problem = problem


class UserEditError(Exception):
    """An edit of a users file makes no sense (the user exists, or does not)."""


class DuplicateUserError(UserEditError):
    pass


class UnknownUserError(UserEditError):
    pass


def check_local(local: str) -> str:
    """Validate a user's local part and return its folded, stored form.

    ValueError says why it cannot be a user name: it must be a plain
    dot-atom local part (RFC 5321 §4.1.2, UTF-8 allowed per RFC 6531), not
    quoted, and must not start with ``#`` (that would read as a comment).
    """
    if not local:
        raise ValueError("empty user name")
    if local.startswith("#"):
        raise ValueError("a user name cannot start with '#'")
    if "@" in local:
        raise ValueError("a user name is the local part only, without @domain")
    try:
        parsed = parse_mailbox(f"{local}@localhost", smtputf8=True)
    except AddressError as e:
        raise ValueError(f"invalid user name {local!r}: {e}") from None
    if parsed.local != local or local.startswith('"'):
        raise ValueError(f"invalid user name {local!r}")
    return fold_local(local)


def _parse_line(line: str) -> tuple[str, str] | None:
    """``(folded local, hash)`` for a user line, None for a blank/comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split()
    if len(fields) != 2:
        raise ValueError("expected 'user hash'")
    local, stored = fields
    folded = check_local(local)
    try:
        parse_hash(stored)
    except HashFormatError as e:
        raise ValueError(f"bad password hash for {local!r}: {e}") from None
    return folded, stored


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise UsersFileError(path, None, "not valid UTF-8") from None
    except OSError as e:
        raise UsersFileError(path, None, f"cannot read: {e.strerror or e}") from None


def parse_users(lines: Iterable[str], path: Path) -> dict[str, str]:
    """``{folded local: hash}`` from a users file's lines; UsersFileError on a bad one."""
    users: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        try:
            entry = _parse_line(line)
        except ValueError as e:
            raise UsersFileError(path, lineno, str(e)) from None
        if entry is None:
            continue
        if entry[0] in users:
            raise UsersFileError(path, lineno, f"user {entry[0]!r} listed twice")
        users[entry[0]] = entry[1]
    return users


def read_users_file(path: Path) -> dict[str, str]:
    """The users of one file; a missing file has none."""
    return parse_users(_read_lines(path), path)


RunInThread = Callable[..., Deferred]


def _default_run_in_thread(f: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args)


class UserDB:
    """An immutable snapshot of every local domain's users and password hashes.

    ``run_in_thread(f, *args) -> Deferred`` runs the scrypt check off the
    reactor thread (default: ``deferToThread``); tests may pass another.
    """

    blocking = False  # answers from memory (mta.policy.directory)

    def __init__(self, users: Mapping[str, Mapping[str, str]],
                 run_in_thread: RunInThread | None = None) -> None:
        self._users: dict[str, dict[str, str]] = {
            normalize_domain(domain): {fold_local(local): h for local, h in entries.items()}
            for domain, entries in users.items()
        }
        self._run = run_in_thread or _default_run_in_thread

    @classmethod
    def load(cls, domains_dir: Path, domains: Iterable[str],
             run_in_thread: RunInThread | None = None) -> UserDB:
        """Read ``<domains_dir>/<domain>/users`` for each domain (missing = no users)."""
        users = {}
        for domain in domains:
            users[domain] = read_users_file(Path(domains_dir) / domain / "users")
            log.info("{count} users for {domain}", count=len(users[domain]), domain=domain)
        return cls(users, run_in_thread)

    def exists(self, local: str, domain: str) -> bool:
        """Is ``local`` (folded here) a user of ``domain`` (already normalised)?"""
        return fold_local(local) in self._users.get(domain, {})

    def users(self, domain: str) -> list[str]:
        """The folded local parts of ``domain``'s users, sorted."""
        return sorted(self._users.get(domain, {}))

    def _lookup(self, username: str) -> tuple[str, str] | None:
        """``(canonical user@domain, stored hash)`` for a login name, or None."""
        local, at, domain = username.rpartition("@")
        if not at or not local:
            return None
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return None
        folded = fold_local(local)
        stored = self._users.get(domain, {}).get(folded)
        if stored is None:
            return None
        return f"{folded}@{domain}", stored

    def authenticate(self, username: str, password: str) -> Deferred[str | None]:
        """Check a login; fires with the canonical ``user@domain`` or None.

        An unknown user is checked against a dummy hash all the same, so the
        time taken does not tell whether the user exists.
        """
        found = self._lookup(username)
        stored = found[1] if found else _DUMMY_HASH
        d = maybeDeferred(self._run, verify_password, stored, password)

        def checked(ok: bool) -> str | None:
            return found[0] if ok and found else None

        return d.addCallback(checked)


# --- editing a users file (for the admin command) ---------------------------------



def _write_atomically(path: Path, lines: list[str]) -> None:
    """Replace ``path`` with ``lines``: tmp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def _find(lines: list[str], path: Path, folded: str) -> int | None:
    """The index of ``folded``'s line; also refuses to edit a malformed file."""
    parse_users(lines, path)
    for i, line in enumerate(lines):
        entry = _parse_line(line)
        if entry is not None and entry[0] == folded:
            return i
    return None


def add_user(path: Path, local: str, password: str) -> None:
    """Add a user to a users file (created, mode 0600, if missing)."""
    folded = check_local(local)
    lines = _read_lines(path)
    if _find(lines, path, folded) is not None:
        raise DuplicateUserError(f"user {folded!r} already exists in {path}")
    lines.append(f"{folded} {hash_password(password)}")
    _write_atomically(path, lines)


def set_password(path: Path, local: str, password: str) -> None:
    """Change an existing user's password."""
    folded = check_local(local)
    lines = _read_lines(path)
    index = _find(lines, path, folded)
    if index is None:
        raise UnknownUserError(f"no user {folded!r} in {path}")
    lines[index] = f"{folded} {hash_password(password)}"
    _write_atomically(path, lines)


def remove_user(path: Path, local: str) -> None:
    """Remove a user; the other lines (comments included) are kept as they are."""
    folded = check_local(local)
    lines = _read_lines(path)
    index = _find(lines, path, folded)
    if index is None:
        raise UnknownUserError(f"no user {folded!r} in {path}")
    del lines[index]
    _write_atomically(path, lines)


# --- SASL decoding (RFC 4616 PLAIN, and the LOGIN mechanism) ------------------------


class SASLError(ValueError):
    """A SASL response that cannot be decoded (the server answers 501 or 535)."""


class SASLCancelled(SASLError):
    """The client sent ``*`` to cancel the exchange (RFC 4954 §4)."""


class SASLUndecodable(SASLError):
    """A response that is not base64 (or not UTF-8 once decoded): RFC 4954 §4 asks
    for ``501 5.5.2``, and it is no guess at a password, so it is not counted."""


# RFC 4648 §4 base64 with its padding, as RFC 4954 §4 requires.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def _b64_text(text: str) -> str:
    text = text.strip()
    if text == "*":
        raise SASLCancelled()
    if not _BASE64.match(text):
        raise SASLUndecodable("invalid base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLUndecodable("invalid base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLUndecodable("not UTF-8") from None


def decode_plain(b64: str) -> tuple[str, str, str]:
    """``(authzid, authcid, password)`` from a PLAIN response (RFC 4616 §2).

    message = [authzid] NUL authcid NUL passwd, with authcid and passwd
    non-empty; all UTF-8.
    """
    fields = _b64_text(b64).split("\0")
    if len(fields) != 3:
        raise SASLError("expected authzid NUL authcid NUL password")
    authzid, authcid, password = fields
    if not authcid or not password:
        raise SASLError("empty authentication identity or password")
    return authzid, authcid, password


def decode_b64_line(text: str) -> str:
    """One base64 LOGIN response as text; ``*`` raises SASLCancelled."""
    return _b64_text(text)
