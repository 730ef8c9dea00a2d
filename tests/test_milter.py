"""The milter client (issue 17) against a scripted milter on loopback: the negotiation,
the macros, every per-stage reply, every end-of-message action, and each fault.

Each test starts the MTA in this process with ``[milters.scripted]`` pointing at a
:class:`tests.milter.ScriptedMilter` and sends mail with a raw client; it asserts
the replies, the queued message and its envelope, what the milter was sent, and
the log events.
"""

from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests import milter as M
from tests.harness import RawClient, in_thread, start_mta

MESSAGE = (b"From: Bob <bob@example.test>\r\nTo: alice@example.test\r\nSubject: hi\r\n"
           b"X-Old: one\r\nX-Old: two\r\n\r\nbody line\r\n")


async def start(tmp_path, *milters, extra=None, **settings):
    tables = {f"m{i}": {"socket": m.socket, "command_timeout": 2, "content_timeout": 2,
                        "connect_timeout": 2, **settings} for i, m in enumerate(milters)}
    raw = {"milters": {**tables, "smtpd": list(tables)}}
    return await start_mta(tmp_path, extra={**raw, **(extra or {})})


def dialog(port, *, sender="bob@example.test", rcpts=("alice@example.test",), body=MESSAGE,
           transactions=1, quit=True):
    """Replies of MAIL, each RCPT and the end of DATA, for each transaction."""
    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    out = []
    for _ in range(transactions):
        replies = [c.cmd(f"MAIL FROM:<{sender}>")]
        if replies[0][0] != 250:
            out.append(replies)
            c.cmd("RSET")
            continue
        replies += [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
        if any(r[0] == 250 for r in replies[1:]):
            code, text = c.cmd("DATA")
            if code == 354:
                c.send(body + b".\r\n")
                replies.append(c.read_reply())
            else:
                replies.append((code, text))
        else:
            c.cmd("RSET")
        out.append(replies)
    if quit:
        c.cmd("QUIT")
    c.close()
    return out


async def wait_for(condition, seconds=3.0):
    """Until ``condition()`` (what a milter thread records after the client is done)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not met in time")


class Events:
    def __init__(self):
        self.events = []

    def __enter__(self):
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def of(self, name):
        return [e for e in self.events if e.get("event") == name]


def macros_sent(milter):
    """{command letter: {macro: value}} of the SMFIC_MACRO packets the milter got."""
    out = {}
    for cmd, data in milter.commands:
        if cmd == b"D":
            parts = data[1:].split(b"\0")
            out.setdefault(data[:1], {}).update(
                {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)})
    return out


@pytest.fixture
def scripted():
    made = []

    def make(*args, **kwargs):
        m = M.ScriptedMilter(*args, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


@pytest_twisted.ensureDeferred
async def test_clean_message_passes_with_macros_and_steps(tmp_path, scripted):
    milter = scripted()
    mta = await start(tmp_path, milter)
    try:
        ((mail, rcpt, data),) = await in_thread(dialog, mta.port())
        assert mail[0] == 250 and rcpt[0] == 250 and data[0] == 250
        (env,) = mta.queued()
        names = milter.names()
        # The order Postfix sends: negotiation, connect, HELO, MAIL, RCPT, DATA,
        # headers, end of headers, body, end of message (each after its macros).
        steps = [n for n in names if n != b"D"]
        assert steps[:7] == [b"O", b"C", b"H", b"M", b"R", b"T", b"L"]
        assert steps[-3:] == [b"N", b"B", b"E"] or steps[-4:] == [b"N", b"B", b"E", b"Q"]
        macros = macros_sent(milter)
        assert macros[b"C"]["j"] == "mx.example.test"
        assert macros[b"C"]["{client_addr}"] == "127.0.0.1"
        assert macros[b"C"]["{client_name}"] == "[127.0.0.1]"
        assert int(macros[b"C"]["{client_port}"]) > 0
        assert macros[b"C"]["{daemon_name}"] == "mx"
        assert macros[b"M"]["{mail_addr}"] == "bob@example.test"
        assert macros[b"R"]["{rcpt_addr}"] == "alice@example.test"
        assert macros[b"E"]["i"] == env.id
        # SMFIC_CONNECT: name, family 4, port, address; HELO; MAIL; RCPT.
        (connect,) = [d for c, d in milter.commands if c == b"C"]
        assert connect.startswith(b"[127.0.0.1]\x004") and connect.endswith(b"127.0.0.1\0")
        assert (b"H", b"client.test\0") in milter.commands
        assert (b"M", b"<bob@example.test>\0") in milter.commands
        assert (b"R", b"<alice@example.test>\0") in milter.commands
        headers = [d for c, d in milter.commands if c == b"L"]
        assert headers[0] == b"From\0Bob <bob@example.test>\0"
        assert milter.body == b"body line\r\n"
        await wait_for(lambda: milter.names()[-1:] == [b"Q"])  # SMFIC_QUIT at the session's end
    finally:
        await mta.stop()


@pytest.mark.parametrize(("stage", "answer", "code", "text"), [
    (b"M", M.REJECT, 550, "550 5.7.1 Command rejected"),
    (b"M", M.TEMPFAIL, 451, "451 4.7.1 Service unavailable - try again later"),
    (b"R", M.REJECT, 550, "550 5.7.1 Command rejected"),
    (b"R", M.replycode("452 4.2.2 Mailbox full"), 452, "452 4.2.2 Mailbox full"),
    (b"E", M.replycode("554-5.7.1 Spam message rejected\r\n554 5.7.1 see http://x.test/"), 554,
     "554-5.7.1 Spam message rejected\n554 5.7.1 see http://x.test/"),
    (b"E", M.TEMPFAIL, 451, "451 4.7.1 Service unavailable - try again later"),
    (b"L", M.REJECT, 550, "550 5.7.1 Command rejected"),
    (b"B", M.replycode("550 5.7.0 Virus found"), 550, "550 5.7.0 Virus found"),
    (b"C", M.replycode("554 5.7.1 go away"), 554, "554 5.7.1 go away"),
    (b"H", M.TEMPFAIL, 451, "451 4.7.1 Service unavailable - try again later"),
], ids=["mail-reject", "mail-tempfail", "rcpt-reject", "rcpt-replycode", "eom-multiline",
        "eom-tempfail", "header-reject", "body-replycode", "connect-replycode", "helo-tempfail"])
@pytest_twisted.ensureDeferred
async def test_refusal_at_each_stage(tmp_path, scripted, stage, answer, code, text):
    milter = scripted({stage: [answer]})
    mta = await start(tmp_path, milter)
    try:
        with Events() as ev:
            (replies,) = await in_thread(dialog, mta.port())
        # A refusal of the connection or HELO is said at MAIL (as Postfix's delayed reject).
        at = {b"C": 0, b"H": 0, b"M": 0, b"R": 1}.get(stage, -1)
        assert replies[at] == (code, text)
        assert mta.queued() == []
        (rejected,) = ev.of("rejected")
        assert rejected["code"] == code and rejected["reason"] == "milter"
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_rcpt_refusal_keeps_the_other_recipients(tmp_path, scripted):
    milter = scripted({b"R": lambda d: [M.REJECT] if b"bob" in d else [M.CONTINUE]})
    mta = await start(tmp_path, milter)
    try:
        ((mail, r1, r2, data),) = await in_thread(
            dialog, mta.port(), rcpts=("bob@example.test", "alice@example.test"))
        assert r1[0] == 550 and r2[0] == 250 and data[0] == 250
        (env,) = mta.queued()
        assert [r.address for r in env.recipients] == ["alice@example.test"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_accept_at_mail_skips_the_rest_of_the_message(tmp_path, scripted):
    milter = scripted({b"M": [M.ACCEPT]})
    mta = await start(tmp_path, milter)
    try:
        ((mail, rcpt, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250 and len(mta.queued()) == 1
        assert b"R" not in milter.names() and b"E" not in milter.names()
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_accept_of_the_connection_skips_the_session(tmp_path, scripted):
    milter = scripted({b"C": [M.ACCEPT]})
    mta = await start(tmp_path, milter)
    try:
        replies = await in_thread(dialog, mta.port(), transactions=2)
        assert [r[-1][0] for r in replies] == [250, 250]
        assert not {b"M", b"R", b"E"} & set(milter.names())
    finally:
        await mta.stop()


@pytest.mark.parametrize("stage", [b"M", b"R", b"E"])
@pytest_twisted.ensureDeferred
async def test_discard_accepts_and_drops(tmp_path, scripted, stage):
    milter = scripted({stage: [M.DISCARD]})
    mta = await start(tmp_path, milter)
    try:
        with Events() as ev:
            ((mail, rcpt, data),) = await in_thread(dialog, mta.port())
        assert mail[0] == rcpt[0] == 250
        assert data == (250, "250 2.0.0 Ok")
        assert mta.queued() == []
        (discarded,) = ev.of("discarded")
        assert "discarded" in discarded["why"]
        assert [e["result"] for e in ev.of("milter")] == ["discard"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_one_connection_per_session_with_abort_between_transactions(tmp_path, scripted):
    # The first transaction is refused at RCPT by our own lookup (no such user):
    # the milter saw MAIL, so it is told SMFIC_ABORT before the next MAIL.
    milter = scripted()
    mta = await start(tmp_path, milter)
    try:
        first, second = await in_thread(dialog, mta.port(), transactions=2,
                                        rcpts=("nobody@example.test",))
        assert first[1][0] == 550 and second[1][0] == 550
        await wait_for(lambda: b"Q" in milter.names())
        steps = [n for n in milter.names() if n != b"D"]
        assert milter.connections == 1
        assert steps == [b"O", b"C", b"H", b"M", b"A", b"M", b"Q"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_no_reply_and_skipped_steps_are_honoured(tmp_path, scripted):
    # SMFIP_NOHELO | NORCPT | NOHDRS, NR_MAIL, NR_BODY; the milter sends nothing for
    # those (the scripted one would answer otherwise and desynchronise the session).
    protocol = 0x02 | 0x08 | 0x20 | 0x4000 | 0x80000
    milter = scripted(protocol=protocol)
    mta = await start(tmp_path, milter)
    try:
        replies = await in_thread(dialog, mta.port(), transactions=2)
        assert [r[-1][0] for r in replies] == [250, 250]
        names = milter.names()
        assert b"H" not in names and b"R" not in names and b"L" not in names
        assert names.count(b"M") == 2 and names.count(b"E") == 2
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_setsymlist_macros_are_sent(tmp_path, scripted):
    optneg = M.pkt(b"O", struct.pack("!III", 6, M.ALL_ACTIONS | 0x100, 0)
                   + struct.pack("!I", 2) + b"{mail_addr} {client_addr}\0")
    milter = scripted(optneg=optneg)
    mta = await start(tmp_path, milter)
    try:
        await in_thread(dialog, mta.port())
        macros = macros_sent(milter)
        assert macros[b"M"] == {"{mail_addr}": "bob@example.test", "{client_addr}": "127.0.0.1"}
    finally:
        await mta.stop()


def eom(*mods):
    return {b"E": [*mods, M.CONTINUE]}


@pytest_twisted.ensureDeferred
async def test_header_actions_land_in_the_queued_message(tmp_path, scripted):
    milter = scripted(eom(
        M.add_header("X-Added", "yes\n\tfolded"),
        M.insert_header(0, "X-Top", "first"),
        M.change_header(2, "X-Old", "changed"),
        M.change_header(1, "Subject", ""),
    ))
    mta = await start(tmp_path, milter)
    try:
        ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250
        (env,) = mta.queued()
        msg = mta.message_bytes(env.id)
        head, _, body = msg.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        own = lines[lines.index(b"X-Top: first"):]
        assert own == [b"X-Top: first", b"From: Bob <bob@example.test>", b"To: alice@example.test",
                       b"X-Old: one", b"X-Old: changed", b"X-Added: yes", b"\tfolded"]
        assert body == b"body line\r\n"
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_body_recipients_sender_and_quarantine(tmp_path, scripted):
    milter = scripted(eom(
        M.replace_body(b"new body\r\n"), M.replace_body(b"second part\r\n"),
        M.add_rcpt("bob@example.test"), M.del_rcpt("alice@example.test"),
        M.change_from("bounces@example.test"), M.quarantine("suspicious"),
    ))
    mta = await start(tmp_path, milter)
    try:
        with Events() as ev:
            ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250
        (env,) = mta.queued()
        assert env.sender == "bounces@example.test"
        assert [r.address for r in env.recipients] == ["bob@example.test"]
        assert env.hold == "suspicious"  # SMFIR_QUARANTINE: in the hold queue (test_hold.py)
        msg = mta.message_bytes(env.id)
        assert msg.endswith(b"\r\n\r\nnew body\r\nsecond part\r\n")
        assert [e["detail"] for e in ev.of("milter") if e["result"] == "quarantine"] == ["suspicious"]
    finally:
        await mta.stop()


def test_quarantine_is_carried_by_the_verdict():
    """What the hold queue (the screen helper's part of issue 17) reads: Verdict.quarantine."""
    from mta.mail.checks import ACCEPT
    from mta.policy.milter.check import MilterSession, _Message
    from mta.policy.milter.codec import Negotiated, Packet

    class State:
        header_lines = [b"Subject: x"]
        message = b"Subject: x\r\n\r\nbody\r\n"
        message_path = None
        client_ip = "127.0.0.1"

    ms = MilterSession(None)
    ms.neg = Negotiated(6, M.ALL_ACTIONS, 0, {})
    msg = _Message(State())
    one = msg.apply(ms, [Packet(b"q", b"held by policy\0")], None)
    assert one.quarantine == "held by policy"
    verdict = msg.verdict(one.quarantine)
    assert verdict is not ACCEPT and verdict.quarantine == "held by policy" and verdict.accepted


@pytest_twisted.ensureDeferred
async def test_unnegotiated_action_is_a_fault(tmp_path, scripted):
    milter = scripted(eom(M.add_header("X-A", "b")), actions=0)
    mta = await start(tmp_path, milter)
    try:
        with Events() as ev:
            ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 451 and mta.queued() == []
        (fault,) = ev.of("milter")
        assert fault["result"] == "garbage" and "not negotiated" in fault["detail"]
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_two_milters_in_order_the_second_sees_the_first_changes(tmp_path, scripted):
    first = scripted(eom(M.add_header("X-First", "1"), M.replace_body(b"from first\r\n")))
    second = scripted(eom(M.add_header("X-Second", "2")))
    mta = await start(tmp_path, first, second)
    try:
        ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250
        (env,) = mta.queued()
        msg = mta.message_bytes(env.id)
        assert msg.index(b"X-First: 1") < msg.index(b"X-Second: 2")
        assert (b"L", b"X-First\x001\0") in second.commands
        assert second.body == b"from first\r\n"
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_first_milter_refusal_stops_the_second(tmp_path, scripted):
    first = scripted({b"M": [M.REJECT]})
    second = scripted()
    mta = await start(tmp_path, first, second)
    try:
        ((mail,),) = await in_thread(dialog, mta.port())
        assert mail[0] == 550
        assert b"M" not in second.names()
    finally:
        await mta.stop()


# --- faults ------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["close", "garbage", "slow", "down"])
@pytest.mark.parametrize("default_action", ["tempfail", "accept"])
@pytest_twisted.ensureDeferred
async def test_fault_gets_the_default_action(tmp_path, scripted, fault, default_action):
    script = {"close": "close", "garbage": "garbage", "slow": ("sleep", 3)}
    milter = scripted({b"R": script[fault]} if fault != "down" else {})
    if fault == "down":  # nothing listens there
        milter.stop()
        milter.socket = f"inet:127.0.0.1:{M.free_port()}"
    mta = await start(tmp_path, milter, default_action=default_action)
    try:
        with Events() as ev:
            first, second = await in_thread(dialog, mta.port(), transactions=2)
        if default_action == "tempfail":
            at = 0 if fault == "down" else 1
            assert first[at] == (451, "451 4.7.1 Service unavailable - try again later")
            assert second[0][0] == 451  # the milter stays failed for the session
            assert mta.queued() == []
        else:
            assert first[-1][0] == 250 and second[-1][0] == 250
            assert len(mta.queued()) == 2
        (event,) = ev.of("milter")
        expected = {"close": "closed", "garbage": "garbage", "slow": "timeout", "down": "down"}[fault]
        assert event["result"] == expected and event["action"] == default_action
        # The session stayed in step: other sessions are served, the milter is tried again.
        if fault != "down":
            milter.script = {}
            (again,) = await in_thread(dialog, mta.port())
            assert again[-1][0] == 250
    finally:
        await mta.stop()


# --- a big message: streamed from its file, never held whole ------------------------

BIG = 100 * 1024 * 1024


def send_big(port, line=b"x" * 998 + b"\r\n", size=BIG):
    """A ~100 MB message sent in 1 MB writes (never built whole here either)."""
    import hashlib

    c = RawClient(port, timeout=120)
    c.read_reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<bob@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    block = line * (1024 * 1024 // len(line))
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        c.send(block)
        digest.update(block)
        sent += len(block)
    c.send(b".\r\n")
    reply = c.read_reply()
    c.cmd("QUIT")
    c.close()
    return reply, sent, digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("edit", [False, True], ids=["stream", "stream-and-edit"])
@pytest_twisted.ensureDeferred
async def test_100mb_message_streams_to_the_milter_in_chunks(tmp_path, scripted, edit):
    import tracemalloc

    milter = scripted(eom(M.add_header("X-Scanned", "big"), M.replace_body(b"replaced\r\n"))
                      if edit else {})
    milter.keep_body = False
    mta = await start(tmp_path, milter, extra={"limits": {"max_message_size": 200 * 1024 * 1024}})
    tracemalloc.start()
    try:
        reply, sent, digest = await in_thread(send_big, mta.port())
        _, peak = tracemalloc.get_traced_memory()
        assert reply[0] == 250
        assert milter.body_size == sent and milter.body_hash.hexdigest() == digest
        assert max(milter.chunk_sizes) == 65535
        # Neither the session nor the milter client held the message whole (the
        # 1 MB writes of the client, the reader's blocks, 64 KiB chunks).
        assert peak < 30 * 1024 * 1024, peak
        (env,) = mta.queued()
        path = mta.store.data_path(env.id)
        if edit:
            data = path.read_bytes()
            head, _, body = data.partition(b"\r\n\r\n")
            assert b"\r\nX-Scanned: big" in head and body == b"replaced\r\n"
        else:
            assert path.stat().st_size > sent
    finally:
        tracemalloc.stop()
        await mta.stop()


# --- mta check-config ------------------------------------------------------------------


def test_check_config_probes_each_milter(tmp_path, scripted, capsys):
    from mta.admin import cli
    from tests.milter import free_port

    alive = scripted()
    dead = free_port()
    config = tmp_path / "mta.toml"
    config.write_text(f"""
hostname = "mx.example.test"
data_dir = "var"

[listeners.mx]
endpoint = "tcp:0:interface=127.0.0.1"
kind = "mx"

[milters]
smtpd = ["alive", "dead"]

[milters.alive]
socket = "{alive.socket}"

[milters.dead]
socket = "inet:127.0.0.1:{dead}"
connect_timeout = 2
""")
    assert cli.main(["check-config", "--config", str(config)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("milters.")] == [
        f"milters.dead: unreachable: inet:127.0.0.1:{dead}: [Errno 111] Connection refused"]
    assert alive.names()[:1] == [b"O"]
    config.write_text(config.read_text().replace(', "dead"', "").split("[milters.dead]")[0])
    assert cli.main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "configuration OK\n"


@pytest.mark.parametrize(("table", "problem"), [
    ({"smtpd": ["nope"]}, "milters.smtpd[0]: no [milters.nope] table"),
    ({"local": ["nope"]}, "milters.local[0]: no [milters.nope] table"),
    ({"a": {}}, "milters.a.socket: is required"),
    ({"a": {"socket": "unix:relative"}}, "milters.a.socket: 'unix:relative': unix: needs an absolute path"),
    ({"a": {"socket": "inet:localhost"}}, "milters.a.socket: 'inet:localhost': inet:host:port needs a port"),
    ({"a": {"socket": "inet:h:1", "default_action": "reject"}},
     "default_action: must be one of tempfail, accept"),
    ({"a": {"socket": "inet:h:1", "command_timeout": 0}}, "milters.a.command_timeout: must be greater than zero"),
    ({"a": {"socket": "inet:h:1", "bogus": 1}}, "milters.a.bogus"),
    ({"mx": "a"}, "milters.mx: must be a list of milter names"),
])
def test_milter_configuration_errors(tmp_path, table, problem):
    from mta.config import ConfigError
    from tests.harness import make_config

    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={"milters": table})
    assert problem in str(e.value)


def test_milter_lists_follow_postfix(tmp_path):
    """``smtpd`` is Postfix's smtpd_milters (every listener); a listener kind's own list
    replaces it, as master.cf's ``-o smtpd_milters=`` does for one service."""
    from tests.harness import make_config

    config = make_config(tmp_path, extra={"milters": {
        "spam": {"socket": "inet:127.0.0.1:11332"}, "dkim": {"socket": "unix:/run/opendkim.sock"},
        "smtpd": ["spam"], "submission": ["dkim", "spam"]}})
    m = config.milters
    assert m.for_kind("mx") == ("spam",) and m.for_kind("submission") == ("dkim", "spam")
    assert m.get("spam").content_timeout == 300 and m.get("spam").default_action == "tempfail"
    assert "milter" in config.checks.order


@pytest_twisted.ensureDeferred
async def test_a_slow_milter_session_does_not_hold_up_the_others(tmp_path, scripted):
    import time as clock

    def rcpt(data):
        return ("sleep", 3) if b"bob@" in data else [M.CONTINUE]

    milter = scripted({b"R": rcpt})
    mta = await start(tmp_path, milter)
    try:
        def timed(rcpts):
            t0 = clock.monotonic()
            (replies,) = dialog(mta.port(), rcpts=rcpts)
            return replies, clock.monotonic() - t0

        slow = in_thread(timed, ("bob@example.test",))
        (fast_replies, fast_time) = await in_thread(timed, ("alice@example.test",))
        slow_replies, slow_time = await slow
        assert fast_replies[-1][0] == 250 and fast_time < 1.5
        assert slow_replies[1][0] == 451 and slow_time >= 2  # command_timeout = 2
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_progress_keeps_a_slow_end_of_message_alive(tmp_path, scripted):
    import time as clock

    def eom_slowly(data):
        # SMFIR_PROGRESS every second for 3 s (content_timeout = 2), then CONTINUE.
        return "progress"

    milter = scripted({b"E": eom_slowly})
    milter.progress = (3, 1.0)
    mta = await start(tmp_path, milter)
    try:
        t0 = clock.monotonic()
        ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250 and clock.monotonic() - t0 >= 3
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_a_milter_on_a_unix_socket(tmp_path, scripted):
    milter = scripted(eom(M.add_header("X-Unix", "yes")), unix=tmp_path / "milter.sock")
    assert milter.socket == f"unix:{tmp_path / 'milter.sock'}"
    mta = await start(tmp_path, milter)
    try:
        ((_, _, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250
        (env,) = mta.queued()
        assert b"\r\nX-Unix: yes\r\n" in mta.message_bytes(env.id)
        (connect,) = [d for c, d in milter.commands if c == b"C"]
        assert connect.startswith(b"[127.0.0.1]\x004")
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_the_stage_time_limit_drops_the_milter_and_the_session_stays_in_step(tmp_path, scripted):
    # [checks.milter] timeout bounds the whole stage: past it the pipeline gives
    # up on the check (451 4.3.0, its on_error); the milter's late answer is not
    # taken for the next step's, and the milter is done for the session.
    milter = scripted({b"E": ("sleep", 2)})
    mta = await start(tmp_path, milter, content_timeout=10,
                      extra={"checks": {"milter": {"timeout": 1}}})
    try:
        with Events() as ev:
            first, second = await in_thread(dialog, mta.port(), transactions=2)
        assert first[-1][0] == 451 and "4.3.0" in first[-1][1]
        assert second[0] == (451, "451 4.7.1 Service unavailable - try again later")
        # The pipeline's "check" events: the first stage's timeout, then the
        # milter check's own 451 (its default_action) in the second transaction.
        assert [e["result"] for e in ev.of("check")] == ["timeout", "tempfail"]
        assert mta.queued() == []
        milter.script = {}
        (again,) = await in_thread(dialog, mta.port())
        assert again[-1][0] == 250
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_auth_and_tls_macros_of_a_submission(tmp_path, scripted):
    from tests.test_milter_real import message, send

    milter = scripted()
    mta = await start(tmp_path, milter)
    try:
        code, _ = await in_thread(send, mta.port("submission"), message("auth", b"x"),
                                  sender="alice@example.test", login="alice@example.test")
        assert code == 250
        macros = macros_sent(milter)
        assert macros[b"M"]["{auth_authen}"] == "alice@example.test"
        assert macros[b"M"]["{auth_type}"] == "PLAIN"
        assert macros[b"H"]["{tls_version}"].startswith("TLSv1.")
        assert macros[b"H"]["{cipher}"]
        assert macros[b"C"]["{daemon_name}"] == "submission"
    finally:
        await mta.stop()


# --- milters per named listener (a [listeners.NAME] milters key) ---------------------


@pytest_twisted.ensureDeferred
async def test_milters_per_named_listener(tmp_path, scripted):
    """Two mx listeners; only ``filtered`` names the milter (its ``milters`` key, as
    master.cf's ``-o smtpd_milters=`` for one service): its session's traffic goes
    through the milter (refused recipient, added header), the other's never reaches it."""
    def rcpt(data):
        return [M.replycode("550 5.7.1 not on the filtered door")] if b"bob@" in data else [M.CONTINUE]

    milter = scripted({b"R": rcpt, b"E": [M.add_header("X-Filtered", "yes"), M.CONTINUE]})
    mta = await start_mta(tmp_path, extra={
        "milters": {"m0": {"socket": milter.socket, "command_timeout": 2, "content_timeout": 2}},
        "listeners": {"filtered": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "mx",
                                   "milters": ["m0"]}}})
    try:
        rcpts = ("alice@example.test", "bob@example.test")
        ((mail, alice, bob, data),) = await in_thread(dialog, mta.port("filtered"), rcpts=rcpts)
        assert mail[0] == 250 and alice[0] == 250 and data[0] == 250
        assert bob == (550, "550 5.7.1 not on the filtered door")
        await wait_for(lambda: b"Q" in milter.names())
        seen = len(milter.commands)
        assert milter.connections == 1
        macros = macros_sent(milter)
        assert macros[b"C"]["{daemon_name}"] == "filtered"
        ((mail, alice, bob, data),) = await in_thread(dialog, mta.port("mx"), rcpts=rcpts)
        assert mail[0] == 250 and alice[0] == 250 and bob[0] == 250 and data[0] == 250
        # The plain listener's session opened no milter connection and sent nothing.
        assert milter.connections == 1 and len(milter.commands) == seen
        filtered, plain = sorted(mta.queued(), key=lambda e: len(e.recipients))
        assert [r.address for r in filtered.recipients] == ["alice@example.test"]
        assert b"\r\nX-Filtered: yes\r\n" in mta.message_bytes(filtered.id)
        assert len(plain.recipients) == 2
        assert b"X-Filtered" not in mta.message_bytes(plain.id)
    finally:
        await mta.stop()


def test_a_listener_list_overrides_the_kind_lists(tmp_path):
    from tests.harness import make_config

    config = make_config(tmp_path, extra={
        "milters": {"spam": {"socket": "inet:127.0.0.1:11332"}, "smtpd": ["spam"]},
        "listeners": {"quiet": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "mx", "milters": []},
                      "loud": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "submission",
                               "milters": ["spam"]}}})
    m = config.milters
    assert m.for_listener("mx", "mx") == ("spam",)
    assert m.for_listener("quiet", "mx") == ()
    assert m.for_listener("loud", "submission") == ("spam",)
    assert [lst.milters for lst in config.listeners if lst.name == "quiet"] == [()]


@pytest.mark.parametrize(("listener", "problem"), [
    ({"milters": ["nope"]}, "listeners.x.milters[0]: no [milters.nope] table"),
    ({"milters": "spam"}, "listeners.x.milters: must be a list of milter names"),
    ({"milters": ["spam", "spam"]}, "listeners.x.milters[1]: spam is listed twice"),
])
def test_listener_milters_errors(tmp_path, listener, problem):
    from mta.config import ConfigError
    from tests.harness import make_config

    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, extra={
            "milters": {"spam": {"socket": "inet:127.0.0.1:11332"}},
            "listeners": {"x": {"endpoint": "tcp:0:interface=127.0.0.1", "kind": "mx", **listener}}})
    assert problem in str(e.value)


# --- the TLS macros of a client certificate ------------------------------------------


def _tls_session(port, cert=None):
    """EHLO, STARTTLS (presenting ``cert``, a trustme LeafCert, if given), EHLO, one
    message; the end of DATA's reply."""
    from tests.harness import client_tls_context

    c = RawClient(port)
    c.read_reply()
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    ctx = client_tls_context()
    if cert is not None:
        cert.configure_cert(ctx)
    c.sock = ctx.wrap_socket(c.sock, server_hostname="mx.example.test")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<bob@elsewhere.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MESSAGE + b".\r\n")
    reply = c.read_reply()
    c.cmd("QUIT")
    c.close()
    return reply


