"""The embedded lab: one network namespace per host, joined by a bridge that lives in a
namespace of its own. The root namespace has no address in the lab subnet, and an
`unreachable` route for it, so that nothing in the root namespace can reach a lab address."""
import configparser
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.backend import AGENT_HOSTS, CLIENT, DB_HOSTS, HOSTS, REPO, Backend, LabError, check_host

SUBNET = "10.89.0.0/24"
ADDRESSES = {"pg1": "10.89.0.11", "pg2": "10.89.0.12", "arb": "10.89.0.13",
             "client": "10.89.0.20"}
SWITCH = "bobry-switch"
# The port watcher's host: on the lab network, but outside the fault model (never cut), so it
# sees from the network when each database port opens and closes (lab/portwatch.py).
WATCH, WATCH_ADDRESS = "watch", "10.89.0.30"
DEFAULT_DIR = "/var/tmp/bobry-lab"
TIMING_ENV = "BOBRY_LAB_TIMING"  # [timing] overrides for a sweep: key=value,key=value


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class NetnsBackend(Backend):
    name = "netns"
    addresses = ADDRESSES

    def __init__(self, lab_dir=None, strict_sync=False):
        self.strict_sync = strict_sync  # written into the lab's agent.ini by the first up
        self.lab_dir = Path(lab_dir or os.environ.get("BOBRY_LAB_DIR", DEFAULT_DIR))
        self.config_file = self.lab_dir / "agent.ini"
        self.pid_dir = self.lab_dir / "pids"
        self.client_pgpass = self.lab_dir / "client.pgpass"

    @staticmethod
    def ns(host):
        return f"bobry-{host}"

    # -- commands on hosts ---------------------------------------------------------------
    def run(self, host, argv, timeout=60, input=None):
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], input=input,
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, host, argv, log_path):
        """A long-running process on a host (load, probe) in a process group of its own."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return LocalProcessGroup(proc)

    def interactive(self, host, argv):
        return subprocess.call(["ip", "netns", "exec", self.ns(host), *argv])

    client_python = sys.executable  # the hosts share this machine's filesystem and venv

    def work_dir(self, name):
        path = self.lab_dir / "experiments" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read_file(self, host, path):  # one filesystem for every host: no need to go there
        try:
            return Path(path).read_text()
        except FileNotFoundError:
            return ""

    def remote_path(self, local_path):
        return str(local_path)

    def agent_argv(self, host, *args):
        return [sys.executable, str(REPO / "agent.py"), "--config", str(self.config_file),
                "--node", host, *args]

    # -- agents --------------------------------------------------------------------------
    def _pid_file(self, host):
        return self.pid_dir / f"{host}.agent.pid"

    def agent_pid(self, host):
        try:
            pid = int(self._pid_file(host).read_text())
        except (OSError, ValueError):
            return None
        try:  # the PID is ours only while it still runs our agent for this host
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if b"agent.py" in b" ".join(cmdline) and host.encode() in cmdline else None

    def start_agent(self, host):
        check_host(host, AGENT_HOSTS)
        if self.agent_pid(host):
            return self.agent_pid(host)
        log_dir = self.lab_dir / "hosts" / host / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        pid = self.spawn(host, self.agent_argv(host), log_dir / "agent.log").proc.pid
        self._pid_file(host).write_text(str(pid))
        return pid

    def signal_agent(self, host, signame):
        check_host(host, AGENT_HOSTS)
        pid = self.agent_pid(host)
        if pid is None:
            raise LabError(f"the agent on {host} is not running")
        sig = getattr(signal, f"SIG{signame.upper()}")
        os.kill(pid, sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                _reap(pid)  # an agent this process started is a zombie until reaped
                if not _alive(pid):
                    break
                time.sleep(0.02)
        return pid

    # -- the lab's life cycle --------------------------------------------------------------
    def exists(self):
        names = _ip("netns", "list").stdout
        return any(line.split()[0] == self.ns("pg1") for line in names.splitlines() if line)

    def up(self, progress=print):
        if os.geteuid() != 0:
            raise LabError("the embedded lab needs root (network namespaces, iptables)")
        for tool in ("iptables", "ip", "runuser", "nft"):
            if not shutil.which(tool):
                raise LabError(f"{tool} is not installed (see README: provision/local.sh setup)")
        self._network()
        self._files()
        for host in AGENT_HOSTS:
            self.start_agent(host)
        self._start_portwatch()
        progress(f"lab up in {self.lab_dir}: agents on {', '.join(AGENT_HOSTS)}")

    def portwatch_log(self):
        return WATCH, str(self.lab_dir / "portwatch.jsonl")

    def start_proxy(self, progress=print):
        """Debian's haproxy on the client host (provision/haproxy.cfg with the lab's
        addresses), in the foreground of a process group of its own; `down` stops it with
        every other process of the lab's namespaces. Returns when its port takes connections."""
        if not shutil.which("haproxy"):
            raise LabError("haproxy is not installed (apt-get install haproxy)")
        pid_file = self.pid_dir / "haproxy.pid"
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            return int(pid_file.read_text())
        config = self.lab_dir / "haproxy.cfg"
        config.write_text(self.proxy_config())
        proc = self.spawn(CLIENT, ["haproxy", "-db", "-f", str(config)],
                          self.lab_dir / "haproxy.log").proc
        pid_file.write_text(str(proc.pid))
        probe = ("import socket,sys,time\nend=time.monotonic()+10\nwhile True:\n try:\n"
                 f"  socket.create_connection(('{ADDRESSES[CLIENT]}',{self.PROXY_PORT}),1)"
                 ".close(); sys.exit(0)\n except OSError:\n  if time.monotonic()>end: "
                 "sys.exit(1)\n  time.sleep(0.1)\n")
        if self.run(CLIENT, [sys.executable, "-c", probe], timeout=20).returncode != 0:
            raise LabError(f"haproxy did not start: see {self.lab_dir / 'haproxy.log'}")
        progress(f"haproxy on client {ADDRESSES[CLIENT]}:{self.PROXY_PORT} (checks GET /primary "
                 "every 200 ms)")
        return proc.pid

    def _start_portwatch(self):
        pid_file = self.pid_dir / "portwatch.pid"
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            return
        targets = [f"{h}={ADDRESSES[h]}:{self.config(h).me.pg_port}" for h in DB_HOSTS]
        argv = [sys.executable, str(REPO / "lab" / "portwatch.py"), "--out",
                self.portwatch_log()[1]] + [a for t in targets for a in ("--target", t)]
        with open(self.lab_dir / "portwatch.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(WATCH), *argv], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        pid_file.write_text(str(proc.pid))

    def _network(self):
        existing = _ip("netns", "list").stdout.split()
        for ns in [SWITCH] + [self.ns(h) for h in HOSTS + (WATCH,)]:
            if ns not in existing:
                _ip("netns", "add", ns)
        _ip("-n", SWITCH, "link", "add", "br0", "type", "bridge", check=False)
        _ip("-n", SWITCH, "link", "set", "br0", "up")
        for host, address in {**ADDRESSES, WATCH: WATCH_ADDRESS}.items():
            ns = self.ns(host)
            if _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0:
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host,
                    "netns", SWITCH)
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", SWITCH, "link", "set", host, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            if host != WATCH:
                self.install_fault_chains(host)
        # the guard: from the root namespace the lab subnet is unreachable, never routed out
        if SUBNET not in _ip("route", "show", "type", "unreachable").stdout:
            _ip("route", "add", "unreachable", SUBNET)

    def _files(self):
        self.lab_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.pid_dir.mkdir(exist_ok=True)
        secrets_dir = self.lab_dir / "secrets"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        for name in ("replication.password", "app.password", "agent.key"):
            path = secrets_dir / name
            if not path.exists():
                path.write_text(secrets.token_hex(24) + "\n")
                path.chmod(0o600)
        app_password = (secrets_dir / "app.password").read_text().strip()
        self.client_pgpass.write_text(f"*:*:*:app:{app_password}\n")
        self.client_pgpass.chmod(0o600)
        for host in HOSTS:
            (self.lab_dir / "hosts" / host).mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.config_file.exists():
            self.config_file.write_text(self.render_config(secrets_dir))

    def render_config(self, secrets_dir):
        """The repository's agent.ini with this lab's addresses and directories."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(REPO / "agent.ini")
        for host in AGENT_HOSTS:
            parser[f"node {host}"]["address"] = ADDRESSES[host]
        cluster = parser["cluster"]
        cluster["client_addresses"] = f"{ADDRESSES['client']}/32"
        cluster["strict_sync"] = "true" if self.strict_sync else "false"
        for key, name in (("replication_password_file", "replication.password"),
                          ("app_password_file", "app.password"),
                          ("agent_key_file", "agent.key")):
            cluster[key] = str(secrets_dir / name)
        parser["postgres"]["bin_dir"] = installed_pg_bin()
        # a timing sweep's candidate, e.g. "fence_timeout=0.7,failover_timeout=1.2": the agents
        # check it (check_timing) and refuse to start on a set that breaks the inequality
        for pair in filter(None, os.environ.get(TIMING_ENV, "").split(",")):
            key, _, value = pair.partition("=")
            if key.strip() not in parser["timing"]:
                raise LabError(f"{TIMING_ENV}: no key {key.strip()!r} in [timing] of agent.ini")
            parser["timing"][key.strip()] = value.strip()
        host_dir = self.lab_dir / "hosts" / "{node}"
        parser["postgres"]["data_dir"] = str(host_dir / "pgdata" / "data")
        parser["postgres"]["run_dir"] = str(host_dir / "run")
        parser["agent"]["state_dir"] = str(host_dir / "state")
        parser["agent"]["log_dir"] = str(host_dir / "log")
        from io import StringIO
        out = StringIO()
        out.write(f"# generated by `python -m lab up` from {REPO / 'agent.ini'}; see the "
                  "comments there\n")
        parser.write(out)
        return out.getvalue()

    def down(self):
        """Stop what `up` and the experiments started, remove namespaces, route and files.
        Safe to run twice or after a crash: each step looks at what is there."""
        for host in AGENT_HOSTS:
            pid = self.agent_pid(host)
            if pid:
                os.kill(pid, signal.SIGTERM)
        if self.config_file.exists():
            for host in DB_HOSTS:
                try:
                    if (Path(self.config(host).data_dir) / "postmaster.pid").exists():
                        self.pg_ctl(host, "stop", "-m", "immediate", "-t", "20")
                except Exception as exc:  # noqa: BLE001 -- down must go on whatever happened
                    print(f"down: stopping PostgreSQL on {host}: {exc}", file=sys.stderr)
        existing = _ip("netns", "list").stdout.split()
        for ns in [self.ns(h) for h in HOSTS + (WATCH,)] + [SWITCH]:
            if ns in existing:
                self._stop_processes_in(ns)
                _ip("netns", "del", ns, check=False)
        if SUBNET in _ip("route", "show", "type", "unreachable").stdout:
            _ip("route", "del", "unreachable", SUBNET, check=False)
        if self.lab_dir.exists():
            shutil.rmtree(self.lab_dir)

    @staticmethod
    def _stop_processes_in(ns):
        """Every process in a lab namespace was started by the lab: stop them by PID."""
        def pids():
            out = _ip("netns", "pids", ns, check=False).stdout
            return [int(p) for p in out.split()]
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in pids():
                _reap(pid)
            if not pids():
                return


def installed_pg_bin():
    """The newest PostgreSQL (13 or later) that Debian/Ubuntu installed."""
    root = Path("/usr/lib/postgresql")
    versions = [int(d.name) for d in root.glob("*")
                if d.name.isdigit() and int(d.name) >= 13 and (d / "bin" / "initdb").exists()]
    if not versions:
        raise LabError(f"no PostgreSQL 13+ under {root} (run provision/local.sh setup)")
    return str(root / str(max(versions)) / "bin")


class LocalProcessGroup:
    """A spawned process and its children, stopped together: TERM, then KILL."""

    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue


def _reap(pid):
    """Collect a child of ours that has exited, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
