"""The timing sweep's figures (tests/sim/sweep.py), from made-up records: what the jitter
profile counts, the failover times, one row of the table, and the table itself."""
import pytest

from tests.sim import sweep

T = sweep.timing(0.1, 0.2, 0.7, 0.15, 1.2)


def test_profile_counts_only_its_window_and_only_what_it_must_not_cause():
    events = [
        (5.0, "arb", "granted", {}),                       # before the window: not counted
        (12.0, "arb", "granted", {"primary": "pg2"}),
        (12.2, "pg2", "promoted", {}),
        (13.0, "pg1", "fenced", {"reason": "the lease lapsed"}),
        (14.0, "arb", "fenced", {}),                        # not a database node
        (15.0, "arb", "eligibility", {"eligible": None}),   # a sync drop
        (16.0, "arb", "eligibility", {"eligible": "pg2"}),  # back in sync: not a drop
        (31.0, "pg1", "fenced", {}),                        # after the window
    ]
    acks = [9.5, 10.5, 11.0, 14.0, 14.2, 29.0]
    f = sweep.profile_figures(events, acks, 10.0, 30.0)
    assert f == {"grants": 1, "promotions": 1, "fences": 1, "sync_drops": 1,
                 "longest_gap_s": 14.8, "acked": 5}


def test_profile_without_acknowledgements_has_no_gap():
    assert sweep.profile_figures([], [], 10.0, 30.0)["longest_gap_s"] is None


def test_failover_times_from_the_cut():
    acks = [(9.9, "pg1"), (10.05, "pg1"), (12.31, "pg2"), (12.4, "pg2")]
    events = [(8.0, "arb", "granted", {}), (12.1, "arb", "granted", {}),
              (12.2, "pg1", "promoted", {}), (12.25, "pg2", "promoted", {})]
    assert sweep.failover_figures(acks, events, 10.0, "pg2") == {
        "failover_s": 2.31, "granted_s": 2.1, "promoted_s": 2.25}


def test_failover_that_never_happened_is_none():
    assert sweep.failover_figures([(9.0, "pg1")], [], 10.0, "pg2") == {
        "failover_s": None, "granted_s": None, "promoted_s": None}
    assert sweep.failover_figures([], [], None, None)["failover_s"] is None  # no cut


def test_closest_approaches_of_the_samples():
    samples = [(0.5, 0.2, 0.1), (0.31, 1.05, None), (0.0, None, 0.4), (0.6, 0.3, 0.25)]
    assert sweep.closest_figures(samples) == {"lease_low_s": 0.0, "standby_silent_s": 1.05,
                                              "primary_silent_s": 0.4}
    assert sweep.closest_figures([]) == {"lease_low_s": None, "standby_silent_s": None,
                                         "primary_silent_s": None}


def run_of(**kw):
    return {"violation": None, "seed": 1, **kw}


def jitter_of(**kw):
    return run_of(**{"grants": 0, "fences": 0, "sync_drops": 0, "longest_gap_s": 0.71,
                     "pauses": 3, "lease_low_s": 0.3, "standby_silent_s": 0.5,
                     "primary_silent_s": 0.2, **kw})


def test_a_row_sums_the_profile_and_takes_median_and_worst_failover():
    jitter = [jitter_of(fences=1, longest_gap_s=0.9, pauses=20, lease_low_s=0.0,
                        standby_silent_s=0.8),
              jitter_of(grants=1, fences=2, sync_drops=1, longest_gap_s=2.5, pauses=21,
                        lease_low_s=0.25, primary_silent_s=1.1)]
    failovers = [run_of(failover_s=x, granted_s=x - 0.1) for x in (1.3, 1.2, 1.5)]
    probes = [run_of(failover_s=x, granted_s=None) for x in (3.1, 3.0)]
    faults = [run_of(grants=3, faults=40),
              run_of(grants=1, faults=30, violation=[7.5, "dual_rw", "both"], seed=4,
                     part="faults-fibers")]
    row = sweep.summarize("issue", T, jitter, failovers, faults, probes)
    assert row["timing"] == "0.1/0.2/0.7/0.15/1.2" and row["timing_arg"] == "0.1,0.2,0.7,0.15,1.2"
    assert (row["failover_median_s"], row["failover_worst_s"]) == (1.3, 1.5)
    assert (row["probe_median_s"], row["probe_worst_s"]) == (3.05, 3.1)
    assert row["grant_median_s"] == pytest.approx(1.2)
    assert (row["false_grants"], row["fences"], row["sync_drops"]) == (1, 3, 1)
    assert row["jitter_longest_gap_s"] == 2.5 and row["pauses"] == 41
    assert (row["lease_low_s"], row["standby_silent_s"], row["primary_silent_s"]) == \
        (0.0, 0.8, 1.1)
    assert row["margin_s"] == pytest.approx(0.0)  # a lease lapsed: no room left
    assert (row["fault_grants"], row["faults"]) == (4, 70)
    assert row["violations"] == 1
    assert row["violation_list"] == [("faults-fibers", 4, [7.5, "dual_rw", "both"])]


def test_the_margin_is_the_least_room_left_before_a_fence_a_drop_or_a_grant():
    def margin(**kw):
        return sweep.summarize("x", T, [jitter_of(**kw)], [], [])["margin_s"]
    assert margin() == pytest.approx(0.3)                         # the lease's 0.3 s left
    assert margin(standby_silent_s=1.05) == pytest.approx(0.15)   # 1.2 - 1.05
    assert margin(primary_silent_s=1.3) == pytest.approx(-0.1)    # a grant: past the bound
    assert sweep.summarize("x", T, [], [], [])["margin_s"] is None


def test_a_failover_that_did_not_happen_leaves_no_worst():
    failovers = [run_of(failover_s=1.3, granted_s=1.2), run_of(failover_s=None, granted_s=None)]
    row = sweep.summarize("x", T, [], failovers, [])
    assert row["failover_median_s"] == 1.3 and row["failover_worst_s"] is None
    assert (row["failovers"], row["failovers_done"]) == (2, 1)
    assert row["probe_median_s"] is None and row["probe_worst_s"] is None
    assert row["jitter_longest_gap_s"] is None and row["violations"] == 0


def test_table_lines_up_and_says_what_was_refused():
    row = sweep.summarize("issue", T, [jitter_of()], [run_of(failover_s=1.28, granted_s=1.2)],
                          [], [run_of(failover_s=3.09, granted_s=None)])
    refused = {"candidate": "bad", "timing": "0.2/0.3/1.2/0.2/1.3", "refused": "too short"}
    lines = sweep.format_table([row, refused])
    assert lines[0].startswith("candidate") and "failover median s" in lines[0]
    assert lines[1].split() == ["issue", "0.1/0.2/0.7/0.15/1.2", "1.28", "1.28", "3.09", "3.09",
                                "0", "0", "0", "0.30", "0.50", "0.20", "0.30", "0"]
    assert lines[0].index("violations") + len("violations") == len(lines[1])
    assert lines[2] == "bad  0.2/0.3/1.2/0.2/1.3  refused: too short"


def test_parse_timing():
    name, t = sweep.parse_timing("mine=0.1,0.2,0.7,0.15,1.2")
    assert name == "mine" and t == T
    assert sweep.parse_timing("g=0.1,0.2,0.7,0.15,1.2,8")[1].restart_grace == 8.0
    for bad in ("mine", "=0.1,0.2,0.7,0.15,1.2", "mine=0.1,0.2", "mine=a,b,c,d,e"):
        with pytest.raises(ValueError):
            sweep.parse_timing(bad)
