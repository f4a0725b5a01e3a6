"""The review's findings that the embedded lab can produce, each named after its finding
(issue "Close every known path…"). "Fenced" is judged from the network: the lab's port
watcher (lab/portwatch.py, on a host that faults never cut) records when each database port
stops taking connections, whatever the agents say or whether they are alive."""
import subprocess
import time

import pytest

from labtest import client_write, eventually


def first(lab, kind, node, since):
    """Wall-clock time of the first `kind` event of `node` at or after `since`, or None."""
    times = [e["t"] for e in lab.events()
             if e["event"] == kind and e["node"] == node and e["t"] >= since]
    return min(times) if times else None


def wait_for(lab, kind, node, since, timeout=30):
    return eventually(lambda: first(lab, kind, node, since), timeout)


def closed_before_the_grant(lab, since):
    """pg1's port closed (seen from the network) before the arbiter granted pg2 a term."""
    granted = wait_for(lab, "granted", "arb", since)
    closed = first(lab, "port_closed", "pg1", since)
    assert closed is not None, "pg1's port never closed"
    assert closed < granted, f"pg1 closed {closed - since:.2f} s after the fault, the grant " \
                             f"came at {granted - since:.2f} s"
    return closed - since, granted - since


def primaries_taking_clients(lab):
    return [s["node"] for s in lab.status()
            if s.get("pg") == "primary" and s.get("fenced") is False]


# -- 2. the arbiter's probe of the primary's PostgreSQL, and a dead primary agent -------------

def test_finding2_arbiter_probe_sees_the_primarys_postgres_while_its_agent_is_stopped(lab):
    probe = eventually(lambda: (lab.host_status("arb").get("probe") or {}).get("ok_age_s")
                       is not None and lab.host_status("arb")["probe"], 10)
    assert probe["target"] == "pg1" and probe["error"] is None
    lab.signal_agent("pg1", "STOP")  # shorter than fence_timeout: the lease still holds
    try:
        time.sleep(0.5)
        probe = lab.host_status("arb")["probe"]
    finally:
        lab.signal_agent("pg1", "CONT")
    assert probe["error"] is None and probe["ok_age_s"] < 0.45, probe


@pytest.mark.parametrize("cut", [False, True], ids=["no_cut", "isolated"])
def test_finding2_dead_primary_agent_is_fenced_by_the_kernel_then_replaced(lab, cut):
    """The primary's agent dies (with or without a cut): no one extends its lease, the kernel
    closes its port, and only then may the standby be promoted; restarted, it rejoins."""
    since = time.time()
    if cut:
        lab.isolate("pg1")
    lab.signal_agent("pg1", "KILL")
    closed, granted = closed_before_the_grant(lab, since)
    t = lab.config("pg1").timing  # the lease: fence_timeout + safety_margin after a peer
    assert closed < t.fence_timeout + t.safety_margin + t.check_interval + t.probe_timeout, \
        closed  # last heard pg1, which was at most a heartbeat before the fault
    wait_for(lab, "promoted", "pg2", since)
    client_write(lab, "create table t(i int); insert into t values (1)", timeout=30)
    lab.heal()
    lab.start_agent("pg1")
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg2", 90)
    assert primaries_taking_clients(lab) == ["pg2"]


# -- 3. a restarted agent forgets how long it has been cut off ---------------------------------

def test_finding3_primary_agent_restarted_during_a_partition_is_fenced_before_the_grant(lab):
    t = lab.config("pg1").timing
    since = time.time()
    lab.isolate("pg1")
    time.sleep(0.3)
    lab.signal_agent("pg1", "KILL")
    # a supervisor's restart delay: back after the lease lapsed, before the standby's grant
    time.sleep((t.fence_timeout + t.safety_margin + t.failover_timeout) / 2 - 0.3)
    lab.start_agent("pg1")
    closed_before_the_grant(lab, since)
    wait_for(lab, "promoted", "pg2", since)
    assert lab.host_status("pg1")["fenced"] is True


# -- 6. the fence can be skipped or come late: a frozen agent -----------------------------------

def test_finding6_frozen_primary_agent_is_fenced_by_the_kernel_before_the_grant(lab):
    since = time.time()
    lab.isolate("pg1")
    lab.signal_agent("pg1", "STOP")
    try:
        time.sleep(5.0)
        closed, granted = closed_before_the_grant(lab, since)
        print(f"frozen, isolated primary: port closed at +{closed:.2f} s, "
              f"grant at +{granted:.2f} s")
    finally:
        lab.signal_agent("pg1", "CONT")
    wait_for(lab, "promoted", "pg2", since)
    lab.heal()
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg2", 90)


# -- 8. one-way faults --------------------------------------------------------------------------

ONE_WAY = [[("pg1", "pg2")], [("pg2", "pg1")], [("pg1", "arb")], [("arb", "pg1")],
           [("pg2", "arb")], [("arb", "pg2")], [("pg1", "pg2"), ("pg1", "arb")],
           [("pg2", "pg1"), ("arb", "pg1")]]


@pytest.mark.parametrize("cuts", ONE_WAY, ids=["+".join(f"{a}-x->{b}" for a, b in c)
                                               for c in ONE_WAY])
def test_finding8_one_way_faults_keep_one_writable_primary(lab, cuts):
    """New connections dropped in one direction only: the cluster either keeps pg1 writing
    or fails over; there is a writable primary, and never two."""
    since = time.time()
    for a, b in cuts:
        lab.cut(a, b, one_way=True)
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline:
        assert len(primaries_taking_clients(lab)) <= 1
        time.sleep(0.5)
    client_write(lab, f"create table t{int(since)}(i int); insert into t{int(since)} values (1)",
                 timeout=20)
    assert len(primaries_taking_clients(lab)) == 1
    if first(lab, "promoted", "pg2", since) is not None:  # a failover: fenced first
        closed_before_the_grant(lab, since)


# -- 9. strict_sync is forgotten after a failover ------------------------------------------------

def test_finding9_strict_sync_new_primary_waits_for_the_old_one_at_once(strict_lab):
    since = time.time()
    strict_lab.isolate("pg1")
    wait_for(strict_lab, "promoted", "pg2", since)
    [[names]] = strict_lab.sql("pg2", "show synchronous_standby_names")
    assert names == "pg1"
    # a commit on the new primary waits for pg1, which is cut off: never acknowledged
    with pytest.raises(subprocess.TimeoutExpired):
        strict_lab.client_sql("create table t(i int)", timeout=8)


# -- 10. the agent port under abuse ---------------------------------------------------------------

def test_finding10_failover_works_while_the_agents_ports_are_flooded(lab):
    """1000 connections from the client host (silent ones, garbage, 10 MB lines, nested JSON)
    at the arbiter's and the standby's agent ports while the primary is isolated: the failover
    happens as always, fenced first, and the agents stay up and log the drops."""
    floods = [lab.flood("client", target, seconds=15.0) for target in ("arb", "pg2")]
    try:
        time.sleep(2.0)
        since = time.time()
        lab.isolate("pg1")
        closed, granted = closed_before_the_grant(lab, since)
        assert granted < 6.0, granted
        wait_for(lab, "promoted", "pg2", since)
    finally:
        for flood in floods:
            flood.proc.wait(40)
    assert lab.agent_pid("arb") and lab.agent_pid("pg2")
    log = lab.read_file("arb", f"{lab.config('arb').log_dir}/agent.log")
    assert "dropped (too many connections)" in log and log.count("dropped (") < 200
