#!/usr/bin/env python3
"""The write probe: inserts a numbered row every --interval seconds through the clients'
multi-host connection string and records, one JSON line each, every acknowledged id with the
wall-clock time of the acknowledgement, the server that gave it and the server's timeline
(PostgreSQL's count of promotions: a primary's term as the data sees it).

It runs on the client host (standalone: only psycopg2). A write counts as acknowledged only
when COMMIT returned before --deadline: a client-side timeout. It never cancels a query or
sets statement_timeout, because a cancelled wait for the synchronous standby returns success
for a commit that was never replicated. On a timeout it drops the connection and reconnects,
so the load moves to whichever host is now the read-write one."""
import argparse
import json
import select
import signal
import sys
import time

import psycopg2
import psycopg2.extensions as ext

TABLE = "bobry_probe"
_deadline = [0.0]


def _wait_with_deadline(conn):
    """psycopg2 wait callback: the statement must finish by the deadline or the connection
    is abandoned (raising here makes psycopg2 close it, so nothing is cancelled)."""
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        remaining = _deadline[0] - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no acknowledgement before the deadline")
        fd = conn.fileno()
        if state == ext.POLL_READ:
            select.select([fd], [], [], remaining)
        else:
            select.select([], [fd], [], remaining)


def insert(conn, probe_id, deadline):
    _deadline[0] = time.monotonic() + deadline
    ext.set_wait_callback(_wait_with_deadline)
    try:
        cur = conn.cursor()
        cur.execute(f"insert into {TABLE} (id) values (%s) returning host(inet_server_addr()), "
                    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                    (probe_id,))
        return cur.fetchone()
    finally:
        ext.set_wait_callback(None)


def connect(dsn):
    conn = psycopg2.connect(dsn)  # libpq walks the hosts with its connect_timeout
    conn.autocommit = True
    return conn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", required=True, help="JSON lines: acks and failures")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=600, help="stop by itself after")
    parser.add_argument("--first-id", type=int, default=1, help="ids are unique across runs")
    args = parser.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    conn, probe_id = None, args.first_id - 1
    end = time.monotonic() + args.seconds
    with open(args.out, "a", encoding="utf-8") as out:
        while not stop and time.monotonic() < end:
            began = time.monotonic()
            probe_id += 1
            record = {"id": probe_id, "sent": time.time()}
            try:
                if conn is None or conn.closed:
                    conn = connect(args.dsn)
                record["server"], record["tli"] = insert(conn, probe_id, args.deadline)
                record["ack"] = time.time()
            except (psycopg2.Error, TimeoutError, OSError) as exc:
                record["error"] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
                if conn is not None:
                    conn.close()
                conn = None
            out.write(json.dumps(record) + "\n")
            out.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
