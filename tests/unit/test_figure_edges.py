"""The edges of the experiments' figures and of the benchmark's verdict: a moment exactly at a
window's bound, an event of the wrong node or kind, a figure's rounding, a default argument.
Each test kills mutants that tests/mutation.py found alive (python tests/mutation.py metrics)."""
from lab import experiments as x
from lab.bench import missed_goals, summarize

ADDR = {"pg1": "10.0.0.1", "pg2": "10.0.0.2"}


def ev(t, node, event, **fields):
    return {"t": t, "node": node, "event": event, **fields}


def ack(i, t, server="pg1"):
    return {"id": i, "sent": t - 0.01, "ack": t, "server": ADDR[server]}


# -- the helpers -----------------------------------------------------------------------------

def test_first_event_is_the_earliest_of_that_node_kind_and_fields_from_since_on():
    events = [ev(5.0, "pg1", "fenced", term=2), ev(3.0, "pg2", "fenced", term=2),
              ev(4.0, "pg1", "fenced", term=1), ev(2.0, "pg1", "fenced", term=2),
              ev(6.0, "pg1", "fenced", term=2)]
    assert x.first_event(events, "fenced", "pg1", 2.0, term=2) == 2.0  # at since counts
    assert x.first_event(events, "fenced", "pg1", 2.5, term=2) == 5.0  # not pg2's, not term 1
    assert x.first_event(events, "fenced", "pg1", None) is None
    assert x.first_event(events, "promoted", "pg1", 0.0) is None


def test_count_events_from_since_on_and_of_the_nodes_named():
    events = [ev(1.0, "pg1", "fenced"), ev(1.0, "arb", "fenced"), ev(0.5, "pg1", "fenced"),
              ev(2.0, "pg2", "promoted")]
    assert x.count_events(events, "fenced", 1.0) == 2
    assert x.count_events(events, "fenced", 1.0, ("pg1", "pg2")) == 1


def test_seconds_since_needs_both_moments_and_keeps_milliseconds():
    assert x.seconds_since(100.12345, 100.0) == 0.123
    assert x.seconds_since(100.0, None) is None and x.seconds_since(None, 100.0) is None


def test_longest_silence_at_the_windows_bounds():
    # a gap that ends before the window, or exactly at its start, is not in it
    assert x.longest_silence([0, 10, 11, 12], 10.5) == (10, 11)
    assert x.longest_silence([0, 10, 10.5, 11], 10) == (10, 10.5)
    # the baseline may be exactly at start; one exactly at start is no answer after it
    assert x.longest_silence([10, 12], 10) == (10, 12)
    assert x.longest_silence([8, 10], 10, 12) is None
    # a window that ends in silence counts from the last acknowledgement up to its end
    assert x.longest_silence([0, 1, 2], 0.5, 5) == (2, 5)
    # a gap that starts exactly at the window's end is not in it
    assert x.longest_silence([0, 1, 5, 10], 0.5, 5) == (1, 5)


def test_longest_gap_keeps_milliseconds():
    assert x.longest_gap([0, 1.23456], 0.5) == 1.235


def test_slowest_minute_tps_edges():
    assert x.slowest_minute_tps([(10.5, 5)], 10, None) is None
    assert x.slowest_minute_tps([(10.5, 5)], 10, 10) is None  # an empty window
    assert x.slowest_minute_tps([(10.5, 5)], 10, 5) is None
    # a half-minute window is one minute, not two
    assert x.slowest_minute_tps([(t + 0.5, 60.0 if t < 15 else 0.0) for t in range(30)],
                                0, 30) == 30.0
    # the sample of the window's first second (about [start, start+1)) counts; one past the
    # end does not
    assert x.slowest_minute_tps([(0.5, 60.0), (60.5, 60.0)], 0, 60) == 1.0
    assert x.slowest_minute_tps([(100.5, 100.0)], 100, 160) == 1.67
    # 90 s: two minutes of 45 s, the second one empty
    assert x.slowest_minute_tps([(t + 0.5, 10.0) for t in range(100, 145)], 100, 190) == 0.0
    assert x.slowest_minute_tps([(t + 0.5, 10.0) for t in range(100, 190)], 100, 190) == 10.0


def test_tps_timeline_starts_three_seconds_before_the_cut_by_default():
    assert x.tps_timeline([(-5, 1.0), (0, 2.0)]) == [(-3, 0), (-2, 0), (-1, 0), (0, 2.0)]