@pytest_twisted.ensureDeferred
async def test_tls_client_certificate_macros(tmp_path, scripted):
    """With [tls] ask_client_cert the HELO step carries {cert_subject} and
    {cert_issuer} of the client's certificate (the issuer's CN, else its O, as
    Postfix) and {cipher_bits}; a TLS client without a certificate gets the bits
    and empty certificate macros."""
    from tests.harness import shared_ca

    milter = scripted()
    mta = await start(tmp_path, milter, extra={"tls": {"ask_client_cert": True}})
    try:
        cert = shared_ca().issue_cert("client.example.test", common_name="client.example.test")
        assert (await in_thread(_tls_session, mta.port(), cert))[0] == 250
        await wait_for(lambda: b"Q" in milter.names())
        helo = macros_sent(milter)[b"H"]
        assert helo["{cert_subject}"] == "client.example.test"
        # trustme's CA has no CN: its O ("trustme v1.2.1").
        assert helo["{cert_issuer}"].startswith("trustme v")
        assert int(helo["{cipher_bits}"]) >= 128
        assert helo["{tls_version}"].startswith("TLSv1.")
        milter.commands.clear()
        assert (await in_thread(_tls_session, mta.port()))[0] == 250
        await wait_for(lambda: b"Q" in milter.names())
        helo = macros_sent(milter)[b"H"]
        # (an empty macro is not sent, as Postfix)
        assert "{cert_subject}" not in helo and "{cert_issuer}" not in helo
        assert int(helo["{cipher_bits}"]) >= 128
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_no_client_certificate_is_asked_for_by_default(tmp_path, scripted):
    """Without ask_client_cert a client's certificate is never asked for: the
    certificate macros stay empty, the bits are there; a plain session sends all three empty."""
    from tests.harness import shared_ca

    milter = scripted()
    mta = await start(tmp_path, milter)
    try:
        cert = shared_ca().issue_cert("client.example.test", common_name="client.example.test")
        assert (await in_thread(_tls_session, mta.port(), cert))[0] == 250
        await wait_for(lambda: b"Q" in milter.names())
        helo = macros_sent(milter)[b"H"]
        assert "{cert_subject}" not in helo and int(helo["{cipher_bits}"]) >= 128
        milter.commands.clear()
        ((mail, rcpt, data),) = await in_thread(dialog, mta.port())
        assert data[0] == 250
        await wait_for(lambda: b"Q" in milter.names())
        helo = macros_sent(milter)[b"H"]
        assert not {"{cipher_bits}", "{cert_subject}", "{cert_issuer}", "{tls_version}"} & set(helo)
    finally:
        await mta.stop()


