"""The users file, scrypt hashes, password checks in a thread, and SASL decoding.

Covers: hash/verify round trips (UTF-8 and differently composed passwords),
wrong and tampered hashes, bounds on hostile scrypt parameters, users-file
parsing with line numbers, UserDB lookups, ``authenticate`` through a real
``deferToThread`` (success, wrong password, unknown user or domain, and the
dummy check for unknown users), atomic add/passwd/remove with mode 0600, and
the PLAIN/LOGIN decoders.
"""

from __future__ import annotations

import base64
import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.logger import globalLogPublisher

from mta.policy import auth
from mta.policy.auth import (
    DuplicateUserError,
    HashFormatError,
    SASLCancelled,
    SASLError,
    UnknownUserError,
    UserDB,
    UsersFileError,
    add_user,
    decode_b64_line,
    decode_plain,
    hash_password,
    parse_hash,
    remove_user,
    set_password,
    verify_password,
)

# One real hash computed once for the module keeps the tests fast.
SECRET = "correct horse"
HASH = hash_password(SECRET)


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


# --- hashes ------------------------------------------------------------------------


def test_hash_format_and_round_trip():
    assert HASH.startswith("$scrypt$n=16384,r=8,p=1$")
    assert len(HASH.split("$")) == 5
    assert verify_password(HASH, SECRET)
    assert not verify_password(HASH, "correct horsE")
    assert not verify_password(HASH, "")


def test_each_hash_has_its_own_salt():
    a, b = hash_password("same", n=1024), hash_password("same", n=1024)
    assert a != b
    assert verify_password(a, "same") and verify_password(b, "same")


def test_utf8_password_and_unicode_composition():
    stored = hash_password("pässwörd ñandú", n=1024)
    assert verify_password(stored, "pässwörd ñandú")
    # The same text typed decomposed (NFD, as some systems do) still matches.
    decomposed = "pa\u0308sswo\u0308rd n\u0303andu\u0301"
    assert decomposed != "pässwörd ñandú"
    assert verify_password(stored, decomposed)
    assert not verify_password(stored, "passwórd ñandú")


def test_parameters_are_read_from_the_string():
    stored = hash_password("pw", n=2048, r=4, p=2)
    assert stored.startswith("$scrypt$n=2048,r=4,p=2$")
    assert verify_password(stored, "pw")


def test_tampered_hash_strings_do_not_verify():
    _, _, params, salt, key = HASH.split("$")
    flipped = key[:5] + ("A" if key[5] != "A" else "B") + key[6:]
    assert not verify_password(f"$scrypt${params}${salt}${flipped}", SECRET)
    other_salt = base64.b64encode(b"0123456789abcdef").decode()
    assert not verify_password(f"$scrypt${params}${other_salt}${key}", SECRET)
    # Changing the cost parameters changes the key.
    assert not verify_password(f"$scrypt$n=8192,r=8,p=1${salt}${key}", SECRET)
    for broken in ("", "plain", "$scrypt$", f"$bcrypt${params}${salt}${key}",
                   f"$scrypt$n=16384,r=8${salt}${key}", f"$scrypt${params}${salt}$!!notb64",
                   f"$scrypt${params}${salt}", HASH + "$extra"):
        assert not verify_password(broken, SECRET), broken


@pytest.mark.parametrize("params, problem", [
    ("n=1073741824,r=8,p=1", "n must be"),      # 2**30: 1 TiB of memory
    ("n=16383,r=8,p=1", "power of two"),
    ("n=16,r=8,p=1", "n must be"),
    ("n=16384,r=0,p=1", "r must be"),
    ("n=16384,r=33,p=1", "r must be"),
    ("n=16384,r=8,p=99", "p must be"),
    ("n=1048576,r=32,p=1", "too much"),          # 4 GiB
    ("n=1048576,r=1,p=16", "too much"),          # minutes of CPU
])
def test_hostile_parameters_are_refused(params, problem):
    _, _, _, salt, key = HASH.split("$")
    stored = f"$scrypt${params}${salt}${key}"
    with pytest.raises(HashFormatError, match=problem):
        parse_hash(stored)
    assert not verify_password(stored, SECRET)


def test_salt_and_key_lengths_are_bounded():
    _, _, params, salt, key = HASH.split("$")
    with pytest.raises(HashFormatError, match="salt"):
        parse_hash(f"$scrypt${params}${b64(b'1234')}${key}")
    with pytest.raises(HashFormatError, match="key"):
        parse_hash(f"$scrypt${params}${salt}${b64(b'short')}")


