"""Report folders from made-up records: the markdown names the figures and the verdict, the
picture is written, the timeline orders the events relative to the fault, `lab report`
draws a folder again from its raw files."""
import json

import pytest

from lab import cli, report
from lab.backend import LabError
from lab.experiments import failover_metrics

ADDR = {"pg1": "10.0.0.1", "pg2": "10.0.0.2"}
CUT, HEAL = 1000.0, 1012.0


def ack(i, t, server):
    return {"id": i, "sent": t - 0.01, "ack": t, "server": ADDR[server]}


def ev(t, node, event, **fields):
    return {"t": t, "node": node, "event": event, **fields}


RECORDS = ([ack(i, CUT - 3 + i * 0.1, "pg1") for i in range(1, 31)]
           + [{"id": 31, "sent": CUT + 0.1, "error": "OperationalError: timeout"},
              {"id": 32, "sent": CUT + 1.2, "error": "OperationalError: timeout"}]
           + [ack(i, CUT + 3.1 + (i - 33) * 0.1, "pg2") for i in range(33, 120)])
EVENTS = [ev(CUT + 1.05, "pg1", "port_closed", why="ConnectionRefusedError"),
          ev(CUT + 1.0, "pg1", "fenced", reason="no round trip", term=1),
          ev(CUT + 2.0, "arb", "granted", primary="pg2", term=2, eligible=None),
          ev(CUT + 2.2, "pg2", "promoted", term=2),
          ev(HEAL + 1.5, "pg1", "rejoined", primary="pg2", term=2,
             divergence="servers diverged at WAL location 0/3000000 on timeline 1"),
          ev(HEAL + 2.5, "arb", "eligibility", primary="pg2", term=2, eligible="pg1")]
TPS = [(CUT + s, 0.0 if 1 <= s <= 8 else 100.0) for s in range(-3, 13) if s not in (4, 5)]


def failover_result(**changes):
    figures = failover_metrics(RECORDS, EVENTS, CUT, "pg1", "pg2", ADDR,
                               [r["id"] for r in RECORDS], healed_at=HEAL, tps=TPS,
                               create_table_ok=True, old_primary_fenced=True,
                               pgbench_restarts=1)
    return {"backend": "netns", "old_primary": "pg1", "new_primary": "pg2", "cut_at": CUT,
            "healed_at": HEAL, **figures, **changes}


def figures_json(**changes):
    return {"experiment": "failover", "addresses": ADDR, "load_started_at": CUT - 3.2,
            **failover_result(**changes)}


def test_marks_of_a_failover_in_time_order():
    assert report.marks(figures_json()) == [
        ("cut", "cut: pg1 isolated", 0.0), ("fence", "fence: pg1's port closed", 1.05),
        ("grant", "grant: arb names pg2", 2.0), ("promotion", "pg2 promoted", 2.2),
        ("heal", "heal", 12.0), ("rejoin", "pg1 rejoined", 14.5)]


def test_a_moment_not_measured_is_not_marked():
    kinds = [m[0] for m in report.marks(figures_json(granted_at_s=None))]
    assert "grant" not in kinds and "promotion" in kinds


def test_markdown_lists_the_figures_the_moments_and_the_verdict():
    text = report.markdown(figures_json(), "the text report", png="failover.png")
    assert "**Verdict: OK**" in text
    assert "![failover: acknowledged writes and pgbench tps over time](failover.png)" in text
    assert "| `failover_s` | 3.1 |" in text and "| `lost_acked` | 0 |" in text
    assert "| `promotions` | 1 |" in text and "| `fenced_before_grant` | True |" in text
    assert "| fence: pg1's port closed | +1.05 |" in text
    assert "| pg1 rejoined | +14.50 |" in text
    assert "the text report" in text and "timeline.txt" in text
    assert "| `tps` |" not in text  # drawn, not listed


def test_markdown_of_a_failed_run_names_its_failed_checks():
    f = figures_json(ok=False, failed_checks=["lost_acked=2 (want 0)"], lost_acked=2)
    text = report.markdown(f, png=None, png_error="matplotlib is not installed")
    assert "**Verdict: FAILED: lost_acked=2 (want 0)**" in text
    assert "- lost_acked=2 (want 0)" in text
    assert "(no picture: matplotlib is not installed)" in text and "![" not in text


def test_timeline_orders_events_and_shows_times_relative_to_the_cut():
    text = report.timeline_text(figures_json(), EVENTS, RECORDS)
    lines = text.splitlines()
    body = [line for line in lines if line.strip().startswith(("+", "-"))]
    times = [float(line.split()[0]) for line in body]
    assert times == sorted(times)
    assert "relative to the cut" in lines[0]
    [fenced] = [line for line in body if " fenced " in line]
    [closed] = [line for line in body if "port_closed" in line]
    assert fenced.startswith("   +1.000 s  pg1") and "reason=no round trip" in fenced
    assert closed.startswith("   +1.050 s  pg1") and body.index(fenced) < body.index(closed)
    assert any(line.startswith("   +0.000 s  lab    cut") for line in body)
    assert any(line.startswith("  +12.000 s  lab    heal") for line in body)
    # the probe's runs: pg1 acked before, two failures, pg2 from +3.1 on
    assert any(line.startswith("   -2.900 s  client writes_acked    by=pg1 count=30")
               for line in body)
    assert any("writes_failed" in line and "count=2" in line for line in body)
    assert any(line.startswith("   +3.100 s  client writes_acked    by=pg2 count=87")
               for line in body)


def test_timeline_without_origin_shows_the_wall_clock():
    [line] = report.timeline_lines([ev(1700000000.25, "arb", "granted", primary="pg2")])
    assert line.split()[0].endswith(".250") and line.split()[0].count(":") == 2
    assert "arb" in line and "granted" in line and "primary=pg2" in line


