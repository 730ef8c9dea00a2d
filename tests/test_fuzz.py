"""Property-based fuzzing (hypothesis) of everything that parses untrusted input.

* address parsing (mta.mail.address): only AddressError escapes, and a parsed
  address re-serialises to text that parses to the same Address;
* SASL decoding (mta.policy.auth): only SASLError escapes;
* aliases files (mta.policy.aliases): only AliasFileError escapes;
* envelope files (mta.queue.envelope): only ValueError/KeyError/TypeError
  escape, for arbitrary bytes and for mutated valid envelopes;
* the SMTP command path of a real server on loopback: every command line gets
  exactly one well-formed reply and the session stays in step.

Defects found here and fixed, each kept fixed by a test: envelope escapes
(OverflowError, RecursionError; ``test_envelope_escapes_found_by_fuzzing``) and
an address whose A-label form exceeded 256 octets after parsing
(``test_address_length_checked_on_normalised_form``).
Example counts are moderate so the file runs in well under 30 s.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import string

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThread

from mta.mail.address import (
    MAX_PATH_OCTETS,
    Address,
    AddressError,
    normalize_domain,
    parse_mailbox,
    parse_path,
    split_path_and_params,
)
from mta.policy import dkim, dmarc
from mta.policy.aliases import AliasFileError, parse_aliases
from mta.policy.auth import SASLError, decode_b64_line, decode_plain
from mta.policy.authresults import strip_forged
from mta.queue.envelope import Envelope, Recipient, RecipientKind, RecipientState
from tests.harness import start_mta

# The autouse no_leaks fixture is function-scoped: it wraps the whole
# hypothesis run of a test, which is what we want.
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Text without surrogates (so it can be encoded), but otherwise anything.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)

# --- address strategies ------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atom = st.text(st.sampled_from(ATEXT) | st.characters(min_codepoint=0x80,
                                                      exclude_categories=("Cs",)),
               min_size=1, max_size=12)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join)
quoted = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc")),
                 max_size=20).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
local_part = dot_string | quoted | any_text

ascii_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
unicode_label = st.text(st.characters(min_codepoint=0xA0, max_codepoint=0x2FFFF,
                                      categories=("Ll", "Lu", "Lo", "Nd")),
                        min_size=1, max_size=20)
label = ascii_label | unicode_label | st.sampled_from(["xn--", "xn--bcher-kva", "xn--zz", "a--b",
                                                      "-a", "a-", ""])
domain = (st.lists(label, min_size=1, max_size=6).map(".".join)
          | st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::1]", "[IPv6:::ffff:1.2.3.4]",
                             "[999.1.1.1]", "[IPv6:nope]", "[]", "example.test."])
          | any_text)
# Near the length limits: long local parts and several non-ASCII labels, whose
# A-label (punycode) form is longer than their UTF-8 form.
long_local = st.text(st.sampled_from(string.ascii_letters), min_size=30, max_size=64)
long_domain = st.lists(st.text(st.characters(min_codepoint=0x400, max_codepoint=0xD7A3,
                                             categories=("Ll", "Lu", "Lo")),
                               min_size=6, max_size=16), min_size=3, max_size=6).map(".".join)
mailbox_text = (st.builds(lambda lp, d: f"{lp}@{d}", local_part, domain)
                | st.builds(lambda lp, d: f"{lp}@{d}", long_local, long_domain)
                | any_text)
param_text = st.lists(
    st.sampled_from(["SIZE=100", "BODY=8BITMIME", "SMTPUTF8", "AUTH=<>", "X=", "=x", "a b",
                     "FOO=BAR", "SIZE"]) | any_text, max_size=4).map(" ".join)


def _reparse(address: Address, smtputf8: bool) -> Address:
    """Parse str(address) again: a parsed address always round-trips."""
    return parse_mailbox(str(address), smtputf8=smtputf8)


@FUZZ
@given(mailbox_text, st.booleans())
def test_parse_mailbox(text, smtputf8):
    try:
        address = parse_mailbox(text, smtputf8=smtputf8)
    except AddressError:
        return
    assert _reparse(address, smtputf8) == address


@FUZZ
@given(domain)
def test_normalize_domain(text):
    try:
        normalized = normalize_domain(text)
    except AddressError:
        return
    assert normalized.isascii()
    assert normalize_domain(normalized) == normalized


path_text = (st.builds(lambda m: f"<{m}>", mailbox_text)
             | st.builds(lambda r, m: f"<{r}:{m}>",
                         st.lists(domain.map(lambda d: "@" + d), min_size=1, max_size=2)
                         .map(",".join), mailbox_text)
             | st.sampled_from(["<>", "<", ">", "<<>>", "<@:a@b>"])
             | any_text)


@FUZZ
@given(path_text, st.booleans(), st.booleans())
def test_parse_path(text, smtputf8, allow_null):
    try:
        address = parse_path(text, smtputf8=smtputf8, allow_null=allow_null)
    except AddressError:
        return
    if address is None:
        assert allow_null and text == "<>"
        return
    assert _reparse(address, smtputf8) == address
    assert parse_path(f"<{address}>", smtputf8=smtputf8) == address


@FUZZ
@given(st.builds(lambda s, p, q: f"{s}{p}{q}", st.sampled_from(["", " ", "  "]), path_text,
                 st.sampled_from(["", " "]) .flatmap(lambda sep: param_text.map(sep.__add__))))
def test_split_path_and_params(arg):
    try:
        path, params = split_path_and_params(arg)
    except AddressError:
        return
    assert path.startswith("<") and path.endswith(">")
    assert all(re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", key) for key in params)


# --- SASL ----------------------------------------------------------------------------

sasl_text = (any_text
             | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
             | st.lists(any_text, max_size=4).map(
                 lambda parts: base64.b64encode("\0".join(parts).encode()).decode())
             | st.sampled_from(["*", " * ", "=", "====", "AAA", "AA==", "A===", "\u3000*"]))


@FUZZ
@given(sasl_text)
def test_sasl_decoding(text):
    try:
        authzid, authcid, password = decode_plain(text)
    except SASLError:
        pass
    else:
        assert authcid and password and "\0" not in authzid + authcid + password
    try:
        assert isinstance(decode_b64_line(text), str)
    except SASLError:
        pass


# --- aliases ---------------------------------------------------------------------------

alias_line = (any_text
              | st.builds(lambda n, sep, ts: f"{n}{sep}{ts}",
                          local_part | st.sampled_from(["*", "", "a@b", "# c"]),
                          st.sampled_from([":", " : ", "", "::"]),
                          st.lists(mailbox_text | local_part
                                   | st.sampled_from(["|", "| cmd", "|/bin/true x", ""]),
                                   max_size=3).map(", ".join)))


@FUZZ
@given(st.lists(alias_line, max_size=6))
def test_parse_aliases(lines):
    try:
        rules = parse_aliases(lines, "example.test")
    except AliasFileError:
        return
    assert all(isinstance(name, str) and targets for name, targets in rules.items())


# --- envelopes ---------------------------------------------------------------------------

# The exceptions Envelope.from_bytes may raise (its docstring; QueueStore relies on it).
ENVELOPE_ERRORS = (ValueError, KeyError, TypeError)

json_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**308)
             | st.floats(allow_nan=True, allow_infinity=True) | any_text)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(any_text, inner, max_size=3), max_leaves=8)


def valid_envelope() -> dict:
    env = Envelope(
        id="0123abcd0123456789ab", sender="alice@example.test",
        recipients=[Recipient("bob@remote.test", RecipientKind.REMOTE, "bob@remote.test"),
                    Recipient("carol@example.test", RecipientKind.LOCAL, "c@example.test",
                              state=RecipientState.DEFERRED, attempts=2, mailbox="carol")],
        created=1795436379.5, size=1234, client_ip="127.0.0.1", extra={"srs": "x"})
    return json.loads(env.to_bytes())


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


ENVELOPE_PATHS = [p for p in _paths(valid_envelope()) if p]


@st.composite
def mutated_envelope(draw) -> bytes:
    doc = valid_envelope()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ENVELOPE_PATHS))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the shape: skip this one
    return json.dumps(doc).encode()


def _load_envelope(data: bytes) -> None:
    try:
        env = Envelope.from_bytes(data)
    except ENVELOPE_ERRORS:
        return
    data = env.to_bytes()  # what was accepted can be written and read back the same
    assert Envelope.from_bytes(data).to_bytes() == data


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda d: json.dumps(d).encode(), json_value))
def test_envelope_from_arbitrary_bytes(data):
    _load_envelope(data)


@FUZZ
@given(mutated_envelope())
def test_envelope_from_mutated_valid_envelopes(data):
    _load_envelope(data)


def _with(key: str, value) -> bytes:
    doc = valid_envelope()
    doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("data", [
    _with("created", 10**400),  # float() of a huge integer: OverflowError inside
    _with("size", float("inf")),  # int(Infinity): OverflowError inside
    b"[" * 100_000,  # json nesting: RecursionError inside
], ids=["huge-created", "infinite-size", "deep-nesting"])
def test_envelope_escapes_found_by_fuzzing(data):
    """These escaped as OverflowError/RecursionError until envelope.py caught them."""
    with pytest.raises(ValueError, match="malformed envelope"):
        Envelope.from_bytes(data)


def test_address_length_checked_on_normalised_form():
    """Found by fuzzing: 256 octets as typed, longer once the domain is in A-labels."""
    text = ("a" * 42 + "@яa죃a듉aӇ搶îæúêӴ쉥.榩Ө閵Ӥ쓄쭑пaÿaѽ鵐쌂.ùaa盾å댡쟷똢졊碻ï쭇щ"
            ".ä귨қ遭a햹ø藕묻聠âу.쇠郶풮т儫aaa纟嚛a夳aДӠ")
    assert len(text.encode()) <= MAX_PATH_OCTETS
    with pytest.raises(AddressError, match="too long"):
        parse_mailbox(text, smtputf8=True)


# --- message headers: DKIM signatures, From, Authentication-Results ---------------------

header_line = (st.binary(max_size=120).map(lambda b: _no_crlf(b).replace(b"\n", b""))
               | st.sampled_from([b"From: a@example.test", b"From: <>", b"from:(", b" \t",
                                  b"Authentication-Results: mx.example.test; none",
                                  b"Authentication-Results: (", b"DKIM-Signature:"])
               | st.builds(lambda n, v: n + b":" + v,
                           st.sampled_from([b"From", b"FROM ", b"Authentication-Results",
                                            b"DKIM-Signature", b"X"]),
                           any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
sig_tags = st.lists(st.builds(
    lambda k, v: f"{k}={v}",
    st.sampled_from(["v", "a", "b", "bh", "c", "d", "h", "i", "l", "q", "s", "t", "x", "z"]),
    st.sampled_from(["1", "rsa-sha256", "ed25519-sha256", "rsa-sha1", "AAAA", "relaxed/simple",
                     "example.test", "sel", "from", "99999999999", "@example.test", ""])
    | any_text), max_size=12).map("; ".join)
key_record = st.sampled_from([b"v=DKIM1; k=rsa; p=", b"v=DKIM1; k=ed25519; p=AAAA", b"p=!",
                              b"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"
                              ]) | st.binary(max_size=60)


@FUZZ
@given(st.lists(header_line, max_size=6))
def test_author_domain_and_strip_forged(lines):
    found = dmarc.author_domain(lines)
    assert (found.domain is None) != (found.problem == "")
    kept = strip_forged(lines, "mx.example.test")
    assert all(line in lines for line in kept) and len(kept) <= len(lines)


@FUZZ
@given(st.lists(sig_tags, min_size=1, max_size=3), st.lists(header_line, max_size=3),
       st.lists(key_record, max_size=2), st.booleans())
def test_dkim_verify_never_raises(signatures, headers, records, dns_fails):
    message = b"".join(b"DKIM-Signature: " + s.encode("utf-8", "surrogatepass") + b"\r\n"
                       for s in signatures)
    message += b"".join(h + b"\r\n" for h in headers) + b"From: a@example.test\r\n\r\nbody\r\n"

    def dns_txt(name: str) -> Deferred[list[bytes]]:
        return fail(dkim.DNSTempError("down")) if dns_fails else succeed(list(records))

    outcome: list = []
    Deferred.fromCoroutine(dkim.verify(message, dns_txt, defer_to_thread=maybeDeferred)
                           ).addBoth(outcome.append)
    [results] = outcome
    assert isinstance(results, list) and results, results
    assert all(isinstance(r, dkim.DKIMResult) and r.result in dkim.RESULTS for r in results)


# --- the SMTP command path of a real server ---------------------------------------------

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[^\r\n]*\Z")
CLOSING_CODES = (421, 554)  # replies after which the server may hang up


class ProtocolError(AssertionError):
    pass


class Dialog:
    """A blocking client that checks every reply line's form (runs in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self.buf:
                    raise ProtocolError(f"connection closed inside a reply: {self.buf!r}")
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> int | None:
        """The code of the next complete reply, None if the server closed."""
        code = None
        while True:
            line = self._line()
            if line is None:
                if code is not None:
                    raise ProtocolError("connection closed inside a multi-line reply")
                return None
            m = REPLY_LINE.match(line)
            if m is None:
                raise ProtocolError(f"malformed reply line {line!r}")
            if code is not None and int(m.group(1)) != code:
                raise ProtocolError(f"reply code changed inside a reply: {line!r}")
            code = int(m.group(1))
            if m.group(2) == b" ":
                return code

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