# --- the users file ----------------------------------------------------------------


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_users_file_with_comments_blank_lines_and_folding(tmp_path):
    write(tmp_path / "example.test" / "users",
          f"# the users of example.test\n\nAlice {HASH}\n  # indented comment\n"
          f"Ñandú {HASH}\nfirst.last {HASH}\n")
    db = UserDB.load(tmp_path, ["example.test", "empty.test"])
    assert db.users("example.test") == ["alice", "first.last", "ñandú"]
    assert db.users("empty.test") == []
    assert db.users("unknown.test") == []
    assert db.exists("ALICE", "example.test")
    assert db.exists("ñANDÚ", "example.test")
    assert db.exists("First.Last", "example.test")
    assert not db.exists("firstlast", "example.test")  # no drop characters for users
    assert not db.exists("alice", "empty.test")


@pytest.mark.parametrize("line, problem", [
    ("alice", "expected 'user hash'"),
    (f"alice {HASH} extra", "expected 'user hash'"),
    ("alice $scrypt$n=3,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "bad password hash"),
    ("alice notahash", "bad password hash"),
    (f"alice@example.test {HASH}", "without @domain"),
    (f'"ab" {HASH}', "invalid user name"),
    (f"a..b {HASH}", "invalid user name"),
])
def test_users_file_errors_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "example.test" / "users"
    write(path, f"# header\nbob {HASH}\n\n{line}\n")
    with pytest.raises(UsersFileError) as info:
        UserDB.load(tmp_path, ["example.test"])
    assert info.value.lineno == 4
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}:4: ")


def test_users_file_duplicate_after_folding(tmp_path):
    path = tmp_path / "example.test" / "users"
    write(path, f"bob {HASH}\nBOB {HASH}\n")
    with pytest.raises(UsersFileError, match=r"users:2: user 'bob' listed twice"):
        UserDB.load(tmp_path, ["example.test"])


def test_users_file_not_utf8(tmp_path):
    path = tmp_path / "example.test" / "users"
    path.parent.mkdir()
    path.write_bytes(b"b\xffb " + HASH.encode() + b"\n")
    with pytest.raises(UsersFileError, match="not valid UTF-8"):
        UserDB.load(tmp_path, ["example.test"])


# --- authenticate ------------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
    write(tmp_path / "example.test" / "users", f"alice {HASH}\nñandú {HASH}\n")
    write(tmp_path / "other.test" / "users", f"alice {hash_password('other', n=1024)}\n")
    return UserDB.load(tmp_path, ["example.test", "other.test"])


@pytest_twisted.ensureDeferred
async def test_authenticate_in_a_thread(db):
    assert await db.authenticate("alice@example.test", SECRET) == "alice@example.test"
    assert await db.authenticate("ALICE@Example.TEST", SECRET) == "alice@example.test"
    assert await db.authenticate("Ñandú@example.test", SECRET) == "ñandú@example.test"
    assert await db.authenticate("alice@other.test", "other") == "alice@other.test"


@pytest_twisted.ensureDeferred
async def test_authenticate_failures(db):
    assert await db.authenticate("alice@example.test", "wrong") is None
    assert await db.authenticate("alice@other.test", SECRET) is None  # per-domain users
    assert await db.authenticate("mallory@example.test", SECRET) is None
    assert await db.authenticate("alice@unknown.test", SECRET) is None
    assert await db.authenticate("alice", SECRET) is None  # no domain
    assert await db.authenticate("alice@bad..domain", SECRET) is None
    assert await db.authenticate("@example.test", SECRET) is None


@pytest_twisted.ensureDeferred
async def test_unknown_user_still_runs_a_check_of_the_same_cost(tmp_path):
    write(tmp_path / "example.test" / "users", f"alice {HASH}\n")
    checks = []

    def run(f, *args):
        checks.append(args[0])
        return succeed(f(*args))

    db = UserDB.load(tmp_path, ["example.test"], run_in_thread=run)
    assert await db.authenticate("alice@example.test", SECRET) == "alice@example.test"
    assert await db.authenticate("nobody@example.test", SECRET) is None
    assert await db.authenticate("nobody@nowhere.test", SECRET) is None
    assert checks[0] == HASH
    assert len(checks) == 3
    for dummy in checks[1:]:
        assert dummy != HASH
        assert parse_hash(dummy).n == parse_hash(HASH).n
        assert parse_hash(dummy).r == parse_hash(HASH).r