def test_term_unchanged_needs_both_terms():
    assert x._term_unchanged(None, 1) is None and x._term_unchanged(1, None) is None
    assert x._term_unchanged(None, None) is None
    assert x._term_unchanged(1, 1) is True and x._term_unchanged(1, 2) is False


# -- failover ----------------------------------------------------------------------------------

CUT = 100.0
RECORDS = [ack(1, 99.8), ack(2, 100.0), ack(3, 103.1, "pg2"), ack(4, 103.2, "pg2")]
EVENTS = [ev(100.0, "pg1", "port_closed"), ev(100.0, "pg1", "fenced"),
          ev(102.0, "arb", "granted", primary="pg2", term=2),
          ev(102.2, "pg2", "promoted", term=2),
          ev(99.0, "pg1", "rejoined", divergence="before the cut"),
          ev(111.0, "pg2", "rejoined", divergence="not the old primary"),
          ev(111.5, "pg1", "rejoined", divergence="this one"),
          ev(112.5, "arb", "eligibility", primary="pg2", term=2, eligible="pg1")]


def failover(records=RECORDS, events=EVENTS, **kw):
    return x.failover_metrics(records, events, CUT, "pg1", "pg2", ADDR, [1, 2, 3, 4],
                              healed_at=110.0, tps=[(99.2, 50.0), (104.0, 40.0)],
                              create_table_ok=True, create_table_error=None,
                              old_primary_fenced=True, pgbench_restarts=2, **kw)


def test_failover_edges():
    f = failover()
    assert f["acked_by_old_primary_after_cut"] == 0  # an ack exactly at the cut is before it
    assert f["fenced_at_s"] == 0.0 and f["agent_fenced_at_s"] == 0.0  # events at the cut count
    assert f["divergence"] == "this one"
    assert f["tps"] == [[-1, 50.0], [4, 40.0]]
    assert f["create_table_error"] is None and f["pgbench_restarts"] == 2  # for the report
    assert f["ok"], f["failed_checks"]
    assert failover(events=[ev(100.0, "pg2", "rejoined", divergence="x"), *EVENTS])[
        "divergence"] == "this one"
    assert failover(events=[ev(100.0, "pg1", "rejoined", divergence="at the cut"), *EVENTS])[
        "divergence"] == "at the cut"


def test_failover_a_port_closed_at_the_moment_of_the_grant_is_not_before_it():
    events = [e for e in EVENTS if e["event"] != "port_closed"] + [
        ev(102.0, "pg1", "port_closed")]
    f = failover(events=events)
    assert f["fenced_before_grant"] is False and not f["ok"]


# -- standby loss ------------------------------------------------------------------------------

def standby_loss(records, tps, **kw):
    return x.standby_loss_metrics(records, [], 100.0, 108.0, "pg1", "pg2",
                                  [r["id"] for r in records], tps=tps, term_before=1,
                                  term_after=1, **kw)


def test_standby_loss_rate_defaults_to_pgbenchs_and_outage_keeps_milliseconds():
    records = [ack(1, 99.9), ack(2, 102.1234), *[ack(i, 100.0 + i) for i in range(3, 10)]]
    f = standby_loss(records, [(104.0, 49.0), (105.0, 49.0)])
    assert f["write_outage_s"] == 2.223  # 99.9 -> 102.1234
    assert "tps_after_resume=49.0 (want >= 50.0)" in f["failed_checks"]  # rate 100 by default
    assert (f["term_before"], f["term_after"]) == (1, 1)


def test_standby_loss_tps_after_resume_from_one_second_after_it_to_the_heal():
    records = [ack(1, 99.9), ack(2, 102.0), *[ack(i, 100.0 + i) for i in range(3, 10)]]
    # resumed at 102.0: the samples of 103.0 (not after 102 + 1) and 108.5 (after the heal)
    # do not count, nor the ones before the resumption
    tps = [(101.5, 1.0), (102.5, 1.0), (103.0, 1.0), (104.0, 80.0), (108.5, 1.0)]
    assert standby_loss(records, tps)["tps_after_resume"] == 80.0
    # writes never resumed: no figure, whatever pgbench printed
    assert standby_loss([ack(1, 99.9)], tps)["tps_after_resume"] is None


# -- switchover --------------------------------------------------------------------------------

