"""rspamd as a milter (issue 17): our MTA against Postfix with the same rspamd as its
smtpd_milters, in one run of bench/run.sh (the ratio), and what one milter round
trip costs.

    sudo .venv/bin/python bench/milter_bench.py [--messages 1000] [--sizes 4096] [--rounds 1]

One rspamd (tests/milter.py's start_rspamd: the Debian package's configuration,
loopback only, no Redis) serves both MTAs.  Our MTA gets bench/mta-bench.toml
plus ``[milters.rspamd]`` with ``smtpd = ["rspamd"]``; Postfix gets
``smtpd_milters = inet:127.0.0.1:PORT`` (milter_default_action = tempfail, as
ours).  Then the round trip: over one milter connection to the same rspamd, N
SMFIC_RCPT commands one after the other (each answered SMFIR_CONTINUE), timed
with our own client (mta.policy.milter.protocol): the mean wall time of one
request and its answer.  Prints run.sh's summary and the
round-trip line; writes both under OUT.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))


def round_trips(socket: str, count: int, body: bytes) -> dict:
    """Mean seconds of one milter exchange over one connection, with our own client:
    a whole message (MAIL .. SMFIC_BODYEOB; a milter that asks for no reply to
    the other steps, as rspamd does, answers only the end of message) and,
    where the milter answers it, one SMFIC_RCPT."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.protocol import Factory

    from mta.policy.milter import codec
    from mta.policy.milter.protocol import MilterProtocol, client_endpoint

    result: dict = {}
    head, _, rest = body.partition(b"\r\n\r\n")
    headers = [line.split(b": ", 1) for line in head.split(b"\r\n")]

    async def run() -> None:
        ep = client_endpoint(reactor, socket, 10)
        proto = await ep.connect(Factory.forProtocol(lambda: MilterProtocol(reactor)))
        (neg,) = await proto.request(codec.optneg(), 10, optneg=True)
        n = codec.parse_optneg(neg.data)
        result["protocol_flags"] = hex(n.protocol)

        async def step(data: bytes, no_reply: int, eom: bool = False) -> None:
            d = proto.request(data, 30, answer=not n.protocol & no_reply, eom=eom)
            if d is not None:
                await d

        await step(codec.connect("localhost", "127.0.0.1", 1234), codec.P_NR_CONN)
        await step(codec.packet(codec.HELO, codec.strings("bench.test")), codec.P_NR_HELO)

        async def message() -> None:
            await step(codec.packet(codec.MAIL, codec.strings("<a@bench.test>")), codec.P_NR_MAIL)
            await step(codec.packet(codec.RCPT, codec.strings("<b@bench.test>")), codec.P_NR_RCPT)
            await step(codec.packet(codec.DATA), codec.P_NR_DATA)
            for name, value in headers:
                await step(codec.header(name, value), codec.P_NR_HDR)
            await step(codec.packet(codec.EOH), codec.P_NR_EOH)
            await step(codec.packet(codec.BODY, rest), codec.P_NR_BODY)
            await step(codec.packet(codec.BODYEOB), 0, eom=True)

        for _ in range(10):  # warm-up
            await message()
        t0 = time.perf_counter()
        for _ in range(count):
            await message()
        result["message_us"] = (time.perf_counter() - t0) / count * 1e6
        if not n.protocol & codec.P_NR_RCPT:
            await step(codec.packet(codec.MAIL, codec.strings("<a@bench.test>")), codec.P_NR_MAIL)
            rcpt = codec.packet(codec.RCPT, codec.strings("<b@bench.test>"))
            t0 = time.perf_counter()
            for _ in range(count * 10):
                await step(rcpt, 0)
            result["rcpt_us"] = (time.perf_counter() - t0) / (count * 10) * 1e6
        proto.close()

    def done(_: object) -> None:
        reactor.stop()

    def failed(f) -> None:
        result["error"] = str(f.value)
        reactor.stop()

    d: Deferred = ensureDeferred(run())
    d.addCallbacks(done, failed)
    reactor.run()
    return result


def round_trip_report(rspamd_socket: str, count: int) -> str:
    """The round trips to rspamd and to a milter that answers at once (the scripted
    one of the tests: the cost of the exchange itself, ours and the loopback's)."""
    import subprocess as sp

    body = (b"From: a@bench.test\r\nTo: b@bench.test\r\nSubject: bench\r\n\r\n"
            + b"x" * 76 + b"\r\n") * 1
    body += (b"y" * 76 + b"\r\n") * 50  # about 4 KB
    code = ("import json, sys; sys.path.insert(0, %r); from bench.milter_bench import round_trips; "
            "print(json.dumps(round_trips(sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]))))"
            % str(ROOT))

    def measure(sock: str) -> dict:
        import json

        run = sp.run([sys.executable, "-c", code, sock, str(count), body.hex()],
                     capture_output=True, text=True, check=True)
        return json.loads(run.stdout)

    from tests.milter import ScriptedMilter

    trivial = ScriptedMilter()
    try:
        fast = measure(trivial.socket)
    finally:
        trivial.stop()
    spam = measure(rspamd_socket)
    return (f"milter round trips, our client, one connection, mean of {count} messages: "
            f"rspamd (flags {spam.get('protocol_flags')}: answers only the end of message) "
            f"{spam.get('message_us', float('nan')) / 1000:.2f} ms per 4 KB message; "
            f"a milter answering every step at once (tests/milter.py, Python): "
            f"{fast.get('message_us', float('nan')) / 1000:.2f} ms per message "
            f"(9 + header count round trips), {fast.get('rcpt_us', float('nan')):.0f} us per "
            f"SMFIC_RCPT round trip {spam.get('error', '')} {fast.get('error', '')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sizes", default="4096")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--round-trips", type=int, default=500)
    ap.add_argument("--round-trips-only", action="store_true", help="skip run.sh")
    ap.add_argument("--out", default=f"/tmp/bench-milter-{time.strftime('%Y%m%d-%H%M%S')}")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from tests.milter import start_rspamd

    rspamd = start_rspamd(out / "rspamd")
    try:
        time.sleep(1)
        if a.round_trips_only:
            print(round_trip_report(rspamd.socket, a.round_trips))
            return 0
        config = out / "mta-bench-milter.toml"
        config.write_text((BENCH / "mta-bench.toml").read_text() + f"""
# bench/milter_bench.py: rspamd as the milter of every listener.
[milters]
smtpd = ["rspamd"]

[milters.rspamd]
socket = "{rspamd.socket}"
""")
        env = dict(os.environ, CONFIG=str(config), MTAS="postfix ours", FLOOR="0",
                   SIZES=a.sizes, MESSAGES=str(a.messages), SESSIONS=str(a.sessions),
                   ROUNDS=str(a.rounds), CHECK_FSYNC="0", PROFILE="0", IDLE_SESSIONS="0",
                   OUT=str(out / "run"),
                   # Ports of their own: other benchmarks may run on the machine.
                   LISTEN=os.environ.get("LISTEN", "127.0.0.1:32625"),
                   SINK=os.environ.get("SINK", "127.0.0.1:32626"),
                   BENCH_POSTFIX_MAIN_CF_EXTRA=(
                       f"smtpd_milters = {rspamd.socket}\nmilter_protocol = 6\n"
                       "milter_default_action = tempfail\n"))
        subprocess.run(["bash", str(BENCH / "run.sh")], env=env, check=True)
        line = round_trip_report(rspamd.socket, a.round_trips)
        print(line)
        (out / "round_trip.txt").write_text(line + "\n")
    finally:
        rspamd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