def _verb(line: bytes) -> bytes:
    return line.split(b" ", 1)[0].split(b":", 1)[0].upper()


def _finish(dialog: Dialog, last: int | None) -> None:
    """NOOP must get 250 and QUIT 221 then EOF: proves one reply per line."""
    if not dialog.send(b"NOOP\r\n"):
        assert last in CLOSING_CODES, f"server hung up after {last}"
        return
    noop = dialog.reply()
    if noop is None:
        assert last in CLOSING_CODES, f"server hung up after {last}"
        return
    assert noop == 250, f"NOOP answered {noop}: session out of step"
    assert dialog.send(b"QUIT\r\n")
    assert dialog.reply() == 221
    assert dialog.reply() is None


def run_sequential(port: int, lines: list[bytes]) -> None:
    dialog = Dialog(port)
    try:
        assert dialog.reply() == 220
        last: int | None = 220
        for line in lines:
            if not dialog.send(line + b"\r\n"):
                assert last in CLOSING_CODES, f"server hung up after {last}"
                return
            code = dialog.reply()
            if code is None:
                assert last in CLOSING_CODES, f"no reply to {line[:60]!r} after {last}"
                return
            if code == 221:
                assert _verb(line) == b"QUIT", f"221 for {line[:60]!r}"
                assert dialog.reply() is None
                return
            if code == 354:  # DATA was accepted: send a message, one reply follows
                dialog.send(b"Subject: fuzz\r\n\r\nbody\r\n.\r\n")
                code = dialog.reply()
                assert code is not None and code != 354
            last = code
        _finish(dialog, last)
    finally:
        dialog.close()


