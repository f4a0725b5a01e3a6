"""The figures and verdicts of the standby-loss, switchover, jitter and pingpong experiments,
computed from made-up probe records, pgbench samples and events."""
from lab.experiments import (
    jitter_metrics,
    pingpong_metrics,
    standby_loss_metrics,
    switchover_metrics,
)

ADDR = {"pg1": "10.0.0.1", "pg2": "10.0.0.2"}


def acks(first_id, start, stop, server="pg1", step=0.1):
    """A probe record every `step` s from start up to (not including) stop."""
    n = round((stop - start) / step)
    return [{"id": first_id + i, "sent": round(start + i * step, 3) - 0.01,
             "ack": round(start + i * step, 3), "server": ADDR[server]} for i in range(n)]


def ids(records):
    return [r["id"] for r in records if "ack" in r]


def ev(t, node, event, **fields):
    return {"t": t, "node": node, "event": event, **fields}


# -- standby-loss: cut at 100, healed at 108 -----------------------------------------------------
CUT, HEAL = 100.0, 108.0
# the last ack before the cut at 99.9; one in flight at the cut, acked at 100.05; then writes
# wait for the standby until the arbiter drops it (102.2) and resume at 102.3
SL_RECORDS = [*acks(1, 97.0, 100.0), {"id": 31, "sent": 99.99, "ack": 100.05,
                                      "server": ADDR["pg1"]},
              *acks(32, 102.3, 110.0)]
SL_EVENTS = [ev(102.2, "arb", "eligibility", primary="pg1", term=1, eligible=None),
             ev(109.9, "arb", "eligibility", primary="pg1", term=1, eligible="pg2")]
SL_TPS = [(t, 0 if t in (101.0, 102.0) else 100) for t in range(97, 110)]


def standby_loss(records=SL_RECORDS, events=SL_EVENTS, tps=SL_TPS, present=None, **kw):
    kw = {"term_before": 1, "term_after": 1, **kw}
    return standby_loss_metrics(records, events, CUT, HEAL, "pg1", "pg2",
                                ids(records) if present is None else present, tps=tps,
                                rate=100, **kw)


def test_standby_loss_clean():
    f = standby_loss()
    assert f["write_outage_s"] == 2.25 and f["writes_resumed"]
    assert f["standby_dropped_at_s"] == 2.2
    assert f["resync_s"] == 1.9 and f["resynced"]
    assert f["tps_after_resume"] == 100
    assert (f["promotions"], f["fences"], f["ports_closed"], f["lost_acked"]) == (0, 0, 0, 0)
    assert f["term_unchanged"] is True
    assert f["failed_checks"] == [] and f["ok"]


def test_standby_loss_an_ack_in_flight_at_the_cut_is_no_short_outage():
    """last before the cut 99.9, first after it 100.05: not a 0.15 s outage."""
    assert standby_loss()["write_outage_s"] == 2.25


def test_standby_loss_outage_over_the_bound_fails():
    records = [*acks(1, 97.0, 100.0), *acks(40, 105.5, 110.0)]
    f = standby_loss(records)
    assert f["write_outage_s"] == 5.6
    assert "write_outage_s=5.6 (want <= 5.0)" in f["failed_checks"] and not f["ok"]


def test_standby_loss_writes_that_never_resume_fail():
    f = standby_loss(acks(1, 97.0, 100.0), tps=[])
    assert f["write_outage_s"] is None and not f["writes_resumed"]
    assert f["tps_after_resume"] is None and not f["ok"]


def test_standby_loss_writes_silent_until_the_heal_did_not_resume():
    f = standby_loss([*acks(1, 97.0, 100.0), *acks(40, 100.1, 101.0)])
    assert f["write_outage_s"] == 7.1  # 100.9 until the heal at 108
    assert not f["writes_resumed"] and not f["ok"]


def test_standby_loss_slow_primary_after_the_resume_fails():
    f = standby_loss(tps=[(t, 20) for t in range(97, 110)])
    assert f["tps_after_resume"] == 20
    assert "tps_after_resume=20 (want >= 50.0)" in f["failed_checks"] and not f["ok"]


