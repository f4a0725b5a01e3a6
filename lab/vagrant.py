"""The Vagrant lab: pg1, pg2, arb and client are VirtualBox VMs or LXC containers (see
Vagrantfile), with the same provisioning. python-vagrant runs `vagrant up`, `destroy`, `status`
and `ssh-config`; every command on a host is one plain ssh call (`ssh -F <vagrant ssh-config>
-T`, no pty, standard input closed or fed, standard error captured) over a ControlMaster
connection, as root through `sudo -n timeout N`. The lab's experiments, faults and status are
the same code as for the embedded lab.

The port watcher (lab/portwatch.py) runs on this machine, which has an address on the lab
network (the LXC lab's bridge, VirtualBox's host-only network) that faults never cut."""
import configparser
import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.backend import (
    AGENT_HOSTS,
    CHAIN_IN,
    CHAIN_OUT,
    CLIENT,
    DB_HOSTS,
    HOSTS,
    REPO,
    Backend,
    LabError,
    check_host,
)

CLIENT_ADDRESS = "192.168.56.20"  # the Vagrantfile's client VM
GUEST_REPO = "/vagrant"           # where the Vagrantfile syncs this repository
CONFIG_ON_HOSTS = "/etc/bobry/agent.ini"
AGENT_ON_HOSTS = "/opt/bobry/agent.py"
SERVICE = "bobry-agent"
STATE_DIR = REPO / ".vagrant" / "bobry-lab"  # on this machine: ssh config, port watcher
PROVIDERS = ("virtualbox", "lxc")
TIMED_OUT = 124  # timeout(1)'s exit status when it stopped the command
RESYNC = "`vagrant rsync && vagrant provision`"


def _addresses():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "agent.ini")
    found = {h: parser[f"node {h}"]["address"] for h in AGENT_HOSTS}
    return {**found, CLIENT: CLIENT_ADDRESS}


def remote_command(argv, timeout):
    """The shell command a VM runs for argv: as root (sudo never asks), bounded in time."""
    return f"sudo -n timeout {int(timeout)} {shlex.join(str(a) for a in argv)}"


def vagrant_env(provider=None):
    """Vagrant without its update check (nothing leaves for HashiCorp's servers), and with the
    lab's provider as its default (`vagrant status` of machines not created yet)."""
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return env


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class RemoteProcess:
    """A process group started in the background on a VM, stopped by its group id there."""

    def __init__(self, backend, host, pgid):
        self.backend, self.host, self.pgid = backend, host, pgid

    def stop(self):
        self.backend.run(self.host, ["sh", "-c", f"kill -TERM -{self.pgid}; sleep 2; "
                                                 f"kill -KILL -{self.pgid} 2>/dev/null; true"])