def test_switchover_edges():
    records = [ack(1, 99.0), ack(2, 100.5)]  # pg1's last ack at the very moment of the handover
    events = [ev(100.5, "arb", "handover", primary="pg2", term=2),
              ev(101.0, "arb", "eligibility", primary="pg2", term=2, eligible="pg1")]
    f = x.switchover_metrics(records, events, 100.0, "pg1", "pg2", ADDR, [1, 2],
                             {"done": True, "reason": "handed over"})
    assert f["reason"] == "handed over" and f["acked_by_old_primary_after_handover"] == 0
    assert f["ok"], f["failed_checks"]
    one = x.switchover_metrics([ack(1, 100.6, "pg2")], events, 100.0, "pg1", "pg2", ADDR, [1],
                               {"done": True})
    assert one["acked"] == 1
    assert not [check for check in one["failed_checks"] if check.startswith("acked=")]


# -- jitter ------------------------------------------------------------------------------------

def jitter(records=(), events=(), tps=(), end=120.0):
    records = list(records) or [ack(i, 99.0 + i) for i in range(1, 23)]
    return x.jitter_metrics(records, list(events), 100.0, end, [r["id"] for r in records],
                            tps=list(tps), agent_pauses=1, term_before=1, term_after=1)


def test_jitter_counts_probe_failures_and_only_sync_drops_from_start_on():
    records = [ack(i, 99.0 + i) for i in range(1, 23)] + [{"id": 99, "error": "timeout"}]
    events = [ev(110.0, "arb", "eligibility", eligible="pg2"),  # back in sync: no drop
              ev(99.0, "arb", "eligibility", eligible=None),  # before the window
              ev(110.0, "pg2", "promoted"),  # no `eligible` field: not a drop
              ev(100.0, "arb", "eligibility", eligible=None)]  # at the start: a drop
    f = jitter(records, events)
    assert f["probe_failures"] == 1 and f["sync_drops"] == 1
    assert (f["term_before"], f["term_after"]) == (1, 1)


def test_jitter_median_tps_over_the_window_bounds_included():
    tps = [(99.0, 0.0), (100.0, 1.0), (110.0, 5.0), (120.0, 9.0), (121.0, 0.0)]
    assert jitter(tps=tps)["median_tps"] == 5.0
    assert jitter(tps=[(100.0, 7.0)], end=None)["median_tps"] is None  # no window: no figure


# -- pingpong ----------------------------------------------------------------------------------

def test_pingpong_keeps_the_rounds_asked_and_one_row_is_data():
    runs = [{"promotions": 1, "lost_acked": 0, "acked_by_old_primary_after_cut": 0,
             "failover_s": 3.0, "rejoined_s": 2.0, "failed_checks": []}]
    f = x.pingpong_metrics(runs, 1, (1, "c4ca"), (1, "c4ca"))
    assert f["rounds"] == 1 and f["rows"] == 1 and f["ok"], f["failed_checks"]
    assert f["rejoined_s"] == [2.0]


# -- the benchmark -----------------------------------------------------------------------------

USAGE = {"idle": {"primary": {"rss_mib": 30.0, "cpu_pct": 0.5}}, "trials": []}


def trial(failover_s=3.0, **kw):
    return {"failover_s": failover_s, "write_outage_s": 3.0, "fenced_at_s": 1.0,
            "granted_at_s": 2.0, "promoted_at_s": 2.2, "rejoined_s": 2.0, "lost_acked": 0,
            "promotions": 1, "fenced_before_grant": True, "ok": True, "failed_checks": [], **kw}


def test_a_goal_met_exactly_is_met():
    s = summarize("netns", "failover", 1, [trial(6.0)], USAGE)
    assert missed_goals(s, {"failover_s": {"max": 6.0}}) == []


def test_bench_summary_edges():
    s = summarize("netns", "failover", 3, [trial(1.23456), trial(2.0)], USAGE)
    assert not s["ok"]  # a trial missing
    assert s["failover_s"]["median"] == 1.617 and s["failover_s"]["min"] == 1.23456
    assert s["promotions"] == [1, 1]
    assert s["fenced_before_grant"] is True and s["fenced_before_promotion"] is True
    late = summarize("netns", "failover", 2, [trial(), trial(fenced_before_grant=False)],
                     USAGE)
    assert late["fenced_before_grant"] is False and late["fenced_before_promotion"] is False
    assert summarize("netns", "failover", 0, [], USAGE)["fenced_before_grant"] is False
