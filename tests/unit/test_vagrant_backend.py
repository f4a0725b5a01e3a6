"""The Vagrant backend's command lines, without machines: python-vagrant is replaced by a
recorder of the life-cycle calls, and ssh by a recorder of argv lists (with scripted outputs).
tests/vagrant runs the same code against real machines."""
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import bench, cli
from lab import vagrant as vagrant_module
from lab.backend import LabError
from lab.vagrant import VagrantBackend

REPO = Path(__file__).resolve().parents[2]


class FakeVagrant:
    """python-vagrant's Vagrant, recording what the backend asks of it."""

    def __init__(self):
        self.calls = []

    def up(self, provider=None, stream_output=False):
        self.calls.append(("up", provider, stream_output))
        return iter(["==> pg1: Machine booted and ready!\n"])

    def destroy(self):
        self.calls.append(("destroy",))

    def ssh_config(self):
        self.calls.append(("ssh_config",))
        return "Host pg1\n  HostName 192.168.56.11\n"

    def status(self):
        return []


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """(backend, ssh command lines run, {substring of the remote command: stdout})."""
    calls, outputs = [], {}

    def run(argv, **kwargs):
        calls.append(argv)
        assert kwargs.get("stdin") is subprocess.DEVNULL or kwargs.get("input") is not None
        assert kwargs.get("capture_output")
        for key, out in outputs.items():
            if key in argv[-1]:
                return (out if isinstance(out, subprocess.CompletedProcess)
                        else subprocess.CompletedProcess(argv, 0, out, ""))
        return subprocess.CompletedProcess(argv, 0, "1700000000.25\n", "")

    monkeypatch.setattr(vagrant_module.subprocess, "run", run)
    fake = FakeVagrant()
    backend = VagrantBackend(client=fake, provider="lxc", state_dir=tmp_path)
    backend._checked = True  # check_ready has its own test
    monkeypatch.setattr(cli, "make_backend", lambda name, provider=None: backend)
    return backend, calls, outputs


def remote(call):
    """The command the host runs, unquoted: after `sudo -n timeout N`, and for `sh -c` its
    script."""
    words = shlex.split(call[-1])
    if words[4:6] == ["sh", "-c"] or words[4:6] == ["sh", "-ec"]:
        return words[6]
    return " ".join(words)


def test_a_command_is_one_plain_ssh_call_over_a_control_master(recorded, tmp_path):
    backend, calls, _ = recorded
    backend.run("pg1", ["iptables", "-S"], timeout=20)
    [argv] = calls
    assert argv[:4] == ["ssh", "-F", str(tmp_path / "ssh-config"), "-T"]
    assert "ControlMaster=auto" in argv and "BatchMode=yes" in argv
    assert any(a.startswith("ControlPath=") for a in argv)
    assert argv[-2:] == ["pg1", "sudo -n timeout 20 iptables -S"]
    # the ssh config came from `vagrant ssh-config`, once
    assert (tmp_path / "ssh-config").read_text().startswith("Host pg1")
    assert backend.vagrant.calls == [("ssh_config",)]


def test_the_hosts_timeout_raises_as_in_the_embedded_lab(recorded):
    backend, _, outputs = recorded
    outputs["sleep"] = subprocess.CompletedProcess([], 124, "", "")
    with pytest.raises(subprocess.TimeoutExpired):
        backend.run("client", ["sleep", "100"], timeout=3)


def test_stderr_is_kept(recorded):
    backend, _, outputs = recorded
    outputs["false"] = subprocess.CompletedProcess([], 1, "", "boom\n")
    with pytest.raises(LabError, match="boom"):
        backend.must("pg1", ["false"])


def test_cut_is_one_command_per_end_on_the_lab_addresses(recorded):
    _, calls, _ = recorded
    cli.main(["--backend", "vagrant", "cut", "pg1", "pg2"])
    assert [c[-2] for c in calls] == ["pg1", "pg2"]
    assert "-A bobry-lab-in -s 192.168.56.12 -j DROP" in remote(calls[0])
    assert "-A bobry-lab-out -d 192.168.56.12 -j DROP" in remote(calls[0])
    assert "iptables-restore -w 5 --noflush" in remote(calls[0])
    assert "-A bobry-lab-in -s 192.168.56.11 -j DROP" in remote(calls[1])


def test_isolate_returns_the_isolated_hosts_clock_read_in_the_same_command(recorded):
    backend, calls, outputs = recorded
    outputs["-s 192.168.56.12"] = "1700000123.5\n"  # pg1's command names its peer pg2
    assert backend.isolate("pg1") == 1700000123.5
    assert remote(calls[0]).endswith("iptables-restore -w 5 --noflush && date +%s.%N")
    assert [c[-2] for c in calls] == ["pg1", "pg2", "arb", "client"]


def test_one_way_cut(recorded):
    _, calls, _ = recorded
    cli.main(["--backend", "vagrant", "cut", "client", "arb", "--one-way"])
    assert "-A bobry-lab-out -d 192.168.56.13 -m conntrack --ctstate NEW -j DROP" in \
        remote(calls[0])
    assert "-A bobry-lab-in -s 192.168.56.20 -m conntrack --ctstate NEW -j DROP" in \
        remote(calls[1])


def test_heal_flushes_only_the_lab_chains(recorded):
    _, calls, outputs = recorded
    outputs["addr show to"] = "3: eth1    inet 192.168.56.11/24 scope global eth1"
    cli.main(["--backend", "vagrant", "heal"])
    flushes = [remote(c) for c in calls if " -F " in remote(c)]
    assert len(flushes) == 4
    assert all("iptables -w 5 -F bobry-lab-in; iptables -w 5 -F bobry-lab-out" in f
               for f in flushes)
    assert not any("bobry_fence" in remote(c) or "nft" in remote(c) for c in calls)