def test_event_details_are_cut_to_width():
    details = report.event_details(ev(1.0, "pg1", "rejoined", divergence="x" * 200), width=20)
    assert details == "divergence=" + "x" * 19 + "…"


def test_probe_events_one_per_run_of_outcomes():
    events = report.probe_events(RECORDS, ADDR)
    assert [(e["event"], e.get("by"), e.get("count")) for e in events] == [
        ("writes_acked", "pg1", 30), ("last_ack", "pg1", None),
        ("writes_failed", None, 2), ("writes_acked", "pg2", 87), ("last_ack", "pg2", None)]
    assert events[2]["ids"] == "31-32" and events[2]["error"] == "OperationalError: timeout"


def test_label_rows_keep_overlapping_labels_apart():
    # labels at 0, 1, 2.2 and 12, each 1.5 wide: 0 and 2.2 share a row, 1 does not
    rows = report.label_rows([0, 1, 2.2, 12], [1.5, 1.5, 1.5, 1.5])
    assert rows == [0, 1, 0, 0]
    assert report.label_rows([1, 0], [10, 2]) == [1, 0]  # by position, not by order given


def test_tps_by_second_shows_holes_as_zero():
    assert report.tps_by_second([(10.0, 100), (11.0, 90), (14.0, 80)], 10.0) == [
        (0, 100), (1, 90), (2, 0), (3, 0), (4, 80)]


def test_the_png_is_written_and_not_empty(tmp_path):
    path = report.plot(figures_json(), RECORDS, TPS, tmp_path / "failover.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_save_writes_the_folder_and_render_draws_it_again(tmp_path):
    folder = report.save(tmp_path / "failover-1", "failover", failover_result(), RECORDS, TPS,
                         [ev(CUT - 100, "pg1", "initdb")] + EVENTS, ADDR, CUT - 3.2)
    names = {p.name for p in folder.iterdir()}
    assert names == {"figures.json", "probe.jsonl", "tps.jsonl", "events.jsonl",
                     "timeline.txt", "failover.png", "report.md"}
    saved = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert saved == EVENTS  # only from the load on
    assert json.loads((folder / "figures.json").read_text())["failover_s"] == 3.1
    for name in ("timeline.txt", "failover.png", "report.md"):
        (folder / name).unlink()
    assert cli.main(["report", str(folder)]) == 0
    md = (folder / "report.md").read_text()
    assert "](failover.png)" in md and "**Verdict: OK**" in md
    assert "first write acked by pg2" in md  # the text report, as printed
    assert (folder / "failover.png").stat().st_size > 0 and (folder / "timeline.txt").exists()


def test_lab_report_on_a_folder_without_records_fails(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a report folder" in capsys.readouterr().err


def test_a_benchmark_folder_links_its_trials(tmp_path):
    for i in (1, 2):
        report.save(tmp_path / f"trial-0{i}", "failover", failover_result(), RECORDS, TPS,
                    EVENTS, ADDR, CUT - 3.2)
    report.save_summary(tmp_path, "Failover benchmark (netns lab), 2 trials",
                        {"ok": True, "figures": ["failover_s", "rejoined_s"]},
                        "the summary as printed")
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: OK**" in md and "the summary as printed" in md
    assert "| run | failover_s | rejoined_s | verdict | report |" in md
    assert "| trial-01 | 3.1 | 2.5 | OK | [trial-01/report.md](trial-01/report.md) |" in md
    assert "| trial-02 | 3.1 | 2.5 | OK |" in md


@pytest.mark.parametrize("name, figures", [
    ("standby-loss", {"primary": "pg1", "standby": "pg2", "cut_at": CUT, "healed_at": HEAL,
                      "standby_dropped_at_s": 2.1, "resync_s": 1.9, "write_outage_s": 2.2}),
    ("switchover", {"old_primary": "pg1", "new_primary": "pg2", "started_at": CUT,
                    "handover_at_s": 0.3, "rejoined_s": 0.6, "write_outage_s": 0.3}),
    ("jitter", {"primary": "pg1", "started_at": CUT, "healed_at": CUT + 60, "minutes": 1.0,
                "longest_ack_gap_s": 0.7})])
def test_other_experiments_are_drawn_too(tmp_path, name, figures):
    f = {"experiment": name, "backend": "netns", "addresses": ADDR, "ok": True,
         "failed_checks": [], **figures}
    assert report.marks(f)[0][2] == 0.0
    path = report.plot(f, RECORDS, TPS, tmp_path / f"{name}.png")
    assert path.stat().st_size > 10_000
    assert report.headline(f) in report.markdown(f)


class EventsBackend:
    def events(self):
        return sorted(EVENTS, key=lambda e: e["t"])


def test_lab_events_prints_one_line_per_event_in_time_order(capsys):
    args = cli.parser().parse_args(["events"])
    cli.cmd_events(EventsBackend(), args)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == [
        "fenced", "port_closed", "granted", "promoted", "rejoined", "eligibility"]
    assert "divergence=servers diverged at WAL location 0/3000000" in lines[4]
    cli.cmd_events(EventsBackend(), cli.parser().parse_args(["events", "--json"]))
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == sorted(
        EVENTS, key=lambda e: e["t"])


class DownBackend:
    name = "netns"

    def exists(self):
        return False


def test_an_experiment_on_a_lab_that_is_not_up_says_so_at_once():
    """Not two minutes of waiting for a primary that is not there."""
    args = cli.parser().parse_args(["experiment", "jitter", "--minutes", "0.1"])
    with pytest.raises(LabError, match="not up"):
        cli.cmd_experiment(DownBackend(), args)
