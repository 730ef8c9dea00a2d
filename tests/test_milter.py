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
        out.append(replies)
    if quit:
        c.cmd("QUIT")
    c.close()
    return out


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
    finally:
        await mta.stop()
    assert milter.names()[-1] == b"Q"  # SMFIC_QUIT at the session's end