def run_pipelined(port: int, lines: list[bytes]) -> None:
    """All lines and the NOOP in one write (RFC 2920): replies in order, one each."""
    dialog = Dialog(port)
    try:
        assert dialog.reply() == 220
        dialog.send(b"".join(line + b"\r\n" for line in lines) + b"NOOP\r\n")
        last: int | None = 220
        for line in lines:
            code = dialog.reply()
            if code is None:
                assert last in CLOSING_CODES, f"no reply to {line[:60]!r} after {last}"
                return
            last = code
        noop = dialog.reply()
        if noop is None:
            assert last in CLOSING_CODES, f"server hung up after {last}"
            return
        assert noop == 250, f"NOOP answered {noop}: session out of step"
        assert dialog.send(b"QUIT\r\n") and dialog.reply() == 221
    finally:
        dialog.close()


def _no_crlf(data: bytes) -> bytes:
    while b"\r\n" in data:
        data = data.replace(b"\r\n", b"")
    return data


VERBS = ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "VRFY", "EXPN",
         "HELP", "AUTH", "STARTTLS", "BDAT", "ETRN", "mail from:", "Rcpt To:", "ehlo", "X-",
         "GET", "POST"]
GOOD = [b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<alice@remote.test>",
        b"MAIL FROM:<> BODY=8BITMIME SIZE=100", b"MAIL FROM:<u@remote.test> SMTPUTF8",
        b"RCPT TO:<alice@example.test>", b"RCPT TO:<info@example.test>",
        b"RCPT TO:<Postmaster>", b"RCPT TO:<someone@elsewhere.test>", b"DATA", b"RSET",
        b"AUTH PLAIN AGFsaWNlAHg=", b"AUTH LOGIN", b"STARTTLS"]
