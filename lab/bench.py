"""`python -m lab bench failover|switchover|standby-loss --trials N`: an experiment N times on one fresh lab
(the old primary rejoins after each trial, so the next one goes the other way), and medians.
Speed goals live here, not in the tests: this machine is shared and noisy, so figures are
medians over trials. The lab is torn down at the end."""
import statistics

from lab import experiments

FIGURES = {
    "failover": ("failover_s", "write_outage_s", "fenced_at_s", "promoted_at_s", "rejoined_s"),
    "switchover": ("write_outage_s", "rejoined_s"),
    "standby-loss": ("write_outage_s", "resync_s"),
}


def run(backend, progress, what, trials):
    runs = []
    backend.down()
    backend.up(progress)
    try:
        for trial in range(1, trials + 1):
            progress(f"{what} trial {trial}/{trials}")
            runs.append(experiments.EXPERIMENTS[what](backend, progress))
            progress(f"{what} trial {trial}/{trials}: "
                     + ", ".join(f"{k} {runs[-1][k]}" for k in FIGURES[what][:2])
                     + f", lost_acked {runs[-1]['lost_acked']}")
    finally:
        backend.down()
    summary = {"backend": backend.name, "experiment": what, "trials": trials, "runs": runs,
               "lost_acked": sum(r["lost_acked"] for r in runs),
               "figures": FIGURES[what], "ok": all(r["ok"] for r in runs)}
    if what == "failover":
        summary["promotions"] = [r["promotions"] for r in runs]
        summary["fenced_before_promotion"] = all(r["fenced_before_promotion"] for r in runs)
    for name in FIGURES[what]:
        values = [r[name] for r in runs if r[name] is not None]
        summary[name] = {"median": round(statistics.median(values), 3) if values else None,
                         "min": min(values, default=None), "max": max(values, default=None),
                         "missing": trials - len(values)}
    return summary


def report(s):
    lines = [f"{s['experiment'].capitalize()} benchmark ({s['backend']} lab), {s['trials']} "
             "trials on one lab:",
             f"  {'figure (s)':<16}{'median':>8}{'min':>8}{'max':>8}"]
    for name in s["figures"]:
        f = s[name]
        cells = ["-" if f[k] is None else f"{f[k]:.2f}" for k in ("median", "min", "max")]
        lines.append(f"  {name:<16}{cells[0]:>8}{cells[1]:>8}{cells[2]:>8}"
                     + (f"   ({f['missing']} missing)" if f["missing"] else ""))
    lines.append(f"  lost acknowledged writes, all trials: {s['lost_acked']}")
    if "promotions" in s:
        lines += [f"  promotions per trial: {s['promotions']}",
                  "  old primary fenced before the promotion in every trial: "
                  f"{s['fenced_before_promotion']}"]
    lines.append(f"  verdict: {'OK' if s['ok'] else 'FAILED'}")
    lines += [f"  trial {i}: {', '.join(r['failed_checks'])}"
              for i, r in enumerate(s["runs"], 1) if r["failed_checks"]]
    return "\n".join(lines)