def test_standby_loss_without_data_fails():
    f = standby_loss_metrics([], [], CUT, HEAL, "pg1", "pg2", [])
    assert f["acked"] == 0 and f["write_outage_s"] is None and f["tps_after_resume"] is None
    assert f["standby_dropped_at_s"] is None and f["resync_s"] is None
    assert f["term_unchanged"] is None  # the terms were not read
    for check in ("acked=0 (want > 0)", "write_outage_s=None (not measured)",
                  "tps_after_resume=None (not measured)", "resync_s=None (not measured)",
                  "standby_dropped_at_s=None (not measured)", "term_unchanged=None (want True)"):
        assert check in f["failed_checks"]
    assert not f["ok"]


def test_standby_loss_promotion_fence_or_new_term_fails():
    for event, check in ((ev(103.0, "pg2", "promoted"), "promotions=1 (want 0)"),
                         (ev(103.0, "pg1", "fenced"), "fences=1 (want 0)"),
                         (ev(103.0, "pg1", "port_closed"), "ports_closed=1 (want 0)")):
        f = standby_loss(events=[*SL_EVENTS, event])
        assert check in f["failed_checks"] and not f["ok"]
    f = standby_loss(term_after=2)
    assert f["term_unchanged"] is False and not f["ok"]


def test_standby_loss_lost_ack_fails():
    f = standby_loss(present=ids(SL_RECORDS)[1:])
    assert f["lost_acked"] == 1 and not f["ok"]


# -- switchover: requested at 100, the arbiter hands over at 100.5 ------------------------------
SW_RECORDS = [*acks(1, 97.0, 100.3), *acks(100, 100.6, 104.0, server="pg2")]
SW_EVENTS = [ev(100.2, "pg1", "fenced"), ev(100.5, "arb", "handover", primary="pg2", term=2),
             ev(101.4, "pg1", "rejoined", divergence="x"),
             ev(102.0, "arb", "eligibility", primary="pg2", term=2, eligible="pg1")]
DONE = {"done": True, "reason": "pg2 is the primary of term 2"}


def switchover(records=SW_RECORDS, events=SW_EVENTS, answer=DONE):
    return switchover_metrics(records, events, 100.0, "pg1", "pg2", ADDR, ids(records), answer)


def test_switchover_clean_and_rejoined_from_the_handover():
    f = switchover()
    assert f["handover_at_s"] == 0.5
    assert f["write_outage_s"] == 0.4  # 100.2 -> 100.6
    assert f["acked_by_old_primary_after_handover"] == 0 and f["lost_acked"] == 0
    assert f["rejoined_s"] == 1.5  # from the handover, not from the request or a later wait
    assert f["failed_checks"] == [] and f["ok"]


def test_switchover_old_primary_acking_after_the_handover_fails():
    records = [*SW_RECORDS, {"id": 999, "sent": 100.6, "ack": 100.7, "server": ADDR["pg1"]}]
    f = switchover(records)
    assert f["acked_by_old_primary_after_handover"] == 1 and not f["ok"]


def test_switchover_without_the_arbiters_events_fails():
    f = switchover(events=[])
    assert f["handover_at_s"] is None and f["rejoined_s"] is None
    assert f["acked_by_old_primary_after_handover"] is None  # not 0: it could not be counted
    assert "acked_by_old_primary_after_handover=None (want 0)" in f["failed_checks"]
    assert not f["ok"]
    f = switchover(events=SW_EVENTS[:-1])
    assert f["rejoined_s"] is None and not f["rejoined"] and not f["ok"]


def test_switchover_refused_fails():
    f = switchover(acks(1, 97.0, 104.0), [], {"done": False, "reason": "not in sync"})
    assert "done=False (want True)" in f["failed_checks"] and not f["ok"]


# -- jitter: degraded from 100 to 220 (two minutes) ----------------------------------------------
J_START, J_END = 100.0, 220.0
J_RECORDS = acks(1, 97.0, 225.0)
J_TPS = [(float(t), 9.0) for t in range(98, 224)]


