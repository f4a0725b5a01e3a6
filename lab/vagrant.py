"""The Vagrant lab: pg1, pg2, arb and client are VirtualBox VMs (see Vagrantfile), driven with
python-vagrant. Every command on a host is one `vagrant ssh HOST --command "sudo …"`; the
lab's experiments, faults and status are the same code as for the embedded lab."""
import configparser
import shlex
import subprocess
import time

import vagrant

from lab.backend import AGENT_HOSTS, CLIENT, REPO, Backend, LabError, check_host

CLIENT_ADDRESS = "192.168.56.20"  # the Vagrantfile's client VM
GUEST_REPO = "/vagrant"           # where the Vagrantfile syncs this repository
CONFIG_ON_HOSTS = "/etc/bobry/agent.ini"
AGENT_ON_HOSTS = "/opt/bobry/agent.py"
SERVICE = "bobry-agent"


def _addresses():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "agent.ini")
    found = {h: parser[f"node {h}"]["address"] for h in AGENT_HOSTS}
    return {**found, CLIENT: CLIENT_ADDRESS}


def remote_command(argv, timeout):
    """The shell command a VM runs for argv: as root, bounded in time (python-vagrant's ssh
    has no timeout of its own)."""
    return f"sudo timeout {int(timeout)} {shlex.join(str(a) for a in argv)}"


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

    def __init__(self, client=None):
        self.vagrant = client or vagrant.Vagrant(root=str(REPO), quiet_stdout=False,
                                                  quiet_stderr=False)
        self.addresses = _addresses()
        self._interfaces = {}

    # -- commands on hosts: one python-vagrant call each -----------------------------------
    def run(self, host, argv, timeout=60, input=None):
        if input is not None:
            raise LabError("the vagrant backend passes no standard input")
        try:
            out, code = self.vagrant.ssh(vm_name=host, command=remote_command(argv, timeout)), 0
        except subprocess.CalledProcessError as exc:
            out, code = exc.output or "", exc.returncode
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        return subprocess.CompletedProcess(argv, code, stdout=out, stderr="")

    def spawn(self, host, argv, log_path):
        line = (f"setsid {shlex.join(str(a) for a in argv)} >> {shlex.quote(str(log_path))} "
                "2>&1 < /dev/null & echo $!")
        pgid = int(self.vagrant.ssh(vm_name=host, command=f"sudo sh -c {shlex.quote(line)}"))
        return RemoteProcess(self, host, pgid)

    def interactive(self, host, argv):
        return subprocess.call(["vagrant", "ssh", host, "--command", remote_command(argv, 86400)],
                               cwd=REPO)

    def agent_argv(self, host, *args):
        return ["python3", AGENT_ON_HOSTS, "--config", CONFIG_ON_HOSTS, "--node", host, *args]

    def remote_path(self, local_path):
        return f"{GUEST_REPO}/{local_path.relative_to(REPO)}"

    def work_dir(self, name):
        path = f"{self.lab_dir}/experiments/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.must(CLIENT, ["mkdir", "-p", path])
        return _RemotePath(path)

    def lab_interface(self, host):
        """The private-network interface: cuts touch only it, so `vagrant ssh` keeps working."""
        if host not in self._interfaces:
            out = self.must(host, ["ip", "-o", "-4", "addr", "show", "to", self.addresses[host]])
            self._interfaces[host] = out.split()[1]
        return self._interfaces[host]

    # -- life cycle ------------------------------------------------------------------------
    def up(self, progress=print):
        progress("vagrant up: creating and provisioning pg1, pg2, arb, client (minutes)")
        self.vagrant.up()
        for host in (*AGENT_HOSTS, CLIENT):
            self.install_fault_chains(host)

    def down(self):
        self.vagrant.destroy()

    def exists(self):
        return any(s.state == "running" for s in self.vagrant.status())

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


class _RemotePath(str):
    """A path on the client VM that experiments join with `/` like a pathlib.Path."""

    def __truediv__(self, name):
        return _RemotePath(f"{self}/{name}")
