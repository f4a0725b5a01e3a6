"""The interface every lab backend implements, and what is built on it once for all backends:
fault injection, PostgreSQL control, status."""
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import agent  # noqa: E402  (agent.py is one file at the top of the repository)

DB_HOSTS = ("pg1", "pg2")
AGENT_HOSTS = ("pg1", "pg2", "arb")
CLIENT = "client"
HOSTS = AGENT_HOSTS + (CLIENT,)

# The lab's own iptables chains, apart from the agent's fence chain: healing a fault never
# touches a fence, and the agent's unfencing never heals a fault.
CHAIN_IN, CHAIN_OUT = "bobry-lab-in", "bobry-lab-out"


class LabError(Exception):
    pass


def check_host(host, allowed=HOSTS):
    if host not in allowed:
        raise LabError(f"unknown host {host!r} (hosts: {', '.join(allowed)})")
    return host


class Backend:
    """Subclasses provide addresses, config_file, run(), spawn(), the agent's life cycle, up()
    and down(). Commands are argv lists; a backend decides how they reach the host."""

    name = "?"
    addresses = {}     # host -> address on the lab network
    config_file = None  # the agent.ini the hosts use, as a local path
    lab_dir = None      # where reports and client-side files go
    client_pgpass = None  # on the client host: the passfile with the application's password

    # -- to implement ----------------------------------------------------------------------
    def run(self, host, argv, timeout=60, input=None):
        raise NotImplementedError

    def spawn(self, host, argv, log_path):
        raise NotImplementedError

    def up(self, progress=print):
        raise NotImplementedError

    def down(self):
        raise NotImplementedError

    def start_agent(self, host):
        raise NotImplementedError

    def signal_agent(self, host, signame):
        raise NotImplementedError

    def agent_argv(self, host, *args):
        raise NotImplementedError

    @staticmethod
    def as_postgres(argv):
        return ["runuser", "-u", "postgres", "--", *argv]

    def work_dir(self, name):
        """A fresh directory on the client host for an experiment's files."""
        raise NotImplementedError

    def read_file(self, host, path):
        """A file's text on a host ("" when it does not exist)."""
        return self.run(host, ["cat", str(path)]).stdout

    def remote_path(self, local_path):
        """Where a file of this repository is on the hosts."""
        raise NotImplementedError

    client_python = "python3"  # on the client host, with psycopg2

    # HAProxy on the client host (`lab up --proxy`): clients then connect to it, and it sends
    # them to the node whose agent answers GET /primary with 200 (provision/haproxy.cfg)
    proxy = False       # dsn() points at HAProxy instead of the multi-host string
    PROXY_PORT = 5000   # the primary's listener in provision/haproxy.cfg

    def start_proxy(self, progress=print):
        raise LabError(f"the {self.name} backend runs no HAProxy (the embedded lab does)")

    def proxy_config(self):
        """provision/haproxy.cfg with this lab's addresses: the nodes', and the client host's
        for the listeners. The health port is each node's http_port."""
        text = (REPO / "provision" / "haproxy.cfg").read_text()
        vagrant = {"pg1": "192.168.56.11", "pg2": "192.168.56.12"}
        for host in DB_HOSTS:
            cfg = self.config(host)
            if cfg.me.http_port is None:
                raise LabError(f"{host} has no http_port in {self.config_file}: HAProxy "
                               "needs the health endpoints")
            text = text.replace(f"{vagrant[host]}:5432", f"{self.addresses[host]}:"
                                                         f"{cfg.me.pg_port}")
            text = text.replace(f"server {host} {self.addresses[host]}:{cfg.me.pg_port} check",
                                f"server {host} {self.addresses[host]}:{cfg.me.pg_port} check "
                                f"port {cfg.me.http_port}")
        return text.replace("bind *:", f"bind {self.addresses[CLIENT]}:")

    # -- shared ----------------------------------------------------------------------------
    def check_ready(self):
        """Raise LabError when the lab cannot be trusted to run what this checkout says."""

    def config(self, host):
        return agent.load_config(str(self.config_file), host)

    def must(self, host, argv, timeout=60, input=None):
        result = self.run(host, argv, timeout=timeout, input=input)
        if result.returncode != 0:
            raise LabError(f"{host}: {shlex.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
        return result.stdout

    def iptables(self, host, *args):
        return self.must(host, ["iptables", "-w", "5", *args])

    def install_fault_chains(self, host):
        """The lab's chains, jumped to first from INPUT and OUTPUT (one command; idempotent)."""
        script = "".join(f"iptables -w 5 -n -L {chain} >/dev/null 2>&1 || "
                         f"iptables -w 5 -N {chain}; "
                         f"iptables -w 5 -C {hook} -j {chain} 2>/dev/null || "
                         f"iptables -w 5 -I {hook} 1 -j {chain}; "
                         for chain, hook in ((CHAIN_IN, "INPUT"), (CHAIN_OUT, "OUTPUT")))
        self.must(host, ["sh", "-ec", script])

    def _link_rules(self, host, peer):
        peer_address = self.addresses[peer]
        return ((CHAIN_IN, "-s", peer_address), (CHAIN_OUT, "-d", peer_address))

    NEW_ONLY = ["-m", "conntrack", "--ctstate", "NEW"]

    def _one_way_rules(self, a, b):
        """Rules that drop new connections from a to b, on both ends; traffic of connections
        already open, and connections from b to a, pass."""
        return {a: [[CHAIN_OUT, "-d", self.addresses[b], *self.NEW_ONLY, "-j", "DROP"]],
                b: [[CHAIN_IN, "-s", self.addresses[a], *self.NEW_ONLY, "-j", "DROP"]]}

    def _add_rules(self, host, rules):
        """Append to the lab's chains on a host those of `rules` that are not there yet, in
        one iptables-restore (atomically), in one command on the host. Returns the host's
        clock right after the rules are in place, read in that same command: a fault's time
        is taken where the fault is applied."""
        checks = "".join(f"iptables -w 5 -C {shlex.join(rule)} 2>/dev/null || printf "
                         f"'%s\\n' {shlex.quote('-A ' + shlex.join(rule))}; " for rule in rules)
        script = (f"{{ echo '*filter'; {checks}echo COMMIT; }} | "
                  "iptables-restore -w 5 --noflush && date +%s.%N")
        return float(self.must(host, ["sh", "-c", script]).split()[-1])

    def _drop_rules(self, host, peers):
        """DROP everything between host and peers, on host's side; the time it holds."""
        return self._add_rules(host, [[chain, flag, address, "-j", "DROP"] for peer in peers
                                      for chain, flag, address in self._link_rules(host, peer)])

    def cut(self, a, b, one_way=False):
        """Drop everything between a and b, in both directions, on both ends (DROP, not
        REJECT: a partition is silence, and connection attempts must wait for their timeouts).
        one_way: drop new connections from a to b and end those a has open to b (b can still
        connect to a).
        Returns the time (a's clock) when a's side was in place."""
        check_host(a), check_host(b)
        if a == b:
            raise LabError("a link joins two different hosts")
        if one_way:
            rules = self._one_way_rules(a, b)
            started = self._add_rules(a, rules[a])
            self._add_rules(b, rules[b])
            self._end_connections(a, b)
            return started
        started = self._drop_rules(a, [b])
        self._drop_rules(b, [a])
        return started

    def _end_connections(self, a, b):
        """End the connections a opened to b's services before a one-way cut (the agents keep
        a heartbeat connection and a probe session open from round to round): a then reaches
        b through no connection, old or new. ss -K closes them on a's side, whose reset
        closes b's (only new connections are dropped); b's connections to a are left. The
        client host serves nothing."""
        if b not in AGENT_HOSTS:
            return
        node = self.config(b).me
        serves = (node.agent_port, node.http_port, node.pg_port if b in DB_HOSTS else None)
        ports = sorted({p for p in serves if p})
        match = " or ".join(f"dport = :{p}" for p in ports).split()
        self.must(a, ["ss", "-K", "-tn", "dst", self.addresses[b], "(", *match, ")"])

    def _uncut(self, a, b):
        rules = {a: [], b: []}
        for host, peer in ((a, b), (b, a)):
            for chain, flag, address in self._link_rules(host, peer):
                rules[host].append([chain, flag, address, "-j", "DROP"])
            for side, one_way in self._one_way_rules(host, peer).items():
                rules[side] += one_way
        for host, host_rules in rules.items():  # one command per host
            self.run(host, ["sh", "-c", "".join(f"while iptables -w 5 -D {shlex.join(rule)} "
                                                "2>/dev/null; do :; done; "
                                                for rule in host_rules) + "true"])

    def isolate(self, host):
        """Cut every link of host. The host's own side goes in at once (one iptables-restore):
        the isolation starts when this returns, or earlier; the peers' sides follow."""
        check_host(host)
        others = [h for h in HOSTS if h != host]
        started = self._drop_rules(host, others)  # the isolated host's clock
        for other in others:
            self._drop_rules(other, [host])
        return started

    def heal(self, a=None, b=None):
        """No host: every fault on every host. One host: all of its links. Two: that link."""
        if a is None:
            for host in HOSTS:  # the lab's own chains only, and the bandwidth cap
                self.run(host, ["sh", "-c", f"iptables -w 5 -F {CHAIN_IN}; "
                                            f"iptables -w 5 -F {CHAIN_OUT}; tc qdisc del dev "
                                            f"{shlex.quote(self.lab_interface(host))} root "
                                            "2>/dev/null; true"])
            return
        check_host(a)
        for other in ([b] if b else [h for h in HOSTS if h != a]):
            check_host(other)
            self._uncut(a, other)

    def pause_agent(self, host, seconds):
        """Freeze a host's agent for `seconds` (SIGSTOP, sleep, SIGCONT); its pid."""
        pid = self.signal_agent(host, "STOP")
        try:
            time.sleep(seconds)
        finally:
            self.signal_agent(host, "CONT")
        return pid

    def clock_offsets(self):
        """{host: (offset, uncertainty)} in seconds of each host's clock against this
        machine's. Hosts that are namespaces of this machine share its clock."""
        return dict.fromkeys(HOSTS, (0.0, 0.0))

    def set_loss(self, host, probability):
        """Random loss of incoming packets on the lab interface (this kernel has no netem)."""
        self.iptables(host, "-A", CHAIN_IN, "-i", self.lab_interface(host), "-m", "statistic",
                      "--mode",
                      "random", "--probability", str(probability), "-j", "DROP")

    def remove_loss(self, host, probability):
        """Undo set_loss(host, probability) (one rule)."""
        self.run(host, ["iptables", "-w", "5", "-D", CHAIN_IN, "-i", self.lab_interface(host),
                        "-m", "statistic", "--mode", "random", "--probability",
                        str(probability), "-j", "DROP"])

    def cap_bandwidth(self, host, rate="8mbit"):
        self.must(host, ["tc", "qdisc", "replace", "dev", self.lab_interface(host), "root", "tbf",
                         "rate",
                         rate, "burst", "32kbit", "latency", "400ms"])

    def flood(self, source, target, seconds=10.0, connections=1000):
        """Abuse target's agent port from source for `seconds` (lab/flood.py): a running
        process group to stop(), its counts printed to its log at the end."""
        check_host(source), check_host(target, AGENT_HOSTS)
        port = self.config(target).me.agent_port
        argv = [self.client_python, self.remote_path(REPO / "lab" / "flood.py"), "--target",
                f"{self.addresses[target]}:{port}", "--seconds", str(seconds),
                "--connections", str(connections)]
        return self.spawn(source, argv, f"{self.lab_dir}/flood-{target}.log")

    def lab_interface(self, host):
        """The host's interface on the lab network."""
        return "eth0"

    # -- PostgreSQL on a host ---------------------------------------------------------------
    def pg_ctl(self, host, *args, timeout=90):
        cfg = self.config(host)
        return self.run(host, self.as_postgres([f"{cfg.pg_bin}/pg_ctl", "-D", cfg.data_dir,
                                                *args]), timeout=timeout)

    def stop_pg(self, host):
        """Stop PostgreSQL behind its agent's back: a fast shutdown (SIGINT) of the postmaster
        that postmaster.pid names, waiting for that very process to end, and an immediate one
        (SIGQUIT) after 10 s (a fast stop can hang on an unreachable standby). Not `pg_ctl
        stop`: it waits for whichever postmaster the file names, and an agent that starts
        PostgreSQL again within pg_ctl's 0.1 s poll made it wait for the new one and fail."""
        check_host(host, DB_HOSTS)
        pid_file = shlex.quote(f"{self.config(host).data_dir}/postmaster.pid")
        wait = ('for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || '
                '{ echo "server stopped ($1)"; exit 0; }; sleep 0.1; done')
        script = (f'pid=$(head -n 1 {pid_file} 2>/dev/null) && [ -n "$pid" ] || '
                  '{ echo "no server running"; exit 0; }; '
                  f'kill -INT "$pid" 2>/dev/null || exit 0; set -- fast; {wait}; '
                  f'kill -QUIT "$pid" 2>/dev/null || exit 0; set -- immediate; {wait}; '
                  'echo "postmaster $pid did not stop"; exit 1')
        return self.run(host, ["sh", "-c", script])

    def start_pg(self, host):
        check_host(host, DB_HOSTS)
        cfg = self.config(host)
        return self.pg_ctl(host, "start", "-w", "-t", "60", "-l", f"{cfg.log_dir}/postgresql.log")

    def psql_argv(self, host, sql=None):
        cfg = self.config(host)
        argv = self.as_postgres(["psql", "-X", "-h", cfg.run_dir, "-p", str(cfg.me.pg_port),
                                 "-U", "postgres", "-d", cfg.app_database])
        return argv + (["-At", "-v", "ON_ERROR_STOP=1", "-c", sql] if sql else [])

    def sql(self, host, sql, timeout=30):
        """Rows (lists of strings) of a statement run locally on a database host."""
        out = self.must(host, self.psql_argv(host, sql), timeout=timeout)
        return [line.split("|") for line in out.splitlines() if line]

    def client_sql(self, sql, dsn=None, timeout=30):
        """Run SQL from the client host, as the application would (multi-host string by
        default). Returns the CompletedProcess; raises subprocess.TimeoutExpired."""
        argv = ["env", f"PGPASSFILE={self.client_pgpass}", "psql", "-X", "-At", "-v",
                "ON_ERROR_STOP=1", dsn or self.dsn(), "-c", sql]
        return self.run(CLIENT, argv, timeout=timeout)

    def dsn(self, **extra):
        cfg = self.config(DB_HOSTS[0])
        hosts = ",".join(self.addresses[h] for h in DB_HOSTS)
        ports = ",".join(str(self.config(h).me.pg_port) for h in DB_HOSTS)
        if self.proxy:  # one address: HAProxy finds the primary (GET /primary)
            hosts, ports = self.addresses[CLIENT], str(self.PROXY_PORT)
        # connect_timeout: libpq's floor, 2 s per host. tcp_user_timeout 1 s: libpq sets it
        # before connect(), and Linux ends a connection attempt to a silent host at its first SYN
        # retransmission (1 s, measured) instead of connect_timeout's 2 s; with keepalives, a
        # session on a host that went silent fails in about a second instead of minutes. Under
        # 5 % loss a segment lost three times in a row (~1 in 8000) ends a session this way.
        parts = {"host": hosts, "port": ports, "dbname": cfg.app_database, "user": cfg.app_user,
                 "target_session_attrs": "read-write", "connect_timeout": "2",
                 "tcp_user_timeout": "1000", "keepalives": "1", "keepalives_idle": "2",
                 "keepalives_interval": "1", "keepalives_count": "2", **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    # -- status --------------------------------------------------------------------------
    def host_status(self, host):
        """One host's status as JSON (`agent.py … status --local`): the agent's, the kernel's
        fence and PostgreSQL's own view."""
        result = self.run(host, self.agent_argv(host, "status", "--local"), timeout=20)
        try:
            return json.loads(result.stdout)
        except ValueError:
            return {"node": host, "agent": "?", "pg": "?",
                    "error": (result.stderr or result.stdout).strip()[-300:]}

    def status(self):
        return [self.host_status(h) for h in AGENT_HOSTS]

    def cluster_table(self, as_json=False):
        """The agents' own cluster table (`agent.py … status`), asked from the first host whose
        agent answers it; "" when none does."""
        for host in AGENT_HOSTS:
            argv = self.agent_argv(host, "status", *(["--json"] if as_json else []))
            result = self.run(host, argv, timeout=20)
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.rstrip("\n")
        return ""

    def switchover(self):
        """Ask the agents for a planned switchover (from the primary's host); their answer."""
        primary = next((st["node"] for st in self.status() if st.get("pg") == "primary"),
                       DB_HOSTS[0])
        result = self.run(primary, self.agent_argv(primary, "switchover"), timeout=40)
        try:
            return json.loads(result.stdout)
        except ValueError:
            return {"done": False, "reason": (result.stderr or result.stdout).strip()}

    def events(self):
        """Every agent's events.jsonl and the port watcher's record (port_open, port_closed
        of each database host, seen from the network), merged in time order."""
        sources = [(host, f"{self.config(host).log_dir}/events.jsonl") for host in AGENT_HOSTS]
        sources += [self.portwatch_log()] if self.portwatch_log() else []
        merged = []
        for host, path in sources:
            for line in self.read_file(host, path).splitlines():
                try:
                    merged.append(json.loads(line))
                except ValueError:
                    continue
        return sorted(merged, key=lambda e: e["t"])

    def portwatch_log(self):
        """(host, path) of the port watcher's record, or None where the lab has none."""
        return None

    def primary_with_sync_standby(self):
        """The name of the primary once its standby streams synchronously, else None."""
        for st in self.status():
            for rep in st.get("replication") or []:
                if rep.get("sync_state") == "sync" and rep.get("state") == "streaming":
                    return st["node"]
        return None

    def wait_until(self, what, predicate, timeout, progress=None, interval=0.5):
        began, shown = time.monotonic(), -1
        while True:
            value = predicate()
            if value:
                if progress:
                    progress(f"\r{what}: ready after {time.monotonic() - began:.1f} s\n", end="")
                return value
            elapsed = time.monotonic() - began
            if elapsed > timeout:
                if progress:
                    progress("\n", end="")
                raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
            if progress and int(elapsed) != shown:
                shown = int(elapsed)
                progress(f"\r{what} … {shown} s", end="")
            time.sleep(interval)