def jitter(records=J_RECORDS, events=(), tps=J_TPS, **kw):
    kw = {"agent_pauses": 8, "term_before": 1, "term_after": 1, **kw}
    return jitter_metrics(records, list(events), J_START, J_END, ids(records), tps=tps, **kw)


def test_jitter_clean():
    f = jitter()
    assert f["longest_ack_gap_s"] == 0.1 and f["median_tps"] == 9.0
    assert f["slowest_minute_tps"] == 9.0
    assert f["failed_checks"] == [] and f["ok"]


def test_jitter_without_data_fails():
    f = jitter_metrics([], [], J_START, J_END, [])
    assert f["acked"] == 0 and f["median_tps"] is None and f["longest_ack_gap_s"] is None
    assert f["slowest_minute_tps"] == 0  # no sample in a minute is no progress in it
    for check in ("acked=0 (want > 0)", "median_tps=None (not measured)",
                  "longest_ack_gap_s=None (not measured)", "slowest_minute_tps=0.0 (want > 0)",
                  "agent_pauses=0 (want > 0)", "term_unchanged=None (want True)"):
        assert check in f["failed_checks"]
    assert not f["ok"]


def test_jitter_a_minute_without_pgbench_progress_fails():
    tps = [(t, 0.0 if 160 < t <= 220 else v) for t, v in J_TPS]  # the second minute
    f = jitter(tps=tps)
    assert f["median_tps"] > 0 and f["slowest_minute_tps"] == 0
    assert not f["ok"]


def test_jitter_long_gap_fails():
    records = [r for r in J_RECORDS if not 150.0 < r["ack"] < 155.5]
    f = jitter(records)
    assert f["longest_ack_gap_s"] == 5.5
    assert "longest_ack_gap_s=5.5 (want <= 5.0)" in f["failed_checks"] and not f["ok"]


def test_jitter_sync_drop_fence_promotion_or_new_term_fails():
    for event, check in (
            (ev(150.0, "arb", "eligibility", eligible=None), "sync_drops=1 (want 0)"),
            (ev(150.0, "pg1", "fenced"), "fences=1 (want 0)"),
            (ev(150.0, "pg1", "port_closed"), "ports_closed=1 (want 0)"),
            (ev(150.0, "arb", "granted", primary="pg2"), "grants=1 (want 0)"),
            (ev(150.0, "pg2", "promoted"), "promotions=1 (want 0)")):
        f = jitter(events=[event])
        assert check in f["failed_checks"] and not f["ok"]
    assert not jitter(events=[ev(99.0, "pg1", "port_closed")])["ports_closed"]  # before it
    f = jitter(term_after=2)
    assert "term_unchanged=False (want True)" in f["failed_checks"] and not f["ok"]


# -- pingpong ----------------------------------------------------------------------------------
def round_figures(failed=()):
    return {"promotions": 1, "lost_acked": 0, "acked_by_old_primary_after_cut": 0,
            "failover_s": 3.1, "rejoined_s": 2.5, "failed_checks": list(failed)}


def test_pingpong_clean():
    f = pingpong_metrics([round_figures(), round_figures()], 2, (40, "abc"), (40, "abc"))
    assert (f["promotions"], f["rows"], f["checksum"], f["data_equal"]) == (2, 40, "abc", True)
    assert f["failover_s"] == [3.1, 3.1] and f["ok"]


def test_pingpong_failures():
    runs = [round_figures(), round_figures()]
    assert not pingpong_metrics(runs, 2, (40, "abc"), (39, "abd"))["ok"]
    unread = pingpong_metrics(runs, 2, None, None)  # could not read the rows
    assert unread["data_equal"] is False and unread["rows"] is None and not unread["ok"]
    assert not pingpong_metrics(runs, 2, (0, ""), (0, ""))["ok"]  # no data
    assert not pingpong_metrics(runs[:1], 2, (40, "abc"), (40, "abc"))["ok"]  # a round missing
    f = pingpong_metrics([round_figures(["rejoined_s=None (not measured)"]), round_figures()],
                         2, (40, "abc"), (40, "abc"))
    assert f["round_failures"] == {1: ["rejoined_s=None (not measured)"]} and not f["ok"]
