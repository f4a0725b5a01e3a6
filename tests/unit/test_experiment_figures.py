"""The failover experiment's figures, computed from made-up probe records and events; the
helpers every experiment's figures share; the load-and-faults skeleton (under_load)."""
import pytest

from lab import experiments
from lab.backend import LabError
from lab.experiments import failover_metrics, longest_gap, tps_timeline, verdict

ADDR = {"pg1": "10.0.0.1", "pg2": "10.0.0.2"}
CUT, HEAL = 100.0, 110.0


def ack(i, t, server):
    return {"id": i, "sent": t - 0.01, "ack": t, "server": ADDR[server]}


def ev(t, node, event, **fields):
    return {"t": t, "node": node, "event": event, **fields}


RECORDS = [ack(1, 99.8, "pg1"), ack(2, 99.9, "pg1"), {"id": 3, "sent": 100.0, "error": "x"},
           ack(4, 103.1, "pg2"), ack(5, 103.2, "pg2")]
EVENTS = [ev(50.0, "pg1", "port_closed"),  # before the cut: not this failover's
          ev(50.0, "pg1", "fenced"),
          ev(101.0, "pg1", "fenced"),
          ev(101.05, "pg1", "port_closed"),
          ev(102.0, "arb", "granted", primary="pg2", term=2, eligible=None),
          ev(102.2, "pg2", "promoted", term=2),
          ev(111.5, "pg1", "rejoined", divergence="diverged at 0/3000000"),
          ev(112.5, "arb", "eligibility", primary="pg2", term=2, eligible="pg1")]
SEEN = {"create_table_ok": True, "old_primary_fenced": True, "pgbench_restarts": 1}


def metrics(records=RECORDS, events=EVENTS, new_ids=(1, 2, 3, 4, 5), **seen):
    return failover_metrics(records, events, CUT, "pg1", "pg2", ADDR, list(new_ids),
                            healed_at=HEAL, **{**SEEN, **seen})


def test_figures_of_a_clean_failover():
    f = metrics()
    assert f["failover_s"] == 3.1
    assert f["write_outage_s"] == 3.2
    assert (f["acked"], f["lost_acked"], f["acked_by_old_primary_after_cut"]) == (4, 0, 0)
    assert (f["fenced_at_s"], f["agent_fenced_at_s"]) == (1.05, 1.0)
    assert (f["granted_at_s"], f["promoted_at_s"]) == (2.0, 2.2)
    assert f["fenced_before_grant"] is True and f["fenced_before_promotion"] is True
    assert f["promotions"] == 1
    assert f["rejoined_s"] == 2.5 and f["rejoined"]  # from the heal to the arbiter's record
    assert f["divergence"] == "diverged at 0/3000000"
    assert f["failed_checks"] == [] and f["ok"]


def test_lost_and_late_acks_are_counted():
    records = [ack(1, 99.9, "pg1"), ack(2, 100.3, "pg1"), ack(3, 104.0, "pg2")]
    f = metrics(records, [], new_ids=[1, 3])
    assert f["lost_acked"] == 1 and f["acked_by_old_primary_after_cut"] == 1
    assert f["promotions"] == 0 and f["promoted_at_s"] is None
    assert "lost_acked=1 (want 0)" in f["failed_checks"]
    assert "acked_by_old_primary_after_cut=1 (want 0)" in f["failed_checks"]


def test_an_ack_in_flight_at_the_cut_does_not_end_the_outage():
    records = [ack(1, 99.9, "pg1"), ack(2, 100.05, "pg1"), ack(3, 103.1, "pg2")]
    f = metrics(records)
    assert f["write_outage_s"] == 3.05  # not 0.15: the silence runs from 100.05 to 103.1
    assert f["acked_by_old_primary_after_cut"] == 1 and not f["ok"]


def test_no_write_on_the_new_primary():
    f = metrics([ack(1, 99.0, "pg1")], new_ids=[1])
    assert f["failover_s"] is None and f["write_outage_s"] is None
    assert "failover_s=None (not measured)" in f["failed_checks"]
    assert "write_outage_s=None (not measured)" in f["failed_checks"]
    assert not f["ok"]


def test_the_port_closed_after_the_grant_fails_even_before_the_promotion():
    events = [e for e in EVENTS if e["event"] != "port_closed"]
    events.append(ev(102.1, "pg1", "port_closed"))  # grant 102.0 < closed < promoted 102.2
    f = metrics(events=events)
    assert (f["fenced_at_s"], f["granted_at_s"], f["promoted_at_s"]) == (2.1, 2.0, 2.2)
    assert f["fenced_before_grant"] is False and f["fenced_before_promotion"] is False
    assert "fenced_before_grant=False (want True)" in f["failed_checks"] and not f["ok"]


