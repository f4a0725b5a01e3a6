"""Issue 2: the agent builds primary + synchronous standby + arbiter in the embedded lab."""
import os
import subprocess

import pytest

from labtest import client_write, eventually


def test_up_gives_primary_sync_standby_and_arbiter(lab):
    status = {s["node"]: s for s in lab.status()}
    assert status["pg1"]["pg"] == "primary" and status["pg1"]["agent"] == "up"
    assert status["pg2"]["pg"] == "standby" and status["pg2"]["receiver"] == "streaming"
    assert status["arb"]["agent"] == "up" and status["arb"]["view"]["primary"] == "pg1"
    [rep] = status["pg1"]["replication"]
    assert (rep["standby"], rep["state"], rep["sync_state"]) == ("pg2", "streaming", "sync")
    # the replication role can replicate but is no superuser
    [[superuser, replication]] = lab.sql("pg1", "select rolsuper, rolreplication from pg_roles "
                                                "where rolname = 'replicator'")
    assert (superuser, replication) == ("f", "t")
    # the guard route exists while the lab does
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True,
                            text=True).stdout
    assert "10.89.0.0/24" in routes


def test_row_written_through_the_multi_host_string_reaches_the_standby(lab):
    server = client_write(lab, "create table t(i int); insert into t values (42); "
                               "select inet_server_addr()")
    assert server.splitlines()[-1] == lab.addresses["pg1"]
    assert eventually(lambda: lab.sql("pg2", "select i from t") == [["42"]], 10)


def test_commit_waits_for_the_synchronous_standby(strict_lab):
    """strict_sync: the primary never stops waiting (by default it does, once the arbiter has
    recorded the standby as not in sync: tests/integration/test_healing.py)."""
    lab = strict_lab
    client_write(lab, "create table t(i int)")
    lab.cut("pg1", "pg2")
    with pytest.raises(subprocess.TimeoutExpired):  # a client-side timeout, never
        lab.client_sql("insert into t values (1)", timeout=3)  # statement_timeout
    waiting = lab.sql("pg1", "select count(*) from pg_stat_activity where wait_event = 'SyncRep'")
    assert waiting == [["1"]]
    assert lab.sql("pg2", "select count(*) from t") == [["0"]]
    lab.heal("pg1", "pg2")
    # committed locally on pg1, so once the standby is back it has the row
    assert eventually(lambda: lab.sql("pg2", "select count(*) from t") == [["1"]], 30)


@pytest.mark.parametrize("signame", ["TERM", "KILL"])
def test_agent_restart_keeps_data_and_roles(lab, signame):
    client_write(lab, "create table t(i int); insert into t values (7)")
    postmasters = {h: lab.sql(h, "select pg_postmaster_start_time()") for h in ("pg1", "pg2")}
    for host in ("pg1", "pg2", "arb"):
        lab.signal_agent(host, signame)
        assert lab.agent_pid(host) is None
        lab.start_agent(host)
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg1", 20)
    status = {s["node"]: s for s in lab.status()}
    assert status["pg1"]["pg"] == "primary" and status["pg2"]["pg"] == "standby"
    assert all(s["agent"] == "up" and s["view"]["term"] == 1 for s in status.values())
    assert lab.sql("pg2", "select i from t") == [["7"]]
    # PostgreSQL was adopted, not restarted, re-initialised or re-cloned
    assert {h: lab.sql(h, "select pg_postmaster_start_time()") for h in ("pg1", "pg2")} \
        == postmasters
    kinds = [e["event"] for e in lab.events()]
    assert kinds.count("initdb") == 1 and kinds.count("basebackup") == 1
    client_write(lab, "insert into t values (8)")  # and the cluster still takes writes


def test_down_leaves_nothing_behind(lab):
    pids = {h: lab.agent_pid(h) for h in ("pg1", "pg2", "arb")}
    data_dirs = [lab.config(h).data_dir for h in ("pg1", "pg2")]
    lab.down()
    lab.down()  # twice is fine
    assert not lab.exists()
    assert "bobry" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout
    assert "10.89.0.0/24" not in subprocess.run(["ip", "route", "show", "type", "unreachable"],
                                                capture_output=True, text=True).stdout
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    postmasters = subprocess.run(["pgrep", "-a", "-x", "postgres"], capture_output=True,
                                 text=True).stdout
    assert not any(d in postmasters for d in data_dirs)
    assert not lab.lab_dir.exists()
