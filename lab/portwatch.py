#!/usr/bin/env python3
"""The port watcher: an observer outside the fault model that tells, from the network, when
each database host's PostgreSQL port takes connections and when it refuses them -- whatever
the agents say. It runs on a lab host that faults never cut (the embedded lab's `watch`), tries
a TCP connection to every --target every --interval seconds, and writes one JSON line per
change: {"t": wall clock, "node": host, "event": "port_open" | "port_closed", "why": …}.
A fenced port answers with a reset; a stopped PostgreSQL refuses; either way no client can use
it. An attempt that gets no answer at all (the lab's random loss dropped a packet) says nothing
about the port: the state stays as it was. Standalone (standard library only); stops on
SIGTERM."""
import argparse
import json
import signal
import socket
import sys
import time


def port_state(address, port, timeout):
    """port_open, port_closed (refused or reset: an answer), or None (no answer in time)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "port_open", None
    except (ConnectionRefusedError, ConnectionResetError) as exc:
        return "port_closed", type(exc).__name__
    except OSError:
        return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", action="append", required=True, help="host=address:port")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=0.2)
    args = p.parse_args(argv)
    targets = []
    for spec in args.target:
        host, _, where = spec.partition("=")
        address, _, port = where.rpartition(":")
        targets.append((host, address, int(port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    last = {}
    with open(args.out, "a", encoding="utf-8") as out:
        while True:
            began = time.monotonic()
            for host, address, port in targets:
                at = time.time()
                state, why = port_state(address, port, args.timeout)
                if state is not None and last.get(host) != state:
                    last[host] = state
                    out.write(json.dumps({"t": at, "node": host, "event": state, "why": why})
                              + "\n")
                    out.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))


if __name__ == "__main__":
    main()