def test_the_kernel_fence_counts_not_the_agents_word():
    """The agent logged its fence before the grant, but the kernel closed the port after it:
    the fence time is the kernel's."""
    events = [e for e in EVENTS if e["event"] != "port_closed"]
    events.append(ev(102.5, "pg1", "port_closed"))
    f = metrics(events=events)
    assert f["agent_fenced_at_s"] == 1.0 and f["fenced_at_s"] == 2.5
    assert f["fenced_before_grant"] is False and not f["ok"]


def test_a_fence_the_lab_did_not_see_fails():
    """Only the agent's word (or nothing): fenced_at_s is None and the check fails."""
    f = metrics(events=[e for e in EVENTS if e["event"] != "port_closed"])
    assert f["fenced_at_s"] is None and f["agent_fenced_at_s"] == 1.0
    assert f["fenced_before_grant"] is False
    assert "fenced_at_s=None (not measured)" in f["failed_checks"] and not f["ok"]


def test_no_grant_fails():
    f = metrics(events=[e for e in EVENTS if e["event"] != "granted"])
    assert f["granted_at_s"] is None and f["fenced_before_grant"] is False
    assert "granted_at_s=None (not measured)" in f["failed_checks"] and not f["ok"]


def test_rejoined_counts_from_the_heal_and_needs_the_arbiters_record():
    f = metrics(events=[e for e in EVENTS if e["event"] != "eligibility"])
    assert f["rejoined_s"] is None and not f["rejoined"]
    assert "rejoined_s=None (not measured)" in f["failed_checks"] and not f["ok"]
    before_heal = [*EVENTS[:-1], ev(109.0, "arb", "eligibility", eligible="pg1")]
    assert metrics(events=before_heal)["rejoined_s"] is None  # not after this heal


def test_what_the_experiment_did_not_see_fails():
    f = failover_metrics(RECORDS, EVENTS, CUT, "pg1", "pg2", ADDR, [1, 2, 3, 4, 5],
                         healed_at=HEAL)
    assert f["create_table_ok"] is None and f["old_primary_fenced"] is None
    assert "create_table_ok=None (want True)" in f["failed_checks"]
    assert "old_primary_fenced=None (want True)" in f["failed_checks"]
    unhealed = failover_metrics(RECORDS, EVENTS, CUT, "pg1", "pg2", ADDR, [1, 2, 3, 4, 5],
                                **SEEN)
    assert unhealed["rejoined_s"] is None and not unhealed["ok"]


def test_nothing_recorded_fails():
    f = failover_metrics([], [], CUT, "pg1", "pg2", ADDR, [], healed_at=HEAL, **SEEN)
    assert f["acked"] == 0 and "acked=0 (want > 0)" in f["failed_checks"]
    for key in ("failover_s", "write_outage_s", "fenced_at_s", "granted_at_s",
                "promoted_at_s", "rejoined_s"):
        assert f[key] is None and f"{key}=None (not measured)" in f["failed_checks"]
    assert not f["ok"]


# -- shared helpers --------------------------------------------------------------------------
def test_tps_timeline_shows_the_seconds_without_samples():
    tps = [[-2, 105], [-1, 105], [0, 112], [1, 0], [2, 0], [9, 0], [10, 104], [10, 3],
           [11, 98], [14, 100]]
    timeline = tps_timeline(tps)
    assert [s for s, _ in timeline] == list(range(-2, 13))
    assert dict(timeline)[10] == 107  # two runs of pgbench in one second
    assert [dict(timeline)[s] for s in range(3, 9)] == [0] * 6  # the hole
    assert dict(timeline)[12] == 0  # the next sample is at +14: +12 is a hole too


def test_tps_timeline_of_a_hole_past_the_end():
    timeline = tps_timeline([[-3, 100], [0, 100], [1, 100], [20, 100]])
    assert timeline[-1] == (12, 0) and len(timeline) == 16
    assert tps_timeline([]) == []


def test_longest_gap_over_a_window():
    times = [1.0, 2.0, 2.1, 5.0, 5.1, 9.0]
    assert longest_gap(times, 2.05) == 3.9  # 5.1 -> 9.0
    assert longest_gap(times, 2.05, end=5.05) == 2.9  # 2.1 -> 5.0
    assert longest_gap([1.0, 2.0], 1.5, end=6.0) == 4.0  # silent until the window's end
    assert longest_gap([3.0, 4.0], 2.0) is None  # nothing before the start: no baseline
    assert longest_gap([1.0, 2.0], 2.0) is None  # nothing after the start


def test_an_unmeasured_figure_fails_a_bound():
    f = verdict({"gap": None, "tps": 0, "n": 3}, at_most={"gap": 5}, above={"tps": 0},
                at_least={"n": 3})
    assert f["failed_checks"] == ["gap=None (not measured)", "tps=0 (want > 0)"]
    assert not f["ok"]
    assert verdict({"gap": 5.0}, at_most={"gap": 5})["ok"]


