"""Client-side load for experiments, run on the client host: the write probe, pgbench and a
bulk load. Each is a long-running process that the backend spawns there and stops as a whole
group."""
import json
import re
import shlex

from lab.backend import CLIENT, REPO

PROGRESS = re.compile(r"progress: (\d+(?:\.\d+)?) s, (\d+(?:\.\d+)?) tps")
RESTART_MARK = "bobry: pgbench exited, restarting"


# How long the write probe waits for a commit before it drops the connection and walks the
# hosts again: a client's own choice. A commit takes milliseconds here, and under the jitter
# experiment's loss a few retransmissions (0.2 s, then 0.4 s). Shorter means the walk past a
# silent old primary (1 s: the DSN's tcp_user_timeout ends the connection attempt at its first
# SYN retransmission) starts sooner; 0.8 s brings the walk to the new primary at about 1.85 s
# after the cut, after the promotion (about 1.7 s with the default timings).
PROBE_DEADLINE_S = 0.8


class Probe:
    """lab/probe.py on the client host: a numbered insert every 100 ms, each ack recorded."""

    def __init__(self, backend, out_path, deadline=PROBE_DEADLINE_S, interval=0.1, dsn=None,
                 id_base=None,
                 seconds=None):
        """dsn: another connection string (one host, say); id_base: a range of ids of this
        probe's own, [id_base, id_base + 10**12), apart from the main probe's positive ids;
        seconds: when it stops by itself (probe.py's default: 600)."""
        self.backend, self.out_path, self.id_base = backend, out_path, id_base
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}", backend.client_python,
                     backend.remote_path(REPO / "lab" / "probe.py"), "--dsn",
                     dsn or backend.dsn(),
                     "--out", str(out_path), "--interval", str(interval),
                     "--deadline", str(deadline)]
        if seconds is not None:
            self.argv += ["--seconds", str(seconds)]
        self.process = None

    def prepare(self):
        """The table, and ids that continue where an earlier run stopped."""
        last = ("select coalesce(max(id), 0) + 1 from bobry_probe" if self.id_base is None
                else f"select coalesce(max(id), {self.id_base - 1}) + 1 from bobry_probe where "
                     f"id >= {self.id_base} and id < {self.id_base + 10**12}")
        result = self.backend.client_sql("create table if not exists bobry_probe "
                                         "(id bigint primary key, at timestamptz default now());"
                                         + last)
        if result.returncode != 0:
            raise RuntimeError(f"cannot create the probe table: {result.stderr.strip()}")
        self.argv += ["--first-id", result.stdout.split()[-1]]

    def start(self):
        self.process = self.backend.spawn(CLIENT, self.argv, f"{self.out_path}.log")

    def stop(self):
        if self.process:
            self.process.stop()

    def records(self):
        text = self.backend.read_file(CLIENT, self.out_path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# A pgbench session that the server finds idle inside a transaction for this long is ended,
# its row locks with it. The DSN's tcp_user_timeout (1 s) can end a connection on the client's
# side under the jitter experiment's loss while the server waits for the transaction's next
# statement: that backend would keep the single branch row locked until the server's TCP
# keepalive noticed (two hours by default), and every later pgbench transaction would wait
# on it (most likely what a soak on 6d9be3a showed: 0 tps for its last 218 s, the write probe
# unaffected).
PGBENCH_IDLE_IN_TRANSACTION = "5s"


class Pgbench:
    """pgbench at a fixed rate (it must not starve the agents of CPU on a 2-core machine), or
    as fast as it goes (rate 0: how the failover grows with the load).
    pgbench (15) aborts a client whose connection dies and exits when all have: a shell loop
    on the client starts it again, as an application's reconnect would, so the load moves to
    the new primary."""

    def __init__(self, backend, log_path, rate=100, clients=2):
        self.backend, self.log_path, self.rate = backend, log_path, rate
        throttle = ["-R", str(rate)] if rate else []
        pgbench = shlex.join(["pgbench", "-n", "-c", str(clients), "-j", "1", *throttle,
                              "-T", "3600", "-P", "1", "--progress-timestamp", backend.dsn()])
        loop = f"while :; do {pgbench}; echo '{RESTART_MARK}'; sleep 0.2; done"
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}",
                     "PGOPTIONS=-c idle_in_transaction_session_timeout="
                     f"{PGBENCH_IDLE_IN_TRANSACTION}", "sh", "-c", loop]
        self.process = None

    def prepare(self):
        result = self.backend.run(CLIENT, ["env", f"PGPASSFILE={self.backend.client_pgpass}",
                                           "pgbench", "-i", "-s", "1", "-q",
                                           self.backend.dsn()], timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {result.stderr.strip()[-300:]}")

    def start(self):
        self.process = self.backend.spawn(CLIENT, self.argv, self.log_path)

    def stop(self):
        if self.process:
            self.process.stop()

    def restarts(self):
        return self.backend.read_file(CLIENT, self.log_path).count(RESTART_MARK)

    def tps(self):
        """[(wall-clock second, tps)] from every run's progress lines."""
        text = self.backend.read_file(CLIENT, self.log_path)
        return [(float(m.group(1)), float(m.group(2))) for m in PROGRESS.finditer(text)]


class Bulk:
    """A bulk load on the primary: one transaction that inserts about `mb` MiB (rows of 1 kB,
    so about as much WAL), from the client host, straight to the primary's address. Cut
    off, the primary's backend goes on writing WAL that only it has: the divergence that
    pg_rewind undoes when it rejoins."""

    ROW_BYTES = 1100  # 1000 bytes of text, the tuple's header and the WAL record's

    def __init__(self, backend, primary, mb, log_path):
        self.backend, self.primary, self.mb, self.log_path = backend, primary, mb, log_path
        port = backend.config(primary).me.pg_port
        rows = mb * 1024 * 1024 // self.ROW_BYTES
        sql = ("drop table if exists bobry_bulk; create table bobry_bulk (i int, pad text); "
               "insert into bobry_bulk select g, repeat('x', 1000) "
               f"from generate_series(1, {rows}) g")
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}", "psql", "-X", "-q",
                     backend.dsn(host=backend.addresses[primary], port=port), "-c", sql]
        self.process, self.start_lsn = None, None

    def wal_bytes(self, host):
        """The host's WAL position in bytes (its own psql, over the local socket)."""
        return int(self.backend.sql(host, "select pg_current_wal_lsn() - '0/0'")[0][0])

    def start(self):
        self.start_lsn = self.wal_bytes(self.primary)
        self.process = self.backend.spawn(CLIENT, self.argv, self.log_path)

    def written_mb(self, host=None):
        return round((self.wal_bytes(host or self.primary) - self.start_lsn) / 2**20, 1)

    def stop(self):
        if self.process:
            self.process.stop()