command = st.builds(
    lambda verb, sep, arg: _no_crlf(f"{verb}{sep}{arg}".encode("utf-8", "surrogatepass")),
    st.sampled_from(VERBS), st.sampled_from(["", " ", "  ", "\t"]),
    path_text | param_text | any_text | st.text(max_size=40))
raw_line = (st.binary(max_size=120).map(_no_crlf)
            | st.text(max_size=80).map(lambda t: _no_crlf(t.encode("utf-8", "surrogatepass")))
            | st.integers(2040, 4000).map(lambda n: b"NOOP " + b"x" * n))
smtp_line = st.sampled_from(GOOD) | command | raw_line
SMTP = settings(FUZZ, max_examples=200)


@pytest.fixture(scope="module")
def mta_port(tmp_path_factory):
    """One real MTA for the module: no TLS, no limit on errors or on connections per IP."""
    root = tmp_path_factory.mktemp("fuzz-mta")
    running = pytest_twisted.blockon(Deferred.fromCoroutine(start_mta(
        root, tls=False,
        extra={"limits": {"max_errors": 100_000, "max_connections_per_ip": 1000,
                          "connection_rate_per_ip": 0}})))
    yield running.port("mx")
    pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


@pytest_twisted.ensureDeferred
async def test_smtp_each_line_gets_one_reply(mta_port):
    # Hypothesis runs in a worker thread, its blocking client talking to the
    # server that the reactor (this thread) runs.
    @SMTP
    @given(st.lists(smtp_line, min_size=1, max_size=8))
    def dialogs(lines):
        run_sequential(mta_port, lines)

    await deferToThread(dialogs)