# --- the queue id (macro i) from MAIL on -----------------------------------------------


def _macros_by_packet(milter):
    """[(command letter, {macro: value})] of each SMFIC_MACRO packet, in order."""
    out = []
    for cmd, data in milter.commands:
        if cmd == b"D":
            parts = data[1:].split(b"\0")
            out.append((data[:1], {parts[i].decode(): parts[i + 1].decode()
                                   for i in range(0, len(parts) - 1, 2)}))
    return out


@pytest_twisted.ensureDeferred
async def test_queue_id_macro_from_mail_on(tmp_path, scripted):
    """``i`` is the queue id at MAIL and RCPT already (as Postfix, which makes its
    queue file at MAIL), the same at the end of message and in our Received
    header; each transaction of a session gets its own, and one refused before
    DATA leaves no file in the queue."""
    def rcpt(data):
        return [M.REJECT] if b"bob@" in data else [M.CONTINUE]

    milter = scripted({b"R": rcpt})
    mta = await start(tmp_path, milter)
    try:
        first, second = await in_thread(dialog, mta.port(), transactions=2)
        assert first[-1][0] == 250 and second[-1][0] == 250
        ((mail, bob),) = await in_thread(dialog, mta.port(), rcpts=("bob@example.test",))
        assert mail[0] == 250 and bob[0] == 550
        await wait_for(lambda: milter.names().count(b"Q") == 2)
        ids = {}
        for letter, values in _macros_by_packet(milter):
            if "i" in values:
                ids.setdefault(letter, []).append(values["i"])
        envs = sorted(mta.queued(), key=lambda e: e.id)
        assert len(envs) == 2
        assert sorted(ids[b"E"]) == [e.id for e in envs]
        # MAIL of the two queued transactions and of the refused one; RCPT likewise.
        assert ids[b"M"][:2] == ids[b"E"] and ids[b"R"][:2] == ids[b"E"]
        refused = ids[b"M"][2]
        assert ids[b"R"][2] == refused and refused not in ids[b"E"]
        for env in envs:
            assert f"id {env.id}".encode() in mta.message_bytes(env.id)
        files = [p.name for p in (tmp_path / "var").rglob("*") if refused in p.name]
        assert files == []
    finally:
        await mta.stop()


