"""The benchmark's verdict: every trial's checks, no figure missing, and each median and worst
case within the goal printed next to it."""
from lab.bench import report, summarize


def failover_trial(failover_s=1.9, rejoined_s=2.5, **kw):
    figures = {"failover_s": failover_s, "write_outage_s": 3.2, "fenced_at_s": 1.0,
               "granted_at_s": 2.0, "promoted_at_s": 2.2, "rejoined_s": rejoined_s,
               "lost_acked": 0, "promotions": 1, "fenced_before_grant": True, "ok": True,
               "failed_checks": []}
    return {**figures, **kw}


LIGHT = {"rss_mib": 30.0, "cpu_pct": 0.6}  # an agent within the footprint goals
USAGE = {"idle": {"primary": LIGHT, "standby": LIGHT, "arbiter": LIGHT},
         "trials": [{"primary at the start": {"rss_mib": 31.0, "cpu_pct": 4.0}}]}


def bench(*runs, what="failover", trials=None, usage=USAGE):
    return summarize("netns", what, len(runs) if trials is None else trials, list(runs), usage)


def test_goals_met():
    s = bench(failover_trial(1.8), failover_trial(2.0), failover_trial(2.9))
    assert s["failover_s"]["median"] == 2.0 and s["failover_s"]["max"] == 2.9
    assert s["failed_goals"] == [] and s["ok"] and s["fenced_before_grant"]
    text = report(s)
    assert "failover_s" in text and "median <= 2.00, max <= 3.00" in text
    assert "verdict: OK" in text


def test_a_median_over_its_goal_fails():
    s = bench(failover_trial(2.1), failover_trial(2.2), failover_trial(1.5))
    assert s["failed_goals"] == ["failover_s median 2.10 s > 2.00 s"] and not s["ok"]
    assert "goal missed: failover_s median 2.10 s > 2.00 s" in report(s)


def test_a_worst_case_over_its_goal_fails():
    s = bench(failover_trial(1.5), failover_trial(1.6), failover_trial(3.1))
    assert s["failover_s"]["median"] == 1.6  # the median is fine
    assert s["failed_goals"] == ["failover_s max 3.10 s > 3.00 s"] and not s["ok"]


def test_a_median_rejoin_over_its_goal_fails():
    s = bench(failover_trial(rejoined_s=5.5), failover_trial(rejoined_s=5.1))
    assert s["failed_goals"] == ["rejoined_s median 5.30 s > 5.00 s"] and not s["ok"]


def test_missing_values_fail():
    s = bench(failover_trial(None), failover_trial(1.8), failover_trial(1.9))
    assert s["failover_s"]["missing"] == 1
    assert s["failed_goals"] == ["failover_s: not measured in 1 of 3 trials"] and not s["ok"]
    assert "(1 missing)" in report(s)
    s = bench(failover_trial(None))
    assert "failover_s median: not measured (goal <= 2.00 s)" in s["failed_goals"]
    assert not s["ok"]


def test_no_trial_or_a_failed_trial_fails():
    assert not bench()["ok"]
    assert not bench(failover_trial(), trials=2)["ok"]  # a trial did not finish
    failed = failover_trial(ok=False, failed_checks=["lost_acked=1 (want 0)"])
    s = bench(failover_trial(), failed)
    assert s["failed_goals"] == [] and not s["ok"]
    assert "trial 2: lost_acked=1 (want 0)" in report(s)


def test_switchover_and_standby_loss_goals():
    def trial(outage, rejoin, rejoin_key):
        return {"write_outage_s": outage, rejoin_key: rejoin, "lost_acked": 0, "ok": True,
                "failed_checks": []}

    assert bench(trial(0.3, 1.5, "rejoined_s"), what="switchover")["ok"]
    s = bench(trial(2.5, 1.5, "rejoined_s"), trial(2.1, 1.5, "rejoined_s"), what="switchover")
    assert s["failed_goals"] == ["write_outage_s median 2.30 s > 2.00 s"]
    s = bench(trial(2.2, 1.9, "resync_s"), trial(5.2, 1.9, "resync_s"),
              trial(2.3, 1.9, "resync_s"), what="standby-loss")
    assert s["failed_goals"] == ["write_outage_s max 5.20 s > 5.00 s"] and not s["ok"]
    assert "median <= 5.00, max <= 5.00" in report(s)


def test_the_agents_footprint_is_judged_and_printed():
    s = bench(failover_trial())
    assert s["ok"] and s["footprint"]["during"] == {
        "primary at the start": {"rss_mib": 31.0, "cpu_pct": 4.0}}  # busy in a failover: fine
    text = report(s)
    assert "idle          arbiter                   RSS  30.0 MiB   CPU  0.60 %" in text
    heavy = {"idle": {**USAGE["idle"], "standby": {"rss_mib": 41.0, "cpu_pct": 1.5}},
             "trials": [{"arbiter at the start": {"rss_mib": 40.5, "cpu_pct": 9.0}}]}
    s = bench(failover_trial(), usage=heavy)
    assert s["failed_goals"] == ["agent RSS of the standby 41.0 MiB > 40 MiB",
                                 "agent RSS of the arbiter at the start 40.5 MiB > 40 MiB",
                                 "idle agent CPU of the standby 1.50 % > 1 % of a core"]
    assert not s["ok"]
    s = bench(failover_trial(), usage={"idle": {}, "trials": []})
    assert s["failed_goals"] == [f"idle agent footprint of the {role}: not measured"
                                 for role in ("arbiter", "primary", "standby")]
    assert not s["ok"]


def test_a_role_whose_footprint_was_not_measured_fails_the_goals():
    """An agent that restarted during the idle sample (another pid) has no figures: the goals
    are not met by its absence."""
    idle = {"primary": LIGHT, "arbiter": LIGHT}
    s = bench(failover_trial(), usage={"idle": idle, "trials": USAGE["trials"]})
    assert s["failed_goals"] == ["idle agent footprint of the standby: not measured"]
    assert not s["ok"]