@pytest_twisted.ensureDeferred
async def test_smtp_pipelined_lines_get_replies_in_order(mta_port):
    # Without TLS, AUTH is refused at once (no SASL exchange), so it may be pipelined.
    @SMTP
    @given(st.lists(smtp_line.filter(lambda ln: _verb(ln) not in (b"DATA", b"BDAT", b"QUIT")),
                    min_size=1, max_size=8))
    def dialogs(lines):
        run_pipelined(mta_port, lines)

    await deferToThread(dialogs)


@pytest.mark.parametrize("lines", [
    [b"EHLO a", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@example.test>", b"DATA"],
    [b"GET / HTTP/1.1"],
    [b"NOOP " + b"x" * 3000, b"HELO \xff\xfe", b"MAIL FROM:<a\nb@c>", b"\x00"],
])
@pytest_twisted.ensureDeferred
async def test_smtp_dialog_helpers_on_known_lines(mta_port, lines):
    """The checker itself: a full transaction, an HTTP close, and error replies."""
    await deferToThread(run_sequential, mta_port, lines)


def test_envelope_writes_every_field_and_round_trips():
    """to_bytes lists fields by hand (speed): a new field must not be forgotten."""
    import dataclasses

    from mta.queue.envelope import Recipient, RecipientKind

    # With DSN parameters (RFC 3461), BINARYMIME (RFC 3030) and REQUIRETLS (RFC 8689), every field is written ...
    r = Recipient("a@b.test", RecipientKind.REMOTE, "a@b.test", mailbox="", notify="NEVER")
    env = Envelope("q1", "s@x.test", [r], 1.5, extra={"srs_sender": "x"}, dsn=True, ret="HDRS",
                   binarymime=True, requiretls=True, hold="quarantined")
    doc = json.loads(env.to_bytes())
    assert set(doc) - {"version"} == {f.name for f in dataclasses.fields(Envelope)}
    assert set(doc["recipients"][0]) == {f.name for f in dataclasses.fields(Recipient)}
    assert Envelope.from_bytes(env.to_bytes()) == env
    # ... without them, all but those, which are only written when given.
    r = Recipient("a@b.test", RecipientKind.REMOTE, "a@b.test", mailbox="")
    env = Envelope("q1", "s@x.test", [r], 1.5, extra={"srs_sender": "x"})
    doc = json.loads(env.to_bytes())
    assert set(doc) - {"version"} == {f.name for f in dataclasses.fields(Envelope)} - {
        "dsn", "ret", "envid", "binarymime", "requiretls", "hold"}
    assert set(doc["recipients"][0]) == {f.name for f in dataclasses.fields(Recipient)} - {
        "notify", "orcpt"}
    assert Envelope.from_bytes(env.to_bytes()) == env
