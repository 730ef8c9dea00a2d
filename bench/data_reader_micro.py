#!/usr/bin/env python3
"""Time the DATA reader alone on one message (no sockets, no disk).

  python3 bench/data_reader_micro.py [--size 102400] [--chunk 65536] [--repeat 200]

Prints the best of 5 rounds, in milliseconds per message: how long
mta.mail.reader.DataReader takes to find the end, check line endings and
lengths, and unstuff a message of --size octets fed in --chunk pieces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mta.mail.reader import DataReader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=200)
    a = ap.parse_args()
    line = b"X" * 78 + b"\r\n"
    message = b"Subject: x\r\nFrom: a@b.test\r\n\r\n" + line * (a.size // len(line)) + b".\r\n"
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(a.repeat):
            reader = DataReader(lambda block: None, lambda headers: headers, 10**9)
            for i in range(0, len(message), a.chunk):
                reader.feed(message[i:i + a.chunk])
        best = min(best, (time.perf_counter() - start) / a.repeat)
    print(f"DataReader: {best * 1000:.3f} ms per {len(message)}-octet message "
          f"({a.chunk}-octet chunks, best of 5 x {a.repeat})")


if __name__ == "__main__":
    main()
