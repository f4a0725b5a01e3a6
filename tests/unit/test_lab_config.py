"""The embedded lab's agent.ini: the repository's, with the lab's addresses and directories, and
a timing sweep's overrides (BOBRY_LAB_TIMING) that the agent's own config check then judges."""
import pytest

import agent
from lab.backend import LabError
from lab.netns import TIMING_ENV, NetnsBackend


def rendered(tmp_path, monkeypatch, timing=None):
    if timing is not None:
        monkeypatch.setenv(TIMING_ENV, timing)
    lab = NetnsBackend(lab_dir=tmp_path)
    (tmp_path / "secrets").mkdir()
    path = tmp_path / "agent.ini"
    path.write_text(lab.render_config(tmp_path / "secrets"))
    return path


def test_without_overrides_the_lab_runs_the_repositorys_timings(tmp_path, monkeypatch):
    monkeypatch.delenv(TIMING_ENV, raising=False)
    cfg = agent.load_config(str(rendered(tmp_path, monkeypatch)), "pg1")
    assert (cfg.timing.fence_timeout, cfg.timing.failover_timeout) == (1.0, 1.5)


def test_a_sweep_candidate_replaces_the_timings_it_names(tmp_path, monkeypatch):
    path = rendered(tmp_path, monkeypatch, "check_interval=0.1, probe_timeout=0.2,"
                                           "fence_timeout=0.7,safety_margin=0.15,"
                                           "failover_timeout=1.2")
    timing = agent.load_config(str(path), "pg1").timing
    assert (timing.check_interval, timing.probe_timeout, timing.fence_timeout,
            timing.safety_margin, timing.failover_timeout) == (0.1, 0.2, 0.7, 0.15, 1.2)


def test_an_unknown_timing_key_is_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(LabError, match="fence_timout"):
        rendered(tmp_path, monkeypatch, "fence_timout=0.7")


def test_a_candidate_that_breaks_the_inequality_is_refused_by_the_agent(tmp_path, monkeypatch):
    path = rendered(tmp_path, monkeypatch, "fence_timeout=1.9")
    with pytest.raises(agent.ConfigError, match="fence_timeout"):
        agent.load_config(str(path), "pg1")