# -- under_load -------------------------------------------------------------------------------
class FakeLoad:
    def __init__(self, backend, path, **options):
        self.calls, self.rate = backend.calls, 100

    def prepare(self):
        pass

    def start(self):
        self.calls.append(f"start {type(self).__name__}")

    def stop(self):
        self.calls.append(f"stop {type(self).__name__}")


class Probe(FakeLoad):
    pass


class Pgbench(FakeLoad):
    pass


class Path(str):
    def __truediv__(self, name):
        return Path(f"{self}/{name}")


class FakeBackend:
    def __init__(self, offsets=None):
        self.calls = []
        self.offsets = offsets or {"pg1": (0.0, 0.0), "client": (0.0012, 0.0003)}

    def clock_offsets(self):
        return self.offsets

    def pause_agent(self, host, seconds):
        self.calls.append(f"pause {host} {seconds}")

    def wait_until(self, what, predicate, timeout, progress=None):
        return "pg1"

    def primary_with_sync_standby(self):
        return "pg1"

    def work_dir(self, name):
        return Path(f"/tmp/{name}")

    def host_status(self, host):
        return {"view": {"term": 3}}

    def signal_agent(self, host, signame):
        self.calls.append(f"{signame} {host}")

    def heal(self):
        self.calls.append("heal")


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr(experiments, "Probe", Probe)
    monkeypatch.setattr(experiments, "Pgbench", Pgbench)
    return FakeBackend()


def test_under_load_cleans_up_after_an_error(backend):
    with pytest.raises(RuntimeError), \
            experiments.under_load(backend, lambda *a, **k: None, "x") as run:
        assert (run.primary, run.standby, run.term_before) == ("pg1", "pg2", 3)
        run.pause("pg2")
        raise RuntimeError("the experiment failed half-way")
    assert backend.calls == ["start Probe", "start Pgbench", "STOP pg2", "CONT pg2", "heal",
                             "stop Probe", "stop Pgbench"]
    assert run.healed_at is not None


def test_under_load_resumes_only_the_agents_still_paused(backend):
    with experiments.under_load(backend, lambda *a, **k: None, "x") as run:
        run.pause("pg1")
        run.resume("pg1")
        run.pause("arb")
    assert backend.calls == ["start Probe", "start Pgbench", "STOP pg1", "CONT pg1",
                             "STOP arb", "CONT arb", "heal", "stop Probe", "stop Pgbench"]


def test_under_load_measures_the_clocks_first(backend):
    with experiments.under_load(backend, lambda *a, **k: None, "x") as run:
        pass
    assert run.clock_offsets_ms == {"pg1": 0.0, "client": 1.2}


def test_an_experiment_refuses_clocks_more_than_50_ms_apart(backend):
    backend.offsets = {"pg1": (0.0, 0.0), "arb": (-0.051, 0.001)}
    with pytest.raises(LabError, match="clocks too far apart"), \
            experiments.under_load(backend, lambda *a, **k: None, "x"):
        pass
    assert backend.calls == []  # nothing started


def test_a_pause_is_the_backends_one_command(backend):
    with experiments.under_load(backend, lambda *a, **k: None, "x") as run:
        run.pause_for("arb", 0.5)
    assert "pause arb 0.5" in backend.calls


def test_the_report_shows_the_clock_offsets():
    f = experiments.verdict({"clock_offsets_ms": {"pg1": 0.0, "client": -1.5}})
    lines = experiments._lines("t", [], f)
    assert "clock offsets (ms)" in lines[1] and "client -1.5" in lines[1]


def test_the_failover_report_names_the_load():
    assert experiments._load_rows({}, "pg1") == [("pgbench rate", "100 tps"),
                                                 ("write probe's commit deadline", "1.0 s")]
    rows = experiments._load_rows({"pgbench_rate": 0, "bulk_mb": 1024, "bulk_mb_at_cut": 512.3,
                                   "bulk_mb_written_alone": 40.1, "probe_deadline_s": 0.7},
                                  "pg1")
    assert rows == [("pgbench rate", "unthrottled"),
                    ("write probe's commit deadline", "0.7 s"),
                    ("bulk load", "1024 MiB in one transaction: 512.3 MiB of WAL at the cut, "
                                  "40.1 MiB more on pg1 alone")]


def test_pgbench_unthrottled_has_no_rate_limit():
    from lab import load

    class Client:
        client_pgpass = "/p"

        def dsn(self):
            return "host=pg1,pg2"

    assert "-R 100" in " ".join(load.Pgbench(Client(), "/log").argv)
    assert "-R" not in load.Pgbench(Client(), "/log", rate=0).argv[-1]
    # a session its client lost mid-transaction must not hold the branch row for good
    assert "PGOPTIONS=-c idle_in_transaction_session_timeout=5s" in \
        load.Pgbench(Client(), "/log").argv
