"""The Vagrant backend: each lab operation is python-vagrant calls, and these are the exact
`vagrant …` command lines they run. subprocess is replaced by a recorder (VirtualBox cannot
run here); the commands themselves are python-vagrant's own."""
import shutil
import subprocess
from pathlib import Path

import pytest
import vagrant

from lab import cli
from lab.vagrant import VagrantBackend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recorded(monkeypatch):
    """Every vagrant command line, and scripted outputs for the ones whose output is read."""
    calls = []
    # a fresh VM: no lab rule exists yet (iptables -C fails), the lab interface is eth1
    outputs = {"iptables -w 5 -C": subprocess.CalledProcessError(1, "iptables", b""),
               "addr show to": "3: eth1    inet 192.168.56.11/24 scope global eth1"}

    def check_output(command, **_):
        calls.append(command)
        for key, out in outputs.items():
            if key in " ".join(command) and isinstance(out, Exception):
                raise out
            if key in " ".join(command):
                return out.encode()
        return b""

    monkeypatch.setattr(vagrant, "get_vagrant_executable", lambda: "vagrant")
    monkeypatch.setattr(vagrant.subprocess, "check_output", check_output)
    monkeypatch.setattr(vagrant.subprocess, "check_call", lambda command, **_:
                        calls.append(command))
    return calls, outputs


def ssh(host, command):
    return ["vagrant", "ssh", host, "--command", command]


def test_up_and_down(recorded):
    calls, _ = recorded
    backend = VagrantBackend()
    backend.up(progress=lambda *a, **k: None)
    assert calls[0] == ["vagrant", "up"]
    # then each host gets the lab's own iptables chains, over vagrant ssh
    assert ssh("pg1", "sudo timeout 60 iptables -w 5 -n -L bobry-lab-in") in calls
    calls.clear()
    backend.down()
    assert calls == [["vagrant", "destroy", "--force"]]


def test_cut_touches_only_the_private_network_addresses(recorded):
    calls, _ = recorded
    cli.main(["--backend", "vagrant", "cut", "pg1", "pg2"])
    restores = [c for c in calls if "iptables-restore" in c[-1]]
    assert [c[2] for c in restores] == ["pg1", "pg2"]
    assert "-A bobry-lab-in -s 192.168.56.12 -j DROP" in restores[0][-1]
    assert "-A bobry-lab-out -d 192.168.56.12 -j DROP" in restores[0][-1]
    assert "-A bobry-lab-in -s 192.168.56.11 -j DROP" in restores[1][-1]
    assert all(c[:2] == ["vagrant", "ssh"] for c in calls)


def test_heal_flushes_only_the_lab_chains(recorded):
    calls, _ = recorded
    cli.main(["--backend", "vagrant", "heal"])
    flushes = [c[-1] for c in calls if " -F " in c[-1]]
    assert "sudo timeout 60 iptables -w 5 -F bobry-lab-in" in flushes
    assert not any("bobry-fence" in f for f in flushes)


def test_status_runs_the_installed_agent(recorded):
    calls, outputs = recorded
    outputs["--node pg1 status --local"] = '{"node": "pg1", "agent": "up", "pg": "primary"}'
    status = VagrantBackend().host_status("pg1")
    assert status["pg"] == "primary"
    assert calls == [ssh("pg1", "sudo timeout 20 python3 /opt/bobry/agent.py --config "
                                "/etc/bobry/agent.ini --node pg1 status --local")]


def test_kill_agent_goes_through_systemd(recorded):
    calls, outputs = recorded
    outputs["MainPID"] = "4242\n"
    assert VagrantBackend().signal_agent("arb", "KILL") == 4242
    assert calls[-1] == ssh("arb", "sudo timeout 60 systemctl kill --kill-whom=main -s SIGKILL "
                                   "bobry-agent")


def test_loss_uses_the_interface_that_holds_the_lab_address(recorded):
    calls, _ = recorded
    VagrantBackend().set_loss("arb", 0.05)
    assert calls[0] == ssh("arb", "sudo timeout 60 ip -o -4 addr show to 192.168.56.13")
    assert calls[1] == ssh("arb", "sudo timeout 60 iptables -w 5 -A bobry-lab-in -i eth1 -m "
                                  "statistic --mode random --probability 0.05 -j DROP")


def test_stop_pg_uses_the_paths_of_agent_ini(recorded):
    calls, _ = recorded
    VagrantBackend().stop_pg("pg2")
    assert calls[0] == ssh("pg2", "sudo timeout 90 runuser -u postgres -- "
                                  "/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/bobry/data "
                                  "stop -m fast -t 10")


def test_load_runs_in_the_background_on_the_client(recorded):
    calls, outputs = recorded
    outputs["setsid"] = "777\n"
    process = VagrantBackend().spawn("client", ["pgbench", "-n"], "/var/tmp/x.log")
    assert calls[0][:3] == ["vagrant", "ssh", "client"]
    assert "setsid pgbench -n >> /var/tmp/x.log 2>&1 < /dev/null & echo $!" in calls[0][-1]
    process.stop()
    assert "kill -TERM -777" in calls[-1][-1]


@pytest.mark.skipif(not shutil.which("vagrant"), reason="vagrant not installed "
                    "(provision/local.sh test installs it)")
def test_vagrantfile_validates():
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed "
                    "(provision/local.sh test installs it)")
def test_shell_scripts_are_shellcheck_clean():
    scripts = sorted(str(p) for p in (REPO / "provision").glob("*.sh")) + [str(REPO / ".ci/run")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
