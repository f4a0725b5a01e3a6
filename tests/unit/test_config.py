"""agent.ini parsing: a valid file loads; every kind of error names file, section and key."""
import subprocess
import sys
from pathlib import Path

import pytest

import agent

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "agent.ini"
    path.write_text(text)
    return str(path)


def shipped():
    return (REPO / "agent.ini").read_text()


def test_shipped_config_loads_for_every_node():
    for name, role in (("pg1", "primary"), ("pg2", "standby"), ("arb", "arbiter")):
        cfg = agent.load_config(str(REPO / "agent.ini"), name)
        assert cfg.me.name == name and cfg.me.role == role
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg2")
    assert cfg.me.address == "192.168.56.12"
    assert cfg.arbiter.name == "arb" and cfg.other_db("pg2").name == "pg1"
    assert cfg.timing.failover_timeout == 1.5
    assert cfg.client_addresses == ("192.168.56.0/24",)


def test_a_config_without_timings_gets_the_shipped_ones(tmp_path):
    """The built-in defaults of [timing] are agent.ini's (the README's table), so a config
    that leaves a key out never mixes two sets; and the integration tests' copy of
    failover_timeout is agent.ini's too."""
    text = shipped()
    start, end = text.index("[timing]"), text.index("[postgres]")
    path = write(tmp_path, text[:start] + "[timing]\n\n" + text[end:])
    shipped_timing = agent.load_config(str(REPO / "agent.ini"), "pg1").timing
    assert agent.load_config(path, "pg1").timing == shipped_timing
    operate = (REPO / "tests" / "integration" / "test_operate.py").read_text()
    assert f"FAILOVER_TIMEOUT = {shipped_timing.failover_timeout}" in operate


def test_node_placeholder_in_paths(tmp_path):
    path = write(tmp_path, shipped().replace("data_dir = /var/lib/bobry/data",
                                             "data_dir = /lab/{node}/data"))
    assert agent.load_config(path, "pg2").data_dir == "/lab/pg2/data"


def error_of(tmp_path, text, node="pg1"):
    path = write(tmp_path, text)
    with pytest.raises(agent.ConfigError) as info:
        agent.load_config(path, node)
    message = str(info.value)
    assert message.startswith(path), message  # always names the file
    return message


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(agent.ConfigError, match="nope.ini.*cannot read"):
        agent.load_config(missing, "pg1")


def test_missing_key(tmp_path):
    text = shipped().replace("app_database = app\n", "")
    assert "[cluster] app_database: missing" in error_of(tmp_path, text)


def test_unknown_key(tmp_path):
    text = shipped().replace("[timing]\n", "[timing]\nfailover_timeuot = 3\n")
    assert "[timing] failover_timeuot: unknown key" in error_of(tmp_path, text)


def test_unknown_section(tmp_path):
    assert "[timings]: unknown section" in error_of(tmp_path, shipped() + "\n[timings]\n")


@pytest.mark.parametrize("old,new,expected", [
    ("check_interval = 0.1", "check_interval = fast", "[timing] check_interval: bad value 'fast'"),
    ("check_interval = 0.1", "check_interval = -1", "[timing] check_interval: bad value '-1'"),
    ("pg_port = 5432\nagent_port = 7400\nhttp_port = 8008\n\n[node pg2]",
     "pg_port = 99999\nagent_port = 7400\nhttp_port = 8008\n\n[node pg2]",
     "[node pg1] pg_port: bad value '99999'"),
    ("address = 192.168.56.12", "address = pg2.local", "[node pg2] address: bad value"),
    ("role = standby", "role = replica", "[node pg2] role: bad value 'replica'"),
    ("client_addresses = 192.168.56.0/24", "client_addresses = 192.168.56.0/33",
     "[cluster] client_addresses: bad value"),
])
def test_wrong_type(tmp_path, old, new, expected):
    assert old in shipped()
    assert expected in error_of(tmp_path, shipped().replace(old, new, 1))


def test_node_not_in_cluster(tmp_path):
    message = error_of(tmp_path, shipped(), node="pg3")
    assert "[node pg3]: no such node" in message and "arb, pg1, pg2" in message


def test_two_primaries(tmp_path):
    text = shipped().replace("role = standby", "role = primary")
    assert "role: exactly one node must have role primary" in error_of(tmp_path, text)


def test_timing_that_lets_the_standby_promote_before_the_fence(tmp_path):
    text = shipped().replace("failover_timeout = 1.5", "failover_timeout = 1.1")
    message = error_of(tmp_path, text)
    assert "[timing] failover_timeout" in message and "lease still holds" in message


def fast_checks(text, failover):
    """The shipped config with heartbeats so fast that only the clocks' allowance is left."""
    return (text.replace("check_interval = 0.1", "check_interval = 0.01")
            .replace("probe_timeout = 0.25", "probe_timeout = 0.01")
            .replace("failover_timeout = 1.5", f"failover_timeout = {failover}"))


def test_timing_without_room_for_the_hosts_clocks(tmp_path):
    # fence_timeout 1.0 + safety_margin 0.1 = 1.1 s: 1.12 s would close the port before the
    # grant on one clock, not with 1000 ppm between the hosts' clocks and two kernel timeouts
    # a jiffy late each (allowance 2 * 0.001 * 1.12 + 0.02 = 0.022 s)
    message = error_of(tmp_path, fast_checks(shipped(), 1.12))
    assert "[timing] failover_timeout" in message and "lease still holds" in message
    assert "1.122 s" in message and "for the hosts' clocks" in message
    # 1.13 s clears it, but leaves the promotion window (0.03 - 0.022 s) shorter than a
    # heartbeat (check_interval + probe_timeout = 0.02 s)
    message = error_of(tmp_path, fast_checks(shipped(), 1.13))
    assert "[timing] failover_timeout" in message and "decide_grant" in message
    path = write(tmp_path, fast_checks(shipped(), 1.15))
    assert agent.load_config(path, "pg1").timing.failover_timeout == 1.15


def test_timing_under_which_a_healthy_lease_would_lapse(tmp_path):
    text = shipped().replace("check_interval = 0.1", "check_interval = 1.0")
    assert "[timing] check_interval" in error_of(tmp_path, text)


def test_probe_timeout_not_shorter_than_fence_timeout(tmp_path):
    text = shipped().replace("probe_timeout = 0.25", "probe_timeout = 1.0").replace(
        "failover_timeout = 1.5", "failover_timeout = 5")
    assert "[timing] probe_timeout" in error_of(tmp_path, text)


def test_bad_config_exits_2_with_the_message(tmp_path):
    path = write(tmp_path, shipped().replace("role = arbiter", "role = witness"))
    result = subprocess.run([sys.executable, str(REPO / "agent.py"), "--config", path,
                             "--node", "pg1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{path}: [node arb] role: bad value 'witness'" in result.stderr


def test_the_nodes_keep_a_checkpoint_distance_of_wal_for_pg_rewind():
    """pg_rewind reads the replaced primary's WAL back from the last checkpoint before the
    divergence: wal_keep_size must cover a checkpoint distance at max_wal_size's default
    (1 GB / 1.9) and the WAL written alone before the fence (the bulk-load bench)."""
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg1")
    settings = agent.pg_settings(cfg, agent.View(1, "pg1", "pg2"))
    assert settings["wal_keep_size"] == "1GB" and "max_wal_size" not in settings
