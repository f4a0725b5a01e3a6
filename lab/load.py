"""Client-side load for experiments, run on the client host: the write probe and pgbench.
Both are long-running processes that the backend spawns there and stops as a whole group."""
import json
import re
import shlex

from lab.backend import CLIENT, REPO

PROGRESS = re.compile(r"progress: (\d+(?:\.\d+)?) s, (\d+(?:\.\d+)?) tps")
RESTART_MARK = "bobry: pgbench exited, restarting"


class Probe:
    """lab/probe.py on the client host: a numbered insert every 100 ms, each ack recorded."""

    def __init__(self, backend, out_path, deadline=1.0, interval=0.1, dsn=None, id_base=None,
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


class Pgbench:
    """pgbench at a fixed rate (it must not starve the agents of CPU on a 2-core machine).
    pgbench (15) aborts a client whose connection dies and exits when all have: a shell loop
    on the client starts it again, as an application's reconnect would, so the load moves to
    the new primary."""

    def __init__(self, backend, log_path, rate=100, clients=2):
        self.backend, self.log_path, self.rate = backend, log_path, rate
        pgbench = shlex.join(["pgbench", "-n", "-c", str(clients), "-j", "1", "-R", str(rate),
                              "-T", "3600", "-P", "1", "--progress-timestamp", backend.dsn()])
        loop = f"while :; do {pgbench}; echo '{RESTART_MARK}'; sleep 0.2; done"
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}", "sh", "-c", loop]
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
