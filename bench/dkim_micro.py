#!/usr/bin/env python3
"""DKIM signing and verifying time per message: dkimpy's own code against ours.

  python3 bench/dkim_micro.py [--messages 300] [--size 4096] [--rounds 3]

For an RSA-2048 and an Ed25519 key, signs --messages messages of --size
octets (relaxed/relaxed, the fields mta.policy.dkim signs) with dkimpy's
``DKIM.sign`` (its RSA is pure Python, its Ed25519 PyNaCl) and with
:class:`mta.policy.dkim.DKIMSigner` (dkimpy's canonicalisation and hashing,
the signature by OpenSSL through ``cryptography``), then verifies them with
dkimpy's ``DKIM.verify`` and with ours (``_check_all``, what
:func:`mta.policy.dkim.verify` runs in its worker thread once the keys are
fetched).  Prints milliseconds of CPU per message (median over --rounds) and
the ratio.  One thread, no network: the figure is the signature's cost alone.
"""

# ruff: noqa: B023  (the closures run within their own loop iteration)
from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from mta.policy import dkim as ours  # noqa: E402

DOMAIN = "bench.test"


def message(size: int, i: int) -> bytes:
    head = (f"From: Alice <alice@{DOMAIN}>\r\nTo: bob@remote.test\r\n"
            f"Subject: message {i}\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{i}@{DOMAIN}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    line = b"x" * 74 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def cpu_ms_per(fn, items) -> float:
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) * 1000 / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    msgs = [message(args.size, i) for i in range(args.messages)]
    tmp = Path(tempfile.mkdtemp(prefix="dkim-micro-"))
    for kind, selector, algorithm in (("rsa", "rsa1", b"rsa-sha256"),
                                      ("ed25519", "ed1", b"ed25519-sha256")):
        path = tmp / f"{selector}.pem"
        record = ours.generate_key(kind, path)
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if kind == "rsa":
            dkimpy_key = path.read_bytes()
        else:
            dkimpy_key = base64.b64encode(key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))
        signer = ours.DKIMSigner({DOMAIN: [(selector, path)]})
        include = ours._fields_to_sign(name for name, _ in dkim.DKIM(msgs[0]).headers)

        def dkimpy_sign(m: bytes) -> bytes:
            return dkim.DKIM(m, linesep=b"\r\n").sign(
                selector.encode(), DOMAIN.encode(), dkimpy_key, signature_algorithm=algorithm,
                canonicalize=(b"relaxed", b"relaxed"), include_headers=include)

        def ours_sign(m: bytes) -> bytes:
            return signer.sign(m, DOMAIN)[0] + b"\r\n"

        name = ours.dns_record_name(selector, DOMAIN)
        signed = [ours_sign(m) + m for m in msgs]

        def dkimpy_verify(m: bytes) -> None:
            assert dkim.DKIM(m).verify(dnsfunc=lambda _n, timeout=5: record.encode())

        def ours_verify(m: bytes) -> None:
            sigs = ours._signatures(m, ours.MAX_SIGNATURES)
            keys = {name: ours._KeyAnswer(records=(record.encode(),))}
            assert ours._check_all(m, sigs, keys, ours.MIN_RSA_BITS)[0].passed

        rows = []
        for label, a, b, items in (("sign", dkimpy_sign, ours_sign, msgs),
                                   ("verify", dkimpy_verify, ours_verify, signed)):
            before = statistics.median(cpu_ms_per(a, items) for _ in range(args.rounds))
            after = statistics.median(cpu_ms_per(b, items) for _ in range(args.rounds))
            rows.append(f"| {algorithm.decode()} | {label} | {before:.3f} | {after:.3f} | "
                        f"{before / after:.1f}x |")
        if kind == "rsa":
            print(f"{args.messages} messages of {args.size} octets, median of {args.rounds} rounds, "
                  "CPU ms per message\n")
            print("| algorithm | | dkimpy | ours (OpenSSL) | speed-up |\n|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
