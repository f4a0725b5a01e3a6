"""Client-side load for experiments, run on the client host: the write probe and pgbench.

pgbench (15) aborts a client whose connection dies, and exits when all have: the lab starts it
again, so the load moves to the new primary as a real application's reconnect would."""
import json
import re
import signal
import threading
import time

from lab.backend import CLIENT, REPO

PROGRESS = re.compile(r"progress: (\d+(?:\.\d+)?) s, (\d+(?:\.\d+)?) tps")


class Probe:
    def __init__(self, backend, out_path, deadline=1.0, interval=0.1):
        self.backend, self.out_path = backend, out_path
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}", backend.client_python,
                     backend.remote_path(REPO / "lab" / "probe.py"), "--dsn", backend.dsn(),
                     "--out", str(out_path), "--interval", str(interval),
                     "--deadline", str(deadline)]
        self.proc = None

    def prepare(self):
        result = self.backend.client_sql("create table if not exists bobry_probe "
                                         "(id bigint primary key, at timestamptz default now())")
        if result.returncode != 0:
            raise RuntimeError(f"cannot create the probe table: {result.stderr.strip()}")

    def start(self):
        self.proc = self.backend.spawn(CLIENT, self.argv, f"{self.out_path}.log")

    def stop(self):
        _stop(self.proc)

    def records(self):
        text = self.backend.read_file(CLIENT, self.out_path)
        return [json.loads(line) for line in text.splitlines() if line.strip()]


class Pgbench:
    """pgbench at a fixed rate (it must not starve the agents of CPU on a 2-core machine),
    restarted whenever it exits, until stopped."""

    def __init__(self, backend, log_path, rate=100, clients=2):
        self.backend, self.log_path = backend, log_path
        self.argv = ["env", f"PGPASSFILE={backend.client_pgpass}", "pgbench", "-n", "-c",
                     str(clients), "-j", "1", "-R", str(rate), "-T", "3600", "-P", "1",
                     "--progress-timestamp", backend.dsn()]
        self._stopping = threading.Event()
        self._thread = None
        self._proc = None
        self.restarts = 0

    def prepare(self):
        result = self.backend.run(CLIENT, ["env", f"PGPASSFILE={self.backend.client_pgpass}",
                                           "pgbench", "-i", "-s", "1", "-q",
                                           self.backend.dsn()], timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {result.stderr.strip()[-300:]}")

    def _loop(self):
        while not self._stopping.is_set():
            self._proc = self.backend.spawn(CLIENT, self.argv, self.log_path)
            while self._proc.poll() is None and not self._stopping.is_set():
                time.sleep(0.1)
            if not self._stopping.is_set():
                self.restarts += 1
                time.sleep(0.2)

    def start(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()
        if self._thread:
            self._thread.join(timeout=5)
        _stop(self._proc)

    def tps(self):
        """[(wall-clock second, tps)] from every run's progress lines."""
        text = self.backend.read_file(CLIENT, self.log_path)
        return [(float(m.group(1)), float(m.group(2))) for m in PROGRESS.finditer(text)]


def _stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except Exception:  # noqa: BLE001 -- still running: the last resort
        proc.kill()
        proc.wait(timeout=5)
