"""The failover experiment's figures, computed from a made-up probe record and event log."""
from lab.experiments import failover_metrics

ADDR = {"pg1": "10.0.0.1", "pg2": "10.0.0.2"}
CUT = 100.0


def ack(i, t, server):
    return {"id": i, "sent": t - 0.01, "ack": t, "server": ADDR[server]}


def test_figures_of_a_clean_failover():
    records = [ack(1, 99.8, "pg1"), ack(2, 99.9, "pg1"), {"id": 3, "sent": 100.0, "error": "x"},
               ack(4, 103.1, "pg2"), ack(5, 103.2, "pg2")]
    events = [{"t": 50.0, "node": "pg1", "event": "fenced"},  # before the cut: not this one
              {"t": 101.0, "node": "pg1", "event": "fenced"},
              {"t": 102.0, "node": "arb", "event": "granted"},
              {"t": 102.2, "node": "pg2", "event": "promoted"}]
    f = failover_metrics(records, events, CUT, "pg1", "pg2", ADDR, new_ids=[1, 2, 3, 4, 5])
    assert f["failover_s"] == 3.1
    assert f["write_outage_s"] == 3.2
    assert (f["acked"], f["lost_acked"], f["acked_by_old_primary_after_cut"]) == (4, 0, 0)
    assert (f["fenced_at_s"], f["granted_at_s"], f["promoted_at_s"]) == (1.0, 2.0, 2.2)
    assert f["promotions"] == 1


def test_lost_and_late_acks_are_counted():
    records = [ack(1, 99.9, "pg1"), ack(2, 100.3, "pg1"), ack(3, 104.0, "pg2")]
    f = failover_metrics(records, [], CUT, "pg1", "pg2", ADDR, new_ids=[1, 3])
    assert f["lost_acked"] == 1 and f["acked_by_old_primary_after_cut"] == 1
    assert f["promotions"] == 0 and f["promoted_at_s"] is None


def test_no_write_on_the_new_primary():
    f = failover_metrics([ack(1, 99.0, "pg1")], [], CUT, "pg1", "pg2", ADDR, new_ids=[1])
    assert f["failover_s"] is None and f["write_outage_s"] is None
