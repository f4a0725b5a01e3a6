"""What each host of a running lab must look like, checked with testinfra."""
import hashlib
import json
import re
import shlex
import time

import pytest

from lab.backend import AGENT_HOSTS, CHAIN_IN, CHAIN_OUT, DB_HOSTS, HOSTS, REPO


def agent_status(lab, host, name):
    return json.loads(host.check_output(shlex.join(lab.agent_argv(name, "status", "--local"))))


@pytest.mark.parametrize("name", AGENT_HOSTS)
def test_agent_is_running_and_listening(lab, hosts, name):
    cfg = lab.config(name)
    host = hosts[name]
    if lab.name == "vagrant":
        service = host.service("bobry-agent")
        assert service.is_enabled and service.is_running
    assert host.socket(f"tcp://{cfg.me.address}:{cfg.me.agent_port}").is_listening
    assert agent_status(lab, host, name)["agent"] == "up"
    if cfg.me.http_port is not None:  # the health endpoints
        assert host.socket(f"tcp://{cfg.me.address}:{cfg.me.http_port}").is_listening


@pytest.mark.parametrize("name", DB_HOSTS)
def test_postgres_listens_on_the_node_address_with_the_expected_role(lab, hosts, name):
    cfg = lab.config(name)
    host = hosts[name]
    assert host.socket(f"tcp://{cfg.me.address}:{cfg.me.pg_port}").is_listening
    status = agent_status(lab, host, name)
    expected = "primary" if status["view"]["primary"] == name else "standby"
    assert status["pg"] == expected


def test_replication_role_is_not_a_superuser(lab, hosts):
    primary = lab.primary_with_sync_standby()
    cfg = lab.config(primary)
    sql = (f"select rolsuper, rolreplication from pg_roles "
           f"where rolname = '{cfg.replication_user}'")
    out = hosts[primary].check_output(shlex.join(lab.psql_argv(primary, sql)))
    assert out.strip() == "f|t"


@pytest.mark.parametrize("name", AGENT_HOSTS)
def test_secret_files_are_root_only(lab, hosts, name):
    cfg = lab.config(name)
    for path in (cfg.replication_password_file, cfg.app_password_file, cfg.agent_key_file):
        secret = hosts[name].file(path)
        assert secret.exists and secret.mode == 0o600 and secret.user == "root", path


@pytest.mark.parametrize("name", DB_HOSTS)
def test_replication_passfile_belongs_to_postgres(lab, hosts, name):
    passfile = hosts[name].file(f"{lab.config(name).run_dir}/.pgpass")
    assert passfile.mode == 0o600 and passfile.user == "postgres"


vagrant_only = pytest.mark.parametrize("name", HOSTS)


@vagrant_only
def test_provisioning_made_the_lab_chains_and_a_unit_that_makes_them_at_boot(lab, hosts, name):
    if lab.name != "vagrant":
        pytest.skip("the embedded lab makes its chains at `up`")
    host = hosts[name]
    assert host.service("bobry-lab-chains").is_enabled
    for chain, hook in ((CHAIN_IN, "INPUT"), (CHAIN_OUT, "OUTPUT")):
        assert host.run(f"iptables -w 5 -C {hook} -j {chain}").rc == 0, (hook, chain)


@vagrant_only
def test_no_secret_is_left_in_tmp(lab, hosts, name):
    if lab.name != "vagrant":
        pytest.skip("the embedded lab keeps its secrets in its own directory")
    assert not hosts[name].file("/tmp/bobry-secrets").exists


@vagrant_only
def test_the_clock_is_kept(lab, hosts, name):
    """A container shares the host's clock; a VM keeps its own with systemd-timesyncd."""
    if lab.name != "vagrant":
        pytest.skip("network namespaces share this machine's clock")
    host = hosts[name]
    if host.run("systemd-detect-virt --container").rc != 0:
        assert host.service("systemd-timesyncd").is_running
        assert host.check_output("timedatectl show -p NTP --value") == "yes"


@pytest.mark.parametrize("name", AGENT_HOSTS)
def test_the_hosts_run_this_checkouts_agent_and_config(lab, hosts, name):
    if lab.name != "vagrant":
        pytest.skip("the embedded lab runs the checkout itself")
    for remote, local in (("/opt/bobry/agent.py", "agent.py"), ("/etc/bobry/agent.ini",
                                                                "agent.ini")):
        digest = hashlib.sha256((REPO / local).read_bytes()).hexdigest()
        assert hosts[name].file(remote).sha256sum == digest, remote


def lease(host, port):
    """The kernel's lease on the PostgreSQL port (the agent's nftables fence): the element of
    set `lease` for the port, or None when the set holds none (fenced)."""
    listing = host.check_output("nft list set inet bobry_fence lease")
    match = re.search(r"elements = \{ (" + str(port) + r"[^,}]*)", listing)
    return match.group(1).strip() if match else None


@pytest.mark.parametrize("name", DB_HOSTS)
def test_the_fence_table_rejects_the_port_without_a_lease(lab, hosts, name):
    port = lab.config(name).me.pg_port
    table = hosts[name].check_output("nft list table inet bobry_fence")
    assert "tcp dport @lease accept" in table
    assert f"tcp dport {port} reject with tcp reset" in table


@pytest.mark.parametrize("name", DB_HOSTS)
def test_an_unfenced_node_holds_a_lease(lab, hosts, name):
    assert not agent_status(lab, hosts[name], name)["fenced"]
    assert lease(hosts[name], lab.config(name).me.pg_port) is not None


def test_the_lease_lapses_when_the_primary_is_isolated(lab, hosts):
    """Last in this file: it fails the primary over."""
    primary = lab.primary_with_sync_standby()
    host = hosts[primary]
    port = lab.config(primary).me.pg_port
    lab.isolate(primary)
    try:
        deadline = time.monotonic() + 15
        while lease(host, port) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lease(host, port) is None
        assert agent_status(lab, host, primary)["fenced"]
    finally:
        lab.heal()
