"""python -m tests.sim --seed S --steps N     replay one run exactly (-v: its whole trace)
python -m tests.sim --seeds K --steps N    K runs, seeds 1..K (--first S0 to start elsewhere)
python -m tests.sim --scenario NAME        a regression scenario (--old: on the old code)
python -m tests.sim sweep [--help]         candidate timings: jitter, failover time, faults"""
import argparse
import collections
import json
import multiprocessing
import sys
import time

from .run import report, run, shrink


def _one(args):
    seed, steps, strict, timing, fibers = args
    r = run(seed, steps, strict=strict, timing=timing, fibers=fibers)
    return (seed, r.strict, r.steps, r.ticks, r.sim_s, r.faults, r.writes, r.acked, r.grants,
            r.handovers, r.converge_s, r.violation, r.wall_s)


def many(first, count, steps, jobs=2, strict=None, progress=None, timing=None, fibers=False):
    """Run seeds first..first+count-1 over `jobs` processes: the totals, and the failures."""
    totals = collections.Counter()
    faults = collections.Counter()
    failures, converge = [], []
    began = time.perf_counter()
    work = [(s, steps, strict, timing, fibers) for s in range(first, first + count)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool:
        for row in pool.imap_unordered(_one, work):
            (seed, strict_, steps_, ticks, sim_s, f, writes, acked, grants, handovers,
             converge_s, violation, _) = row
            totals.update(runs=1, steps=steps_, ticks=ticks, writes=writes, acked=acked,
                          grants=grants, handovers=handovers, strict_runs=int(strict_))
            totals["sim_s"] += sim_s
            faults.update(f)
            if converge_s is not None:
                converge.append(converge_s)
            if violation is not None:
                failures.append((seed, violation))
            if progress:
                progress(seed, violation)
    wall = time.perf_counter() - began
    return {"seeds": count, "first_seed": first, "steps_per_run": steps, **totals,
            "sim_hours": round(totals["sim_s"] / 3600, 2), "wall_s": round(wall, 1),
            "ticks_per_s": round(totals["ticks"] / wall), "faults": dict(faults.most_common()),
            "faults_total": sum(faults.values()),
            "converge_s_max": max(converge, default=None),
            "converge_s_median": sorted(converge)[len(converge) // 2] if converge else None,
            "violations": len(failures), "failures": failures}


def main(argv=None):
    sys.setrecursionlimit(20000)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep
        return sweep(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, help="replay this seed")
    ap.add_argument("--seeds", type=int, help="run this many seeds")
    ap.add_argument("--first", type=int, default=1, help="the first seed of --seeds")
    ap.add_argument("--steps", type=int, default=20000, help="scheduler steps with faults")
    ap.add_argument("--skip", default="", help="fault numbers to leave out (a shrunk replay)")
    ap.add_argument("--strict", choices=("on", "off"), help="strict_sync (default: by seed)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--scenario", help="a regression scenario (see --list)")
    ap.add_argument("--old", action="store_true", help="the scenario on the code before its fix")
    ap.add_argument("--list", action="store_true", help="list the regression scenarios")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the whole trace")
    ap.add_argument("--timing", metavar="ci,pt,fence,margin,failover[,grace]",
                    help="these timings instead of agent.ini's (a sweep's candidate)")
    ap.add_argument("--fibers", action="store_true",
                    help="steps block as fibers, not as nested runs (world.Fiber)")
    args = ap.parse_args(argv)
    strict = None if args.strict is None else args.strict == "on"
    timing = None
    if args.timing:
        from .sweep import parse_timing
        try:
            timing = parse_timing(f"x={args.timing}")[1]
        except ValueError as exc:
            ap.error(str(exc))
    fibers = args.fibers
    options = (f" --timing {args.timing}" if args.timing else "") + (" --fibers" if fibers else "")

    if args.list or args.scenario:
        from . import scenarios
        if args.list:
            for name, s in scenarios.SCENARIOS.items():
                print(f"{name:34} {s.__doc__.splitlines()[0]}")
            return 0
        r = scenarios.run_scenario(args.scenario, old=args.old,
                                   log=print if args.verbose else None)
        if r.violation:
            report(r, out=print)
            return 1
        print(f"{args.scenario}: no violation ({r.acked} writes acknowledged, {r.grants} "
              f"grants, converged {r.converge_s} s after the faults)")
        return 0

    if args.seed is not None:
        skip = [int(x) for x in args.skip.split(",") if x]
        r = run(args.seed, args.steps, skip, log=print if args.verbose else None, strict=strict,
                timing=timing, fibers=fibers)
        summary = {"seed": r.seed, "strict_sync": r.strict, "steps": r.steps,
                   "ticks": r.ticks, "sim_s": r.sim_s, "faults": r.faults,
                   "writes": r.writes, "acked": r.acked, "grants": r.grants,
                   "handovers": r.handovers, "converge_s": r.converge_s,
                   "violation": r.violation, "wall_s": round(r.wall_s, 2)}
        if r.violation is None:
            print(json.dumps(summary) if args.json else
                  "\n".join(f"{k:12} {v}" for k, v in summary.items()))
            return 0
        if not args.no_shrink and not skip:
            best, skip = shrink(args.seed, args.steps, r, strict=strict, timing=timing,
                                fibers=fibers)
            print(f"shrunk: {len(r.applied)} faults -> {len(best.applied)}")
            r = best
        report(r, skip, args.steps, options=options)
        return 1

    if args.seeds:
        def progress(seed, violation):
            if violation:
                print(f"seed {seed}: VIOLATION {violation}", flush=True)
        totals = many(args.first, args.seeds, args.steps, args.jobs, strict, progress, timing,
                      fibers)
        if args.json:
            print(json.dumps(totals))
        else:
            for k, v in totals.items():
                print(f"{k:18} {v}")
        return 1 if totals["violations"] else 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