# --- local submission through [milters] local (Postfix's non_smtpd_milters) ----------


@pytest.fixture
def control_dir():
    """A short directory for the control socket (sun_path holds 107 octets)."""
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="mta", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def start_local(tmp_path, sock, milter):
    from mta.daemon.service import build_control

    mta = await start_mta(tmp_path, extra={"control_socket": str(sock), "milters": {
        "m0": {"socket": milter.socket, "command_timeout": 2, "content_timeout": 2,
               "connect_timeout": 2}, "local": ["m0"]}})
    if "control" not in mta.service.namedServices:
        build_control(mta.service).setServiceParent(mta.service)
    return mta


def submit(sock, message, sender="alice@example.test", recipients=("alice@example.test",)):
    """What ``mta sendmail`` does: the control channel's submit; its answer or ControlError."""
    import base64

    from mta.admin.control import ControlError, call

    try:
        return call(sock, "submit", sender=sender, recipients=list(recipients),
                    message=base64.b64encode(message).decode())
    except ControlError as e:
        return e


LOCAL_MESSAGE = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: local\r\n\r\nhello\r\n"


@pytest_twisted.ensureDeferred
async def test_local_submission_goes_through_the_local_milters(tmp_path, scripted, control_dir):
    """[milters] local: a sendmail submission is told to the milter as Postfix tells
    non-SMTP mail (connect from 127.0.0.1, HELO localhost, MAIL, RCPT, the message,
    its end), and the milter's changes are what is queued: a header added, a
    recipient added and one deleted, the body replaced. The SMTP listeners do not
    use the local list."""
    sock = control_dir / "control.sock"
    milter = scripted({b"E": [M.add_header("X-Local-Milter", "seen"), M.add_rcpt("bob@example.test"),
                              M.del_rcpt("alice@example.test"), M.replace_body(b"new body\r\n"),
                              M.CONTINUE]})
    mta = await start_local(tmp_path, sock, milter)
    try:
        answer = await in_thread(submit, sock, LOCAL_MESSAGE)
        (env,) = mta.queued()
        assert answer["id"] == env.id
        assert [r.address for r in env.recipients] == ["bob@example.test"]
        data = mta.message_bytes(env.id)
        assert b"\r\nX-Local-Milter: seen\r\n" in data and b"Subject: local\r\n" in data
        assert data.endswith(b"\r\n\r\nnew body\r\n") and b"hello" not in data
        assert b"Message-ID:" in data  # completed before the milter saw it
        macros = macros_sent(milter)
        assert macros[b"C"]["{client_addr}"] == "127.0.0.1"
        assert (b"H", b"localhost\0") in milter.commands
        assert macros[b"M"]["{mail_addr}"] == "alice@example.test"
        assert macros[b"R"]["{rcpt_addr}"] == "alice@example.test"
        headers = [d for c, d in milter.commands if c == b"L"]
        assert b"Subject\0local\0" in headers
        assert milter.body == b"hello\r\n"
        await wait_for(lambda: b"Q" in milter.names())
        # An SMTP session on the mx listener: no milter for it ([milters] smtpd is empty).
        ((mail, rcpt, data_reply),) = await in_thread(dialog, mta.port())
        assert data_reply[0] == 250 and milter.connections == 1
    finally:
        await mta.stop()


