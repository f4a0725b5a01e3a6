"""Issue 3: one scenario per rule, in the embedded lab, with real PostgreSQL, real TCP
timeouts and real iptables. Timings are asserted with generous bounds; the safety properties
(who promoted, how often, who is fenced) exactly."""
import time

import pytest

from lab import experiments
from labtest import client_write, eventually

# long enough for any decision: failover_timeout (1.5 s) + a grant + a promotion, more than
# three times
QUIET = 7.0


def events_since(lab, t, kind=None):
    return [e for e in lab.events() if e["t"] >= t and (kind is None or e["event"] == kind)]


def promoted(lab, since):
    return eventually(lambda: events_since(lab, since, "promoted"), 30)


def assert_no_failover(lab, since):
    """Nothing promoted, nothing granted, pg1 still the primary of term 1 and unfenced."""
    assert events_since(lab, since, "promoted") == []
    assert events_since(lab, since, "granted") == []
    status = {s["node"]: s for s in lab.status()}
    assert status["pg1"]["pg"] == "primary" and status["pg2"]["pg"] == "standby"
    view = status["arb"]["view"]
    assert (view["term"], view["primary"]) == (1, "pg1")


def test_rule1_and_5_isolated_primary_fails_over(lab):
    """M isolated: M fences itself first, S is promoted once, no acknowledged write is lost,
    the old primary acknowledged nothing after the cut and stays fenced after the heal."""
    f = experiments.failover(lab, lambda *a, **k: None, settle=2.0)
    assert f["promotions"] == 1
    assert f["lost_acked"] == 0 and f["acked"] > 20
    assert f["acked_by_old_primary_after_cut"] == 0
    assert f["create_table_ok"], f["create_table_error"]
    assert f["fenced_before_grant"], f  # the port closed (seen from the network) first
    assert f["old_primary_fenced"]
    assert f["failover_s"] <= 6  # tells working from broken; the benchmark owns the goal
    view = lab.host_status("arb")["view"]
    assert (view["term"], view["primary"]) == (2, "pg2")


def test_rule4_primary_standby_link_cut_alone(lab):
    since = time.time()
    lab.cut("pg1", "pg2")
    time.sleep(QUIET)
    assert_no_failover(lab, since)
    assert lab.host_status("arb")["view"]["eligible"] is None  # so pg2 can never be promoted
    assert not lab.host_status("pg1")["fenced"]  # pg1 still sees the arbiter
    lab.heal()
    client_write(lab, "create table t(i int); insert into t values (1)", timeout=30)


def pg2_decision(lab):
    return (lab.host_status("pg2").get("decision") or {}).get("reason", "")


# The network alone keeps a request from reaching the arbiter in these scenarios, so each also
# checks the standby's own decision: with the rule's branch gone, pg2 would decide otherwise.
@pytest.mark.parametrize("fault,decision", [
    (("isolate", "pg2"), "but arb is unreachable too"),  # rule 2
    (("isolate", "arb"), "following pg1"),
    (("cut", "pg2", "arb"), "following pg1, the primary of term 1 (seen"),  # rule 3
], ids=["rule2_standby_isolated", "arbiter_isolated", "rule3_standby_loses_arbiter_primary_fine"])
def test_no_failover_and_no_fence_while_the_primary_is_fine(lab, fault, decision):
    since = time.time()
    getattr(lab, fault[0])(*fault[1:])
    time.sleep(QUIET)
    assert decision in pg2_decision(lab)
    assert_no_failover(lab, since)
    assert events_since(lab, since, "fenced") == []  # pg1 still sees one of its peers
    assert events_since(lab, since, "port_closed") == []
    client_write(lab, "create table t(i int); insert into t values (1)", timeout=30)


def test_primary_postgres_stopped_fails_over_and_is_not_restarted_as_primary(lab):
    since = time.time()
    assert lab.stop_pg("pg1").returncode == 0
    [event] = promoted(lab, since)
    assert event["node"] == "pg2"
    client_write(lab, "create table t(i int); insert into t values (1)", timeout=30)
    # pg1's agent never restarts it as a primary: it rewinds it and starts it as a standby
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg2", 60)
    assert lab.host_status("pg1")["pg"] == "standby"
    assert events_since(lab, since, "restarted") == []
    assert len(events_since(lab, since, "promoted")) == 1
    assert lab.sql("pg1", "select count(*) from t") == [["1"]]


def test_rule8_primary_agent_restarts_postgres_only_with_the_arbiters_consent(lab):
    """pg2 cannot take over (its agent is stopped), pg1's PostgreSQL is down and its agent
    restarts: after restart_grace it asks the arbiter and starts PostgreSQL as primary."""
    since = time.time()
    lab.signal_agent("pg2", "TERM")
    lab.signal_agent("pg1", "TERM")
    assert lab.stop_pg("pg1").returncode == 0
    lab.start_agent("pg1")
    eventually(lambda: events_since(lab, since, "restarted"), 30)
    log = lab.read_file("arb", f"{lab.config('arb').log_dir}/agent.log")
    assert "resume from pg1: granted" in log
    assert lab.host_status("pg1")["pg"] == "primary"
    lab.start_agent("pg2")
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg1", 30)
    assert events_since(lab, since, "promoted") == []