@pytest_twisted.ensureDeferred
async def test_password_never_logged(tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        write(tmp_path / "example.test" / "users", f"alice {HASH}\n")
        db = UserDB.load(tmp_path, ["example.test"])
        await db.authenticate("alice@example.test", SECRET)
        await db.authenticate("alice@example.test", "Wr0ngSecretText")
        await db.authenticate("bob@example.test", "Wr0ngSecretText")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events  # the load was logged
    text = repr(events)
    assert SECRET not in text and "Wr0ngSecretText" not in text


# --- editing -----------------------------------------------------------------------


def test_add_user_creates_dirs_and_mode_0600(tmp_path):
    path = tmp_path / "domains" / "example.test" / "users"
    add_user(path, "Alice", "pw1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alice $scrypt$n=16384,r=8,p=1$")
    assert verify_password(lines[0].split()[1], "pw1")
    assert os.listdir(path.parent) == ["users"]  # no temporary file left behind


def test_add_set_remove_keep_other_lines(tmp_path):
    path = tmp_path / "example.test" / "users"
    write(path, f"# keep me\nbob {HASH}\n\n")
    add_user(path, "alice", "pw1")
    with pytest.raises(DuplicateUserError, match="'alice' already exists"):
        add_user(path, "ALICE", "pw2")
    set_password(path, "Alice", "pw3")
    db = UserDB.load(tmp_path, ["example.test"])
    assert db.users("example.test") == ["alice", "bob"]
    stored = dict(line.split() for line in path.read_text().splitlines()[3:])
    assert verify_password(stored["alice"], "pw3")
    assert not verify_password(stored["alice"], "pw1")

    remove_user(path, "BOB")
    assert path.read_text().splitlines()[:2] == ["# keep me", ""]
    assert UserDB.load(tmp_path, ["example.test"]).users("example.test") == ["alice"]
    with pytest.raises(UnknownUserError, match="no user 'bob'"):
        remove_user(path, "bob")
    with pytest.raises(UnknownUserError):
        set_password(path, "carol", "x")
    with pytest.raises(UnknownUserError):
        remove_user(tmp_path / "nowhere.test" / "users", "bob")
    assert sorted(os.listdir(path.parent)) == ["users"]


@pytest.mark.parametrize("name", ["", "a b", "a@b", "#root", '"x"', "a..b", "x" * 65])
def test_add_user_refuses_bad_names(tmp_path, name):
    path = tmp_path / "users"
    with pytest.raises(ValueError):
        add_user(path, name, "pw")
    assert not path.exists()


def test_edit_refuses_malformed_file_and_leaves_it(tmp_path):
    path = tmp_path / "users"
    write(path, "bob\n")
    with pytest.raises(UsersFileError, match=":1:"):
        add_user(path, "alice", "pw")
    assert path.read_text() == "bob\n"


def test_failed_rewrite_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "users"
    write(path, f"bob {HASH}\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(auth.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        add_user(path, "alice", "pw")
    assert path.read_text() == f"bob {HASH}\n"
    assert os.listdir(tmp_path) == ["users"]


# --- SASL --------------------------------------------------------------------------


def test_decode_plain():
    assert decode_plain(b64("\0alice@example.test\0secret")) == ("", "alice@example.test", "secret")
    assert decode_plain(b64("admin\0alice\0pw")) == ("admin", "alice", "pw")
    assert decode_plain(b64("\0ñandú@example.test\0contraseña €")) == (
        "", "ñandú@example.test", "contraseña €")
    assert decode_plain(" " + b64("\0a\0b") + "\r\n") == ("", "a", "b")


@pytest.mark.parametrize("text, problem", [
    ("not base64!", "invalid base64"),
    ("YWJj=", "invalid base64"),  # bad padding
    ("YWJjZA", "invalid base64"),  # padding missing
    ("YW Jj", "invalid base64"),
    (b64("alice\0secret"), "expected authzid"),
    (b64("\0alice\0secret\0more"), "expected authzid"),
    (b64("\0\0secret"), "empty"),
    (b64("\0alice\0"), "empty"),
    (b64(b"\0alice\0\xff\xfe"), "not UTF-8"),
    ("", "expected authzid"),  # the server maps '=' (empty response) to this
])
def test_decode_plain_errors(text, problem):
    with pytest.raises(SASLError, match=problem) as info:
        decode_plain(text)
    assert not isinstance(info.value, SASLCancelled)


def test_decode_plain_cancel():
    with pytest.raises(SASLCancelled):
        decode_plain("*")


def test_decode_b64_line():
    assert decode_b64_line(b64("alice@example.test")) == "alice@example.test"
    assert decode_b64_line(b64("pässwörd")) == "pässwörd"
    assert decode_b64_line("") == ""
    with pytest.raises(SASLCancelled):
        decode_b64_line("*")
    with pytest.raises(SASLCancelled):
        decode_b64_line(" * ")
    with pytest.raises(SASLError, match="invalid base64"):
        decode_b64_line("%%%")
    with pytest.raises(SASLError, match="not UTF-8"):
        decode_b64_line(b64(b"\xc3("))