@pytest_twisted.ensureDeferred
async def test_local_milter_refusal_quarantine_and_fault(tmp_path, scripted, control_dir):
    """The milter's refusal refuses the submission (sendmail's ``data`` error with the
    milter's reply, nothing queued); its quarantine holds the message; a dead milter
    with the default action tempfail is a temporary refusal, never a lost message."""
    sock = control_dir / "control.sock"

    def eom(data):
        return [M.replycode("550 5.7.1 no local spam")] if b"spam" in milter.body else [
            M.quarantine("looks odd"), M.CONTINUE]

    milter = scripted({b"E": eom})
    mta = await start_local(tmp_path, sock, milter)
    try:
        refused = await in_thread(submit, sock, LOCAL_MESSAGE.replace(b"hello", b"spam"))
        assert refused.code == "data" and "550 5.7.1 no local spam" in str(refused)
        assert mta.queued() == []
        milter.body = b""
        answer = await in_thread(submit, sock, LOCAL_MESSAGE)
        (env,) = mta.queued()
        assert answer["id"] == env.id and env.hold == "looks odd"
        milter.stop()
        failed = await in_thread(submit, sock, LOCAL_MESSAGE)
        assert failed.code == "temporary" and "451 4.7.1" in str(failed)
        assert len(mta.queued()) == 1
    finally:
        await mta.stop()