def test_rule8_primary_restart_waits_restart_grace_and_needs_the_arbiter(lab):
    """No failover possible (pg2's agent stopped) and pg1's PostgreSQL down: pg1 leaves the
    failover restart_grace, and then restarts it only once the arbiter answers."""
    since = time.time()
    lab.signal_agent("pg2", "TERM")
    lab.cut("pg1", "arb")
    assert lab.stop_pg("pg1").returncode == 0
    stopped = time.time()
    grace = lab.config("pg1").timing.restart_grace
    time.sleep(grace + 3.0)
    assert events_since(lab, since, "restarted") == []  # the arbiter cannot be asked
    assert lab.host_status("pg1")["pg"] == "down"
    lab.heal()
    [restart] = eventually(lambda: events_since(lab, since, "restarted"), 30)
    assert restart["t"] - stopped >= grace
    lab.start_agent("pg2")
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg1", 30)
    assert events_since(lab, since, "promoted") == []


def test_rule8_resume_refused_after_a_failover(lab):
    """pg1 down and pg2 promoted meanwhile: the arbiter refuses pg1's resume, which rejoins."""
    since = time.time()
    lab.signal_agent("pg1", "TERM")
    assert lab.stop_pg("pg1").returncode == 0
    promoted(lab, since)
    lab.start_agent("pg1")
    assert eventually(lambda: lab.primary_with_sync_standby() == "pg2", 60)
    assert events_since(lab, since, "restarted") == []
    assert lab.host_status("pg1")["pg"] == "standby"


def test_rule8_standby_agent_killed_inside_the_failover_window(lab):
    since = time.time()
    lab.isolate("pg1")
    time.sleep(1.0)
    lab.signal_agent("pg2", "KILL")
    lab.start_agent("pg2")
    [event] = promoted(lab, since)
    time.sleep(QUIET)
    assert len(events_since(lab, since, "promoted")) == 1
    assert len(events_since(lab, since, "granted")) == 1
    assert event["node"] == "pg2" and event["term"] == 2


def test_rule8_arbiter_killed_while_primary_isolated_no_double_grant(lab):
    since = time.time()
    lab.isolate("pg1")
    time.sleep(1.0)
    lab.signal_agent("arb", "KILL")
    time.sleep(2.0)
    lab.start_agent("arb")
    promoted(lab, since)
    lab.signal_agent("arb", "KILL")  # and again, after the grant: the term is durable
    lab.signal_agent("pg2", "KILL")
    lab.start_agent("arb")
    lab.start_agent("pg2")
    time.sleep(QUIET)
    assert len(events_since(lab, since, "granted")) == 1
    assert len(events_since(lab, since, "promoted")) == 1
    view = lab.host_status("arb")["view"]
    assert (view["term"], view["primary"]) == (2, "pg2")


def test_rule6_replaced_primary_takes_no_write_from_the_heal_until_it_is_a_standby(lab):
    """After a failover under load, the heal makes the old primary reachable again: from then
    until it runs as a standby its port never takes a client (seen from the network) and it
    acknowledges nothing."""
    with experiments.under_load(lab, lambda *a, **k: None, "rule6") as run:
        time.sleep(2.0)
        cut_at = lab.isolate("pg1")
        promoted(lab, cut_at)
        eventually(lambda: any(r.get("server") == lab.addresses["pg2"]
                               for r in experiments.acked(run.records())), 30)
        lab.heal()
        healed = time.time()
        eventually(lambda: events_since(lab, healed, "rejoined"), 60)
        time.sleep(2.0)
        records = run.records()
    [rejoined] = [e["t"] for e in events_since(lab, healed, "rejoined") if e["node"] == "pg1"]
    opened = [e["t"] for e in events_since(lab, cut_at, "port_open") if e["node"] == "pg1"]
    assert all(t > rejoined for t in opened), (opened, rejoined)
    late = [r for r in experiments.acked(records)
            if r["ack"] > cut_at and r["server"] == lab.addresses["pg1"]]
    assert late == []


def test_rule6_fenced_primary_unfences_when_the_arbiter_confirms(lab):
    """pg1 loses both peers and fences itself; pg2 cannot be promoted (its agent is paused);
    once pg1 hears from the arbiter again, it unfences and takes writes."""
    since = time.time()
    lab.signal_agent("pg2", "STOP")
    try:
        lab.isolate("pg1")
        eventually(lambda: events_since(lab, since, "fenced"), 10)
        assert lab.host_status("pg1")["fenced"]
        lab.heal()
        eventually(lambda: events_since(lab, since, "unfenced"), 10)
    finally:
        lab.signal_agent("pg2", "CONT")
    assert not lab.host_status("pg1")["fenced"]
    client_write(lab, "create table t(i int); insert into t values (1)", timeout=30)
    time.sleep(3)
    assert events_since(lab, since, "promoted") == []


def test_rule7_a_degraded_network_neither_fences_nor_promotes(lab):
    """One minute of the jitter experiment (the README's figure is five): 5 % loss into every
    host, a bandwidth cap on the primary, 0.5 s SIGSTOP pauses of each agent in turn."""
    f = experiments.jitter(lab, lambda *a, **k: None, minutes=1.0, every=12.0)
    assert f["promotions"] == 0 and f["fences"] == 0 and f["lost_acked"] == 0, f
    assert f["agent_pauses"] == 4 and f["acked"] > 100  # the faults and the load really ran
    assert lab.primary_with_sync_standby() == "pg1"
