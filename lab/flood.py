#!/usr/bin/env python3
"""Abuse of an agent's port, for the lab: from the host it runs on, for --seconds, keep up to
--connections connections open to --target (half of them silent, the others sending garbage,
a 10 MB line, or deeply nested JSON), reopening them as the agent closes them. Prints one JSON
line of counts at the end. Standalone (standard library only); stops by itself."""
import argparse
import json
import random
import resource
import socket
import time

PAYLOADS = [b"", b"garbage\n", b"x" * (10 * 1024 * 1024) + b"\n",
            b"0" * 64 + b" " + b"[" * 100000 + b"\n", b'{"v":2}\n']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="address:port")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    address, _, port = args.target.rpartition(":")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rng = random.Random(args.seed)
    counts = {"opened": 0, "failed": 0, "sent": 0}
    held = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        while len(held) < args.connections and time.monotonic() < end:
            try:
                s = socket.create_connection((address, int(port)), timeout=0.5)
            except OSError:
                counts["failed"] += 1
                break
            counts["opened"] += 1
            payload = rng.choice(PAYLOADS)
            if payload:
                try:
                    s.settimeout(0.5)
                    s.sendall(payload[:65536 * 4])
                    counts["sent"] += 1
                except OSError:
                    pass
            held.append(s)
        time.sleep(0.2)
        alive = []
        for s in held:  # drop the ones the agent closed, so they are reopened
            s.setblocking(False)
            try:
                closed = s.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            (s.close() if closed else alive.append(s))
        held = alive
    for s in held:
        s.close()
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
