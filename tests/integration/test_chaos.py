"""Three minutes of chaos in the embedded lab (lab/chaos.py) with a fixed seed: random faults
under load, and the figures that must hold whatever the faults were."""
from lab import chaos

SEED = 3  # every kind of fault within the 3 minutes, the primary isolated and paused


def test_chaos_three_minutes(lab):
    f = chaos.chaos(lab, lambda *a, **k: None, minutes=3.0, seed=SEED)
    print(chaos.report(f))
    assert f["faults"] >= 10, f["faults_by_kind"]
    assert f["acked"] > 0
    assert f["lost_acked"] == 0
    assert f["dual_primary_s"] == 0, f["dual_primary_episodes"]
    assert f["converged"], "not back to primary + synchronous standby within 60 s"
    assert f["ok"], f["failed_checks"]