def test_status_runs_the_installed_agent(recorded):
    backend, calls, outputs = recorded
    outputs["--node pg1 status --local"] = '{"node": "pg1", "agent": "up", "pg": "primary"}'
    assert backend.host_status("pg1")["pg"] == "primary"
    assert remote(calls[0]) == ("sudo -n timeout 20 python3 /opt/bobry/agent.py --config "
                                "/etc/bobry/agent.ini --node pg1 status --local")


def test_kill_agent_goes_through_systemd(recorded):
    backend, calls, outputs = recorded
    outputs["MainPID"] = "4242\n"
    assert backend.signal_agent("arb", "KILL") == 4242
    assert remote(calls[-1]) == ("sudo -n timeout 60 systemctl kill --kill-whom=main "
                                 "-s SIGKILL bobry-agent")


def test_an_agent_pause_is_one_command_on_the_host(recorded):
    backend, calls, outputs = recorded
    outputs["kill -STOP"] = "4242\n"
    assert backend.pause_agent("pg2", 0.5) == 4242
    [call] = calls
    assert "trap 'kill -CONT $pid' EXIT; kill -STOP $pid; sleep 0.5" in remote(call)


def test_loss_spares_this_machines_address(recorded, monkeypatch):
    backend, calls, outputs = recorded
    outputs["addr show to"] = "3: eth1    inet 192.168.56.13/24 scope global eth1"
    monkeypatch.setattr(backend, "control_address", lambda: "192.168.56.1")
    backend.set_loss("arb", 0.05)
    assert remote(calls[1]) == ("sudo -n timeout 60 iptables -w 5 -A bobry-lab-in -i eth1 ! "
                                "-s 192.168.56.1 -m statistic --mode random --probability 0.05 "
                                "-j DROP")


def test_stop_pg_uses_the_paths_of_agent_ini(recorded):
    backend, calls, _ = recorded
    backend.stop_pg("pg2")
    assert "head -n 1 /var/lib/bobry/data/postmaster.pid" in remote(calls[0])
    assert 'kill -INT "$pid"' in remote(calls[0]) and 'kill -QUIT "$pid"' in remote(calls[0])


def test_load_runs_in_the_background_on_the_client(recorded):
    backend, calls, outputs = recorded
    outputs["setsid"] = "777\n"
    process = backend.spawn("client", ["pgbench", "-n"], "/var/tmp/x.log")
    assert calls[0][-2] == "client"
    assert "setsid pgbench -n >> /var/tmp/x.log 2>&1 < /dev/null & echo $!" in remote(calls[0])
    process.stop()
    assert "kill -TERM -777" in remote(calls[-1])


def test_up_builds_the_box_makes_the_network_then_vagrant_up(recorded, monkeypatch):
    backend, calls, _ = recorded
    steps = []
    monkeypatch.setattr(backend, "_host_script",
                        lambda progress, *argv: steps.append([Path(argv[0]).name, *argv[1:]]))
    monkeypatch.setattr(backend, "_start_portwatch", lambda: steps.append(["portwatch"]))
    monkeypatch.setattr(backend, "check_ready", lambda: steps.append(["check_ready"]))
    backend.up(progress=lambda *a, **k: None)
    assert steps[:2] == [["lxc-box.sh"], ["lxc-net.sh", "up"]]
    assert backend.vagrant.calls[0] == ("up", "lxc", True)
    assert steps[2:] == [["check_ready"], ["portwatch"]]
    # the chains are checked (provisioning made them), never made here
    chain_checks = [remote(c) for c in calls if "bobry-lab-in" in remote(c)]
    assert len(chain_checks) == 4 and all(" -C INPUT " in c for c in chain_checks)
    assert not any(" -N " in remote(c) for c in calls)


def test_up_refuses_strict_sync(recorded):
    backend, _, _ = recorded
    backend.strict_sync = True
    with pytest.raises(LabError, match="strict_sync = true"):
        backend.up(progress=lambda *a, **k: None)


def test_a_machine_with_another_agent_ini_is_refused(recorded):
    backend, _, outputs = recorded
    backend._checked = False
    outputs["sha256sum"] = "0000  /etc/bobry/agent.ini\n"
    with pytest.raises(LabError, match="vagrant rsync && vagrant provision"):
        backend.check_ready()


def test_bench_reuses_the_running_vagrant_lab(recorded, monkeypatch):
    seen = {}

    def run(backend, progress, what, trials, fresh=True, args=None):
        seen["fresh"] = fresh
        return {"ok": True}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "report", lambda result: "")
    assert cli.main(["--backend", "vagrant", "bench", "failover", "--trials", "1"]) == 0
    assert seen == {"fresh": False}


def test_python_vagrant_is_pinned():
    """Only up, destroy, status and ssh-config go through python-vagrant; its errors are
    subprocess.CalledProcessError in 1.0.0, which the backend turns into LabError."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    assert "python-vagrant==1.0.0" in lines


@pytest.mark.skipif(not shutil.which("vagrant"), reason="vagrant not installed "
                    "(provision/local.sh test installs it)")
def test_vagrantfile_validates():
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**vagrant_module.vagrant_env()})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed "
                    "(provision/local.sh test installs it)")
def test_shell_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in (REPO / "provision").glob("*.sh")) + [str(REPO / ".ci/run")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
