"""The chaos run's schedule and figures, without a lab (lab/chaos.py)."""
from lab import chaos

ADDR = {"pg1": "10.0.0.11", "pg2": "10.0.0.12", "arb": "10.0.0.13", "client": "10.0.0.20"}


def ack(i, t, host, tli):
    return {"id": i, "sent": t - 0.01, "ack": t, "server": ADDR[host], "tli": tli}


def test_the_schedule_is_the_seeds_alone():
    assert chaos.schedule(7, 3) == chaos.schedule(7, 3)
    assert chaos.schedule(7, 3) != chaos.schedule(8, 3)
    plan = chaos.schedule(7, 30)
    assert {kind for _, kind, _, _ in plan} == set(chaos.KINDS)
    assert all(b[0] >= a[0] + a[3] for a, b in zip(plan, plan[1:]))  # one at a time
    assert plan[-1][0] < 30 * 60


def test_a_clean_failover_is_no_dual_primary():
    acks = [ack(1, 10.0, "pg1", 1), ack(2, 11.0, "pg1", 1), ack(3, 14.0, "pg2", 2)]
    assert chaos.timeline_overlaps(acks, ADDR) == (0.0, [])


def test_an_old_timeline_acknowledging_after_the_new_one_is_dual_primary():
    acks = [ack(1, 10.0, "pg1", 1), ack(2, 14.0, "pg2", 2), ack(3, 15.5, "pg1", 1)]
    total, episodes = chaos.timeline_overlaps(acks, ADDR)
    assert total == 1.5 and episodes[0]["timelines"] == [1, 2]


def test_the_same_timeline_on_both_hosts_at_once_is_dual_primary():
    acks = [ack(1, 10.0, "pg1", 3), ack(2, 12.0, "pg1", 3), ack(3, 11.0, "pg2", 3),
            ack(4, 13.0, "pg2", 3)]
    assert chaos.timeline_overlaps(acks, ADDR)[0] == 1.0


def metrics(records, host_records=None, ids=None, converged_s=4.2, faults=None):
    faults = faults if faults is not None else [(1.0, "cut", ("pg1", "arb"), 2.0),
                                                (5.0, "kill_agent", "pg2", 1.0)]
    events = [{"t": 3.0, "node": "arb", "event": "granted"},
              {"t": 3.1, "node": "pg2", "event": "promoted"}]
    ids = ids if ids is not None else [r["id"] for r in records]
    return chaos.chaos_metrics(records, host_records or {}, events, 0.0, 100.0, ids, ADDR,
                               faults, converged_s, seed=5, minutes=3)


def test_a_good_run():
    f = metrics([ack(1, 1.0, "pg1", 1), ack(2, 5.0, "pg2", 2), {"id": 3, "error": "x"}])
    assert f["ok"], f["failed_checks"]
    assert f["faults_by_kind"] == {"cut": 1, "kill_agent": 1} and f["failovers"] == 1
    assert f["acked"] == 2 and f["acked_by_host"] == {"pg1": 1, "pg2": 1}


def test_a_lost_write_a_dual_primary_and_no_convergence_each_fail():
    records = [ack(1, 1.0, "pg1", 1), ack(2, 5.0, "pg2", 2)]
    assert metrics(records, ids=[2])["failed_checks"] == ["lost_acked=1 (want 0)"]
    host = {"pg1": [ack(-10, 6.0, "pg1", 1)]}
    f = metrics(records, host_records=host, ids=[1, 2, -10])
    assert f["dual_primary_s"] == 1.0 and not f["ok"]
    f = metrics(records, converged_s=None)
    assert f["failed_checks"] == ["converged=False (want True)"]


def test_no_write_or_no_fault_fails():
    assert not metrics([])["ok"]
    assert not metrics([ack(1, 1.0, "pg1", 1)], faults=[])["ok"]