class VagrantBackend(Backend):
    name = "vagrant"
    config_file = REPO / "agent.ini"  # the VMs run the repository's agent.ini as it is
    client_pgpass = "/etc/bobry/client.pgpass"
    lab_dir = "/var/tmp/bobry-lab"    # on the client VM

    def __init__(self, client=None, provider=None, state_dir=None):
        chosen = provider or os.environ.get("VAGRANT_DEFAULT_PROVIDER")
        self.provider = chosen or "virtualbox"
        if self.provider not in PROVIDERS:
            raise LabError(f"unknown Vagrant provider {self.provider!r} (known: "
                           f"{', '.join(PROVIDERS)})")
        if client is None:
            import vagrant  # python-vagrant, only for the life cycle and ssh-config
            client = vagrant.Vagrant(root=str(REPO), quiet_stdout=False, quiet_stderr=False,
                                     env=vagrant_env(chosen))
        self.vagrant = client
        self.state_dir = Path(state_dir or STATE_DIR)
        self.addresses = _addresses()
        self.strict_sync = False
        self._interfaces = {}
        self._checked = False

    # -- ssh ---------------------------------------------------------------------------------
    @property
    def ssh_config_file(self):
        return self.state_dir / "ssh-config"

    def _control_path(self):
        """ssh's ControlPath (%C: a hash of host, port and user); a unix socket path must stay
        short, so a deep checkout puts it in the temporary directory."""
        path = self.state_dir / "cm-%C"
        if len(str(path)) + 40 > 100:
            path = Path(tempfile.gettempdir()) / "bobry-cm-%C"
        return str(path)

    def write_ssh_config(self):
        """`vagrant ssh-config` of every machine, written once per `up`."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = self.vagrant.ssh_config()
        self.ssh_config_file.write_text(text)
        return text

    def ssh_argv(self, host, command, tty=False):
        if not self.ssh_config_file.exists():
            try:
                self.write_ssh_config()
            except subprocess.CalledProcessError as exc:
                raise LabError("no ssh configuration: is the lab up? (`python -m lab --backend "
                               f"vagrant up`): {exc}") from exc
        return ["ssh", "-F", str(self.ssh_config_file), "-t" if tty else "-T",
                "-o", "BatchMode=yes", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self._control_path()}", "-o", "ControlPersist=60",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", host, command]

    # -- commands on hosts -----------------------------------------------------------------
    def run(self, host, argv, timeout=60, input=None):
        """argv on host as root. Raises subprocess.TimeoutExpired after `timeout`, as the
        embedded lab does (the host's timeout(1) stops the command there)."""
        command = remote_command(argv, timeout)
        try:
            result = subprocess.run(self.ssh_argv(host, command), input=input,
                                    stdin=subprocess.DEVNULL if input is None else None,
                                    capture_output=True, text=True, timeout=timeout + 20)
        except subprocess.TimeoutExpired as exc:
            raise subprocess.TimeoutExpired(argv, timeout) from exc
        if result.returncode == TIMED_OUT:
            raise subprocess.TimeoutExpired(argv, timeout, output=result.stdout,
                                            stderr=result.stderr)
        return subprocess.CompletedProcess(argv, result.returncode, stdout=result.stdout,
                                           stderr=result.stderr)

    def spawn(self, host, argv, log_path):
        line = (f"setsid {shlex.join(str(a) for a in argv)} >> {shlex.quote(str(log_path))} "
                "2>&1 < /dev/null & echo $!")
        out = self.must(host, ["sh", "-c", line])
        return RemoteProcess(self, host, int(out.split()[-1]))

    def interactive(self, host, argv):
        tty = sys.stdin.isatty()
        return subprocess.call(self.ssh_argv(host, remote_command(argv, 86400), tty=tty))

    def read_file(self, host, path):
        """A file's text on a host, or on this machine for host None ("" when absent)."""
        if host is None:
            try:
                return Path(path).read_text()
            except FileNotFoundError:
                return ""
        return self.run(host, ["sh", "-c", f"cat {shlex.quote(str(path))} 2>/dev/null; true"]
                        ).stdout

    def agent_argv(self, host, *args):
        return ["python3", AGENT_ON_HOSTS, "--config", CONFIG_ON_HOSTS, "--node", host, *args]

    def remote_path(self, local_path):
        return f"{GUEST_REPO}/{local_path.relative_to(REPO)}"

    def work_dir(self, name):
        path = f"{self.lab_dir}/experiments/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.must(CLIENT, ["mkdir", "-p", path])
        return _RemotePath(path)

    def lab_interface(self, host):
        """The lab-network interface: cuts touch only it, so ssh keeps working."""
        if host not in self._interfaces:
            out = self.must(host, ["ip", "-o", "-4", "addr", "show", "to", self.addresses[host]])
            self._interfaces[host] = out.split()[1]
        return self._interfaces[host]

    def set_loss(self, host, probability):
        """Random loss into the lab interface, except from this machine (ssh, port watcher)."""
        self.iptables(host, "-A", CHAIN_IN, "-i", self.lab_interface(host), "!", "-s",
                      self.control_address(), "-m", "statistic", "--mode", "random",
                      "--probability", str(probability), "-j", "DROP")

    def remove_loss(self, host, probability):
        """Undo set_loss(host, probability) (one rule)."""
        self.run(host, ["iptables", "-w", "5", "-D", CHAIN_IN, "-i", self.lab_interface(host),
                        "!", "-s", self.control_address(), "-m", "statistic", "--mode",
                        "random", "--probability", str(probability), "-j", "DROP"])

    def control_address(self):
        """This machine's address on the lab network (the source of its packets to the client;
        a UDP connect sends nothing)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((self.addresses[CLIENT], 9))
            return sock.getsockname()[0]

    def clock_offsets(self, samples=5):
        """{host: (offset, uncertainty)} in seconds of each host's clock against this
        machine's, NTP-style: a few exchanges over one ssh session, the one with the shortest
        round trip kept (offset = remote time - midpoint, uncertainty = half the round trip)."""
        code = "import sys, time\nfor _ in sys.stdin:\n    print(repr(time.time()), flush=True)"
        offsets = {}
        for host in HOSTS:
            argv = self.ssh_argv(host, f"python3 -u -c {shlex.quote(code)}")
            with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) as proc:
                best = None
                try:
                    for _ in range(samples + 1):
                        t0 = time.time()
                        proc.stdin.write("\n")
                        proc.stdin.flush()
                        remote = float(proc.stdout.readline())
                        t1 = time.time()
                        if best is None or t1 - t0 < best[1] * 2:
                            best = (remote - (t0 + t1) / 2, (t1 - t0) / 2)
                except (ValueError, OSError, BrokenPipeError) as exc:
                    proc.kill()
                    raise LabError(f"{host}: cannot read its clock: {exc}") from exc
                finally:
                    if proc.stdin and not proc.stdin.closed:
                        proc.stdin.close()
                    proc.wait(timeout=10)
            offsets[host] = best
        return offsets

    # -- faults ------------------------------------------------------------------------------
    def install_fault_chains(self, host):
        """Provisioning makes the lab's chains (bobry-lab-chains.service): here they are only
        checked, so that a lab without them fails at `up` rather than at the first cut."""
        result = self.run(host, ["sh", "-c", f"iptables -w 5 -C INPUT -j {CHAIN_IN} && "
                                             f"iptables -w 5 -C OUTPUT -j {CHAIN_OUT}"])
        if result.returncode != 0:
            raise LabError(f"{host}: the lab's iptables chains are missing (provisioning makes "
                           f"them: {RESYNC}): {result.stderr.strip()}")

    # -- life cycle ------------------------------------------------------------------------
    def _host_script(self, progress, *argv):
        """A provision/ script on this machine (root), its lines shown as progress."""
        if os.geteuid() != 0:
            raise LabError(f"the LXC provider needs root on this machine ({shlex.join(argv)})")
        with subprocess.Popen(["bash", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=vagrant_env()) as proc:
            for line in proc.stdout:
                progress(f"  {line.rstrip()}")
        if proc.returncode != 0:
            raise LabError(f"{shlex.join(map(str, argv))} failed ({proc.returncode})")

    def up(self, progress=print):
        if self.strict_sync:
            raise LabError("--strict-sync belongs to the embedded lab: the Vagrant lab runs the "
                           "checkout's agent.ini as it is; set strict_sync = true there, then "
                           f"{RESYNC}")
        began = time.monotonic()
        if self.provider == "lxc":
            progress("LXC box (built once by provision/lxc-box.sh):")
            self._host_script(progress, REPO / "provision" / "lxc-box.sh")
            progress("lab network (provision/lxc-net.sh up): bridge bobrybr0, guard route, "
                     "lxcbr0")
            self._host_script(progress, REPO / "provision" / "lxc-net.sh", "up")
        progress(f"vagrant up --provider={self.provider}: pg1, pg2, arb, client")
        try:
            for line in self.vagrant.up(provider=self.provider, stream_output=True):
                progress(f"  {line.rstrip()}")
        except subprocess.CalledProcessError as exc:
            raise LabError(f"vagrant up failed ({exc.returncode}); see its output above") \
                from exc
        progress(f"vagrant up: done in {time.monotonic() - began:.0f} s")
        self.write_ssh_config()
        self.check_ready()
        for host in HOSTS:
            self.install_fault_chains(host)
        self._start_portwatch()
        progress("port watcher on this machine: "
                 f"{self.state_dir / 'portwatch.jsonl'}")

    def check_ready(self):
        """Refuse to run when the machines' agent.ini or agent.py (or the client's probe)
        differ from this checkout's: the lab would measure something else than it reads."""
        if self._checked:
            return
        wanted = {AGENT_ON_HOSTS: _sha256(REPO / "agent.py"),
                  CONFIG_ON_HOSTS: _sha256(REPO / "agent.ini")}
        stale = []
        for host in HOSTS:
            files = dict(wanted) if host in AGENT_HOSTS else {
                self.remote_path(REPO / "lab" / "probe.py"): _sha256(REPO / "lab" / "probe.py")}
            out = self.run(host, ["sha256sum", *files]).stdout
            seen = {line.split()[1]: line.split()[0] for line in out.splitlines()
                    if len(line.split()) == 2}
            stale += [f"{host}:{path}" for path, digest in files.items()
                      if seen.get(path) != digest]
        if stale:
            raise LabError(f"the machines do not run this checkout ({', '.join(stale)} "
                           f"differ): run {RESYNC}")
        self._checked = True

    def down(self):
        self._stop_portwatch()
        if self.ssh_config_file.exists():
            # PostgreSQL would make each machine's shutdown wait for its sessions (a smart
            # shutdown, up to systemd's stop timeout): stop it at once, as the embedded lab does
            for host in DB_HOSTS:
                try:
                    self.run(host, ["systemctl", "stop", SERVICE], timeout=20)
                    self.pg_ctl(host, "stop", "-m", "immediate", "-t", "20", timeout=30)
                except (subprocess.SubprocessError, OSError, LabError):
                    pass  # down goes on whatever state the machine is in
        if self.ssh_config_file.exists():
            for host in HOSTS:  # the ssh master connections, if any
                subprocess.run(["ssh", "-F", str(self.ssh_config_file), "-o",
                                f"ControlPath={self._control_path()}", "-O", "exit", host],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        try:
            self.vagrant.destroy()
        except subprocess.CalledProcessError as exc:
            raise LabError(f"vagrant destroy failed ({exc.returncode})") from exc
        if self.provider == "lxc" or Path("/run/bobry-lxc-lab").exists():
            self._host_script(lambda *a, **k: None, REPO / "provision" / "lxc-net.sh",
                              "down-if-unused")
        for path in (self.ssh_config_file, self.state_dir / "portwatch.jsonl",
                     self.state_dir / "portwatch.log"):
            path.unlink(missing_ok=True)

    def exists(self):
        return any(s.state == "running" for s in self.vagrant.status())

    # -- the port watcher, on this machine ---------------------------------------------------
    def portwatch_log(self):
        return None, str(self.state_dir / "portwatch.jsonl")

    def _portwatch_pid(self):
        try:
            pid = int((self.state_dir / "portwatch.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"portwatch.py" in cmdline else None

    def _start_portwatch(self):
        if self._portwatch_pid():
            return
        targets = [f"{h}={self.addresses[h]}:{self.config(h).me.pg_port}" for h in DB_HOSTS]
        argv = [sys.executable, str(REPO / "lab" / "portwatch.py"), "--out",
                self.portwatch_log()[1]] + [a for t in targets for a in ("--target", t)]
        with open(self.state_dir / "portwatch.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        (self.state_dir / "portwatch.pid").write_text(str(proc.pid))

    def _stop_portwatch(self):
        pid = self._portwatch_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                try:
                    os.waitpid(pid, os.WNOHANG)  # our child when `up` ran in this process
                except ChildProcessError:
                    pass
                time.sleep(0.05)
        (self.state_dir / "portwatch.pid").unlink(missing_ok=True)

    # -- agents ------------------------------------------------------------------------------
    def start_agent(self, host):
        check_host(host, AGENT_HOSTS)
        self.must(host, ["systemctl", "start", SERVICE])
        return self.agent_pid(host)

    def agent_pid(self, host):
        out = self.run(host, ["systemctl", "show", "-p", "MainPID", "--value", SERVICE]).stdout
        pid = int(out.strip() or 0)
        return pid or None

    def signal_agent(self, host, signame):
        """systemd restarts an agent that died (Restart=always), as it would in production;
        `systemctl stop` (not a signal) keeps it down."""
        check_host(host, AGENT_HOSTS)
        pid = self.agent_pid(host)
        if pid is None:
            raise LabError(f"the agent on {host} is not running")
        self.must(host, ["systemctl", "kill", "--kill-whom=main", "-s", f"SIG{signame}", SERVICE])
        return pid

    def pause_agent(self, host, seconds):
        """SIGSTOP, sleep, SIGCONT in one command on the host (the pause is not stretched by
        ssh round trips; the CONT is sent even if the sleep is interrupted)."""
        check_host(host, AGENT_HOSTS)
        script = (f"pid=$(systemctl show -p MainPID --value {SERVICE}); "
                  '[ "${pid:-0}" -gt 0 ] || { echo "agent not running" >&2; exit 3; }; '
                  "trap 'kill -CONT $pid' EXIT; kill -STOP $pid; "
                  f"sleep {float(seconds)}; echo $pid")
        return int(self.must(host, ["sh", "-c", script]).split()[-1])


class _RemotePath(str):
    """A path on the client VM that experiments join with `/` like a pathlib.Path."""

    def __truediv__(self, name):
        return _RemotePath(f"{self}/{name}")
