"""`python -m lab bench failover --trials N`: the failover experiment N times, each on a fresh
lab (the old primary does not rejoin yet), and the medians. Speed goals live here, not in the
tests: this machine is shared and noisy, so figures are medians over trials."""
import statistics

from lab import experiments

FIGURES = ("failover_s", "write_outage_s", "fenced_at_s", "promoted_at_s")


def failover(backend, progress, trials):
    runs = []
    for trial in range(1, trials + 1):
        progress(f"trial {trial}/{trials}: fresh lab")
        backend.down()
        backend.up(progress)
        runs.append(experiments.failover(backend, progress))
        progress(f"trial {trial}/{trials}: failover_s {runs[-1]['failover_s']}, "
                 f"lost_acked {runs[-1]['lost_acked']}")
    backend.down()
    summary = {"backend": backend.name, "trials": trials, "runs": runs,
               "lost_acked": sum(r["lost_acked"] for r in runs),
               "promotions": [r["promotions"] for r in runs],
               "fenced_before_promotion": all(r["fenced_before_promotion"] for r in runs)}
    for name in FIGURES:
        values = [r[name] for r in runs if r[name] is not None]
        summary[name] = {"median": round(statistics.median(values), 3) if values else None,
                         "min": min(values, default=None), "max": max(values, default=None),
                         "missing": trials - len(values)}
    summary["ok"] = all(r["ok"] for r in runs)
    return summary


def report(s):
    lines = [f"Failover benchmark ({s['backend']} lab), {s['trials']} trials, fresh lab each:",
             f"  {'figure':<16}{'median':>8}{'min':>8}{'max':>8}"]
    for name in FIGURES:
        f = s[name]
        cells = ["-" if f[k] is None else f"{f[k]:.2f}" for k in ("median", "min", "max")]
        lines.append(f"  {name:<16}{cells[0]:>8}{cells[1]:>8}{cells[2]:>8}"
                     + (f"   ({f['missing']} missing)" if f["missing"] else ""))
    lines += [f"  lost acknowledged writes, all trials: {s['lost_acked']}",
              f"  promotions per trial: {s['promotions']}",
              f"  old primary fenced before the promotion in every trial: "
              f"{s['fenced_before_promotion']}",
              f"  verdict: {'OK' if s['ok'] else 'FAILED'}"]
    lines += [f"  trial {i}: {', '.join(r['failed_checks'])}"
              for i, r in enumerate(s["runs"], 1) if r["failed_checks"]]
    return "\n".join(lines)
