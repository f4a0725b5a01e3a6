"""The Vagrant lab does what the embedded lab does: every `python -m lab --backend vagrant …`
command against real machines (LXC containers in CI, VirtualBox VMs on a laptop), brought up
once for the module (tests/conftest.py: vagrant_lab). Run with `--lab-backend vagrant`
(provision/local.sh test-vagrant)."""
import json
import os
import subprocess
import sys
import time

import pytest

from lab import experiments
from lab.backend import AGENT_HOSTS, DB_HOSTS, REPO
from labtest import eventually

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def lab_cli(*args, timeout=600, check=True):
    """`python -m lab --backend vagrant ARGS` as a user types it; its CompletedProcess."""
    result = subprocess.run([sys.executable, "-m", "lab", "--backend", "vagrant", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def reaches(lab, source, target, port):
    """Whether a new TCP connection from source to target's port opens within 1 s."""
    code = (f"import socket; socket.create_connection(({lab.addresses[target]!r}, {port}), 1)")
    return lab.run(source, ["python3", "-c", code], timeout=10).returncode == 0


@pytest.fixture
def lab(vagrant_lab):
    """A healthy lab: no fault left, a primary with a synchronous standby, the arbiter's view
    naming the standby eligible."""
    vagrant_lab.heal()

    def healthy():
        primary = vagrant_lab.primary_with_sync_standby()
        view = vagrant_lab.host_status("arb").get("view") or {}
        return primary if primary and view.get("eligible") not in (None, primary) else None

    eventually(healthy, 120)
    yield vagrant_lab
    vagrant_lab.heal()


def test_the_lab_network_and_its_guard(lab):
    if lab.provider != "lxc":
        pytest.skip("VirtualBox makes its own host-only network")
    routes = subprocess.run(["ip", "route", "show", "192.168.56.0/24"], capture_output=True,
                            text=True).stdout
    assert "dev bobrybr0" in routes
    guard = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True,
                           text=True).stdout
    assert "unreachable 192.168.56.0/24 metric 1000" in guard
    assert subprocess.run(["ip", "link", "show", "lxcbr0"], capture_output=True).returncode == 0


def test_status(lab):
    rows = json.loads(lab_cli("status", "--json").stdout)
    assert [r["node"] for r in rows] == list(AGENT_HOSTS)
    assert sorted(r["pg"] for r in rows if r["node"] in DB_HOSTS) == ["primary", "standby"]
    assert all(r["agent"] == "up" for r in rows)
    table = lab_cli("status").stdout
    assert "192.168.56.13" in table and "view:" in table


def test_clocks_are_within_50_ms(lab):
    offsets = experiments.check_clocks(lab)
    assert set(offsets) == {"pg1", "pg2", "arb", "client"}


def test_cut_and_heal_one_link(lab):
    port = lab.config("pg2").me.agent_port
    lab_cli("cut", "pg1", "pg2")
    assert not reaches(lab, "pg1", "pg2", port)
    assert not reaches(lab, "pg2", "pg1", port)
    assert reaches(lab, "arb", "pg2", port)
    lab_cli("heal", "pg1", "pg2")
    assert reaches(lab, "pg1", "pg2", port)


def test_cut_one_way(lab):
    port = lab.config("arb").me.agent_port
    assert "cut new connections client -> arb" in lab_cli("cut", "client", "arb",
                                                          "--one-way").stdout
    assert not reaches(lab, "client", "arb", port)
    assert reaches(lab, "arb", "client", 22)
    lab_cli("heal")
    assert reaches(lab, "client", "arb", port)


def test_isolate_and_heal_the_arbiter(lab):
    port = lab.config("pg1").me.agent_port
    lab_cli("isolate", "arb")
    assert not reaches(lab, "arb", "pg1", port) and not reaches(lab, "pg2", "arb", port)
    assert reaches(lab, "pg2", "pg1", port)
    lab_cli("heal", "arb")
    assert reaches(lab, "arb", "pg1", port)


def test_kill_agent_and_systemd_restarts_it(lab):
    before = lab.agent_pid("arb")
    assert f"pid {before}" in lab_cli("kill-agent", "arb").stdout
    eventually(lambda: lab.agent_pid("arb") not in (None, before), 15)
    eventually(lambda: lab.host_status("arb").get("agent") == "up", 15)


def test_an_agent_pause_is_one_command(lab):
    began = time.monotonic()
    pid = lab.pause_agent("arb", 0.5)
    assert 0.5 <= time.monotonic() - began < 3
    assert pid == lab.agent_pid("arb")
    state = lab.must("arb", ["ps", "-o", "stat=", "-p", str(pid)]).strip()
    assert not state.startswith("T"), state  # running again


def test_stop_pg_on_the_standby_and_it_comes_back(lab):
    primary = lab.primary_with_sync_standby()
    standby = next(h for h in DB_HOSTS if h != primary)
    lab_cli("stop-pg", standby)
    eventually(lambda: lab.primary_with_sync_standby() == primary
               and lab.host_status(standby).get("pg") == "standby", 120)


def test_switchover(lab):
    primary = lab.primary_with_sync_standby()
    answer = json.loads(lab_cli("switchover").stdout)
    assert answer["done"], answer
    eventually(lambda: lab.primary_with_sync_standby() not in (None, primary), 60)


def test_experiment_failover_has_the_embedded_labs_keys_and_verdict(lab):
    result = lab_cli("experiment", "failover", "--json", check=False)
    figures = json.loads(result.stdout)
    assert figures["ok"], figures["failed_checks"]
    assert result.returncode == 0
    # the same keys as the embedded lab's experiment (failover_metrics and its frame)
    made_up = experiments.failover_metrics([], [], 0.0, "pg1", "pg2", lab.addresses, [])
    frame = {"backend", "old_primary", "new_primary", "cut_at", "healed_at",
             "clock_offsets_ms", "report_dir", "pgbench_rate", "bulk_mb", "bulk_mb_at_cut",
             "bulk_mb_written_alone", "probe_deadline_s"}
    assert set(figures) == set(made_up) | frame
    assert figures["backend"] == "vagrant"
    assert all(abs(v) <= 50 for v in figures["clock_offsets_ms"].values())


def test_experiment_pingpong_two_rounds(lab):
    result = lab_cli("experiment", "pingpong", "--rounds", "2", "--json", check=False)
    figures = json.loads(result.stdout)
    assert figures["ok"], figures["failed_checks"]
    assert figures["promotions"] == 2 and figures["data_equal"]


def test_the_lab_refuses_when_a_machines_agent_ini_differs(lab):
    lab.must("arb", ["sh", "-c", "echo '# edited on the machine' >> /etc/bobry/agent.ini"])
    try:
        result = lab_cli("status", check=False)
        assert result.returncode == 2
        assert "arb:/etc/bobry/agent.ini" in result.stderr
        assert "vagrant rsync && vagrant provision" in result.stderr
    finally:
        lab.must("arb", ["sh", "-c", "sed -i '$d' /etc/bobry/agent.ini"])
    lab_cli("status")


def test_strict_sync_is_refused(lab):
    result = lab_cli("up", "--strict-sync", check=False)
    assert result.returncode == 2 and "strict_sync = true" in result.stderr


def test_after_a_reboot_the_chains_and_the_agent_are_back(lab):
    """Last: the arbiter's machine reboots (its chains are not in the kernel any more until
    bobry-lab-chains.service makes them again)."""
    if os.environ.get("BOBRY_SKIP_REBOOT"):
        pytest.skip("BOBRY_SKIP_REBOOT set")
    before = lab.must("arb", ["cat", "/proc/sys/kernel/random/boot_id"]).strip()
    lab.run("arb", ["sh", "-c", "(sleep 1; systemctl reboot) >/dev/null 2>&1 &"])

    def back():
        try:
            result = lab.run("arb", ["cat", "/proc/sys/kernel/random/boot_id"], timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and result.stdout.strip() != before

    eventually(back, 120, interval=2)
    lab.install_fault_chains("arb")  # raises unless provisioning's unit made them at boot
    eventually(lambda: lab.host_status("arb").get("agent") == "up", 60)
