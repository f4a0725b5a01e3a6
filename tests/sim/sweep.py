"""python -m tests.sim sweep: candidate timing sets for agent.ini's [timing], each simulated
(a) under the jitter profile -- no real failure: 5 % loss on every link (TCP-like: a lost
    segment costs a retransmission timeout), latency spikes on the primary's egress, agent
    pauses of half the fence timeout, one slow host -- counting what should never happen
    there: grants (false failovers), fences, sync drops; and how close it came to each (the
    least lease left, the longest silences against failover_timeout: the margin);
(b) in clean failovers: the primary isolated, timed from the cut to the first write the new
    primary acknowledges, by an ideal client (it finds the primary at once) and by the lab's
    write probe (its 1 s deadline, then libpq's 2 s connect_timeout on the silent host);
(c) under the random faults of `python -m tests.sim` (the invariants, checked after every
    step, in every part).
Every run is seeded: the same arguments print the same table. README, "Timing sweep
(simulator)"."""
import argparse
import json
import multiprocessing
import random
import sys
import time

import agent
from lab.experiments import longest_gap, median

from .cluster import DB, Cluster
from .run import AGENTS, FaultPlan, isolation, run
from .world import HOSTS, Violation


def timing(check_interval, probe_timeout, fence_timeout, safety_margin, failover_timeout,
           restart_grace=6.0):
    return agent.Timing(check_interval, probe_timeout, fence_timeout, safety_margin,
                        failover_timeout, restart_grace)


CANDIDATES = {
    "today": timing(0.2, 0.3, 1.2, 0.2, 2.0),
    "f1.2-F1.7": timing(0.1, 0.25, 1.2, 0.1, 1.7),
    "f1.1-F1.6": timing(0.1, 0.25, 1.1, 0.1, 1.6),
    "f1.0-F1.5": timing(0.1, 0.25, 1.0, 0.1, 1.5),
    "f0.8-F1.3": timing(0.1, 0.2, 0.8, 0.15, 1.3),
    "issue": timing(0.1, 0.2, 0.7, 0.15, 1.2),
    "faster": timing(0.1, 0.15, 0.6, 0.1, 1.0),
}
"""The candidates swept by default (check_interval, probe_timeout, fence_timeout,
safety_margin, failover_timeout; restart_grace 6 s): today's defaults; check_interval 0.1 s
and probe_timeout 0.25 s (one TCP retransmission still fits) with the fence timeout stepped
down from today's and the shortest failover timeout check_timing allows; the issue's
suggestion (0.1/0.2/0.7/0.15/1.2), one step each side of it."""

# the jitter profile (python -m tests.sim sweep --loss, --pause-fraction, --spike-max)
LOSS = 0.05                 # on every ordered pair of hosts, as the lab's jitter experiment
PAUSE_FRACTION = 0.5        # an agent's pause: this much of the candidate's fence_timeout
SPIKE_MAX_S = 0.15          # a latency spike adds 20 ms up to this on the primary's egress ...
SPIKE_LENGTH_S = (0.2, 2.0)  # ... for this long ...
SPIKE_EVERY_S = 6.0         # ... every this long on average
PAUSE_EVERY_S = (3.0, 6.0)  # an agent SIGSTOPped (PAUSE_FRACTION), one after another
CPU_SLOW_S = 0.03           # the slow host: each port call waits up to this for a core,
NFT_SLOW_S = 0.03           # each nft call takes this long,
DISK_SLOW_S = 0.02          # each state file write this long
WRITE_EVERY_S = 0.1         # the client writes this often (the lab's probe); 5: nearly idle


def degrade(c, rng, pause_s, spike_max=SPIKE_MAX_S, loss=LOSS, write_every=WRITE_EVERY_S,
            pause_every=PAUSE_EVERY_S, slow_host=True):
    """Put the cluster under the jitter profile from now on, for good; the slow host (unless
    not slow_host) is the seed's (pg1, pg2 or arb in turn); no spikes when spike_max <= 0.
    Returns the list the pauses are counted in."""
    net, s = c.net, c.sched
    net.tcp = True
    c.status_interval = 1.0 - 1e-6  # an idle standby's reply: every 1 s, as PostgreSQL's
    c.write_interval = write_every
    FaultPlan._table(net.loss, [(a, b) for a in HOSTS for b in HOSTS if a != b], loss)
    primary = c.arb_view.primary
    if slow_host:
        slow = c.nodes[AGENTS[c.seed % len(AGENTS)]]
        slow.cpu_slow, slow.disk_slow = CPU_SLOW_S, DISK_SLOW_S
        if slow.name in DB:
            slow.nft_slow = NFT_SLOW_S
    pauses = []

    def spike():
        undo = FaultPlan._table(net.slow, [(primary, o) for o in HOSTS if o != primary],
                                rng.uniform(0.02, spike_max))
        s.at(s.now + rng.uniform(*SPIKE_LENGTH_S), undo)
        s.at(s.now + rng.expovariate(1.0 / SPIKE_EVERY_S), spike)

    def pause():
        i = len(pauses)
        node = c.nodes[AGENTS[i % len(AGENTS)]]
        if (i // len(AGENTS)) % 2 == 0:  # between two steps, then in the middle of one
            node.paused_until = max(node.paused_until, s.now + pause_s)
        else:
            node.stall_at_next_call = pause_s
        pauses.append((round(s.now, 3), node.name))
        s.at(s.now + rng.uniform(*pause_every), pause)

    if spike_max > 0:
        s.at(s.now + rng.expovariate(1.0 / SPIKE_EVERY_S), spike)
    s.at(s.now + rng.uniform(*pause_every), pause)
    return pauses


def watch(c, every=0.01):
    """Sample, every `every` s, how close the cluster comes to what the jitter profile must
    not cause: (lease_left, standby_silent, primary_silent) -- the primary's lease left in the
    kernel (0 when closed); how long the standby's walreceiver has sent no reply (the primary
    drops it from sync when its agent has not seen reply_time change for failover_timeout,
    which is never longer than this at a tick); how long the standby and the arbiter have both
    seen no sign of the primary (a grant needs both at failover_timeout)."""
    samples = []

    def age(a, at):
        return None if a is None or at is None else a.clock() - at

    def sample():
        now, p = c.sched.now, c.arb_view.primary
        lease = c.fences[p].expiry - now if c.fences[p].open_at(now) else 0.0
        s = c.pg[c.other_db(p)]
        standby = now - s.reply_at if s.conn == p and s.reply_at is not None else None
        peers = [c.nodes[n].agent for n in (c.other_db(p), "arb")]
        silent = [age(a, a.observations.alive_at.get(p)) for a in peers if a is not None]
        samples.append((lease, standby, min(silent) if len(silent) == 2 and None not in silent
                        else None))
        c.sched.at(now + every, sample)

    c.sched.at(c.sched.now, sample)
    return samples


def _violation(c, exc):
    return [round(c.sched.now, 3), exc.kind, exc.detail]


def jitter_run(seed, t, seconds, profile=None):
    """(a) The jitter profile for `seconds` of simulated time on a formed cluster; profile:
    pause_s (default fence_timeout x PAUSE_FRACTION), spike_max, loss, write_every,
    pause_every ((low, high) s), slow_host."""
    profile = profile or {}
    c = Cluster(seed, strict_sync=False, timing=t, fibers=True)
    s, violation, start, pauses, samples = c.sched, None, None, [], []
    try:
        c.form()
        s.run_until(s.now + 3.0)  # plain load first
        start = s.now
        pauses = degrade(c, random.Random(seed * 7919 + 1),
                         profile.get("pause_s") or t.fence_timeout * profile.get(
                             "pause_fraction", PAUSE_FRACTION),
                         profile.get("spike_max", SPIKE_MAX_S), profile.get("loss", LOSS),
                         profile.get("write_every", WRITE_EVERY_S),
                         profile.get("pause_every") or PAUSE_EVERY_S,
                         profile.get("slow_host", True))
        samples = watch(c)
        s.run_until(start + seconds)
    except Violation as exc:
        violation = _violation(c, exc)
    s.close()
    figures = profile_figures(c.event_log, [at for at, _ in c.acked.values()],
                              start if start is not None else s.now, s.now)
    return {**figures, **closest_figures(samples), "pauses": len(pauses),
            "violation": violation}


def failover_run(seed, t, probe=False):
    """(b) The primary isolated (from every host and the client), a moment after the cluster
    formed; until the new primary acknowledges a write (30 s at most), and 1 s more. probe:
    the lab's write probe (cluster.LabProbe; a dict: its deadline, connect_timeout) instead
    of the ideal client."""
    c = Cluster(seed, strict_sync=False, timing=t, fibers=True, probe=probe)
    s, violation, cut, new = c.sched, None, None, None
    try:
        c.form()
        s.run_until(s.now + random.Random(seed * 7919 + 2).uniform(1.0, 3.0))
        old = c.arb_view.primary
        new, cut = c.other_db(old), s.now
        FaultPlan._table(c.net.drop, isolation(old))
        s.run_until(cut + 30.0, until=lambda: c.acked_order
                    and c.acked[c.acked_order[-1]][1] == new)
        s.run_until(s.now + 1.0)
    except Violation as exc:
        violation = _violation(c, exc)
    s.close()
    return {**failover_figures(list(c.acked.values()), c.event_log, cut, new),
            "violation": violation}


def safety_run(seed, t, steps, fibers=False):
    """(c) The random faults of `python -m tests.sim --seed SEED --steps STEPS --timing T
    [--fibers]`."""
    r = run(seed, steps, timing=t, fibers=fibers)
    return {"violation": list(r.violation) if r.violation else None, "grants": r.grants,
            "faults": sum(r.faults.values()), "ticks": r.ticks, "sim_s": r.sim_s}


# -- figures (pure; tests/unit/test_sweep_figures.py) ----------------------------------------------

def profile_figures(events, ack_times, start, end):
    """What the jitter profile must not cause, from the agents' events (time, node, event,
    detail) in [start, end]: grants (false failovers), promotions, fences (a database node's
    `fenced`, the kernel's lease lapsed or the agent closed it), sync drops (the arbiter
    records no eligible standby); and the longest silence between acknowledged writes."""
    def count(kind, test=lambda node, detail: True):
        return sum(1 for at, node, event, detail in events
                   if start <= at <= end and event == kind and test(node, detail))
    return {"grants": count("granted"), "promotions": count("promoted"),
            "fences": count("fenced", lambda node, _: node in DB),
            "sync_drops": count("eligibility", lambda _, d: d.get("eligible") is None),
            "longest_gap_s": longest_gap(ack_times, start, end),
            "acked": sum(1 for at in ack_times if start <= at <= end)}


def closest_figures(samples):
    """The closest approaches of watch()'s samples: the least lease left (0: it lapsed), the
    standby's longest silence, the longest the standby and the arbiter both went without a
    sign of the primary; None for what was never sampled."""
    def extreme(i, pick):
        values = [x[i] for x in samples if x[i] is not None]
        return round(pick(values), 3) if values else None
    return {"lease_low_s": extreme(0, min), "standby_silent_s": extreme(1, max),
            "primary_silent_s": extreme(2, max)}


def failover_figures(acks, events, cut, new):
    """Seconds from the cut to the first write acknowledged by the new primary
    (failover_s), to the arbiter's grant and to the new primary's promotion; None for what
    did not happen. acks: (time, node) of every acknowledged write."""
    def after(times):
        times = [at for at in times if cut is not None and at >= cut]
        return round(min(times) - cut, 3) if times else None
    return {"failover_s": after(at for at, node in acks if node == new),
            "granted_s": after(at for at, _, event, _ in events if event == "granted"),
            "promoted_s": after(at for at, node, event, _ in events
                                if event == "promoted" and node == new)}


def _median_worst(times):
    """(median, worst) of failover times; worst None when one never happened."""
    done = [x for x in times if x is not None]
    return (round(median(done), 3) if done else None,
            max(done) if done and len(done) == len(times) else None)


def _extreme(rows, key, pick):
    values = [r[key] for r in rows if r.get(key) is not None]
    return pick(values) if values else None


def summarize(name, t, jitter, failovers, safety, probes=()):
    """One row of the table from a candidate's runs (lists of the dicts above; probes: the
    failovers timed by the lab's write probe). margin_s: the least room any jitter run left
    before a fence (lease left), a sync drop or a grant (failover_timeout less the longest
    silence); negative when one happened."""
    violations = [(r.get("part", part), r.get("seed"), r["violation"])
                  for part, rows in (("jitter", jitter), ("failover", failovers),
                                     ("probe", probes), ("faults", safety))
                  for r in rows if r["violation"]]
    median_s, worst_s = _median_worst([f["failover_s"] for f in failovers])
    probe_median_s, probe_worst_s = _median_worst([f["failover_s"] for f in probes])
    lease_low = _extreme(jitter, "lease_low_s", min)
    standby = _extreme(jitter, "standby_silent_s", max)
    primary = _extreme(jitter, "primary_silent_s", max)
    room = [x for x in (lease_low, None if standby is None else t.failover_timeout - standby,
                        None if primary is None else t.failover_timeout - primary)
            if x is not None]
    return {"candidate": name, "timing": timing_text(t), "timing_arg": timing_text(t, ","),
            "failover_median_s": median_s, "failover_worst_s": worst_s,
            "probe_median_s": probe_median_s, "probe_worst_s": probe_worst_s,
            "failovers": len(failovers),
            "failovers_done": sum(f["failover_s"] is not None for f in failovers),
            "grant_median_s": median([f["granted_s"] for f in failovers
                                      if f["granted_s"] is not None]),
            "lease_low_s": lease_low, "standby_silent_s": standby,
            "primary_silent_s": primary,
            "margin_s": round(min(room), 3) if room else None,
            "false_grants": sum(r["grants"] for r in jitter),
            "fences": sum(r["fences"] for r in jitter),
            "sync_drops": sum(r["sync_drops"] for r in jitter),
            "jitter_longest_gap_s": _extreme(jitter, "longest_gap_s", max),
            "pauses": sum(r["pauses"] for r in jitter),
            "fault_grants": sum(r["grants"] for r in safety),
            "faults": sum(r["faults"] for r in safety),
            "violations": len(violations), "violation_list": violations}


def timing_text(t, sep="/"):
    """check_interval/probe_timeout/fence_timeout/safety_margin/failover_timeout."""
    return sep.join(f"{x:g}" for x in (t.check_interval, t.probe_timeout, t.fence_timeout,
                                       t.safety_margin, t.failover_timeout))


COLUMNS = (("candidate", "candidate", "{}"), ("timing", "ci/pt/fence/margin/failover", "{}"),
           ("failover_median_s", "failover median s", "{:.2f}"),
           ("failover_worst_s", "worst", "{:.2f}"),
           ("probe_median_s", "probe median", "{:.2f}"), ("probe_worst_s", "worst", "{:.2f}"),
           ("false_grants", "false grants", "{}"), ("fences", "fences", "{}"),
           ("sync_drops", "sync drops", "{}"), ("lease_low_s", "lease low", "{:.2f}"),
           ("standby_silent_s", "S silent", "{:.2f}"),
           ("primary_silent_s", "M silent", "{:.2f}"), ("margin_s", "margin", "{:.2f}"),
           ("violations", "violations", "{}"))


def format_table(rows):
    """The table, one line per candidate; a figure not measured is '-', a refused
    candidate says why."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        if row.get("refused"):
            cells.append([row["candidate"], row["timing"], f"refused: {row['refused']}"])
            continue
        cells.append([("-" if row.get(key) is None else fmt.format(row[key]))
                      for key, _, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells if i < len(line) and len(line) == len(COLUMNS))
              for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
            if len(line) == len(COLUMNS) else "  ".join(line) for line in cells]


def parse_timing(text):
    """NAME=ci,pt,fence,margin,failover[,restart_grace] -> (name, agent.Timing)."""
    name, sep, values = text.partition("=")
    numbers = [float(x) for x in values.split(",")] if sep else []
    if not name or len(numbers) not in (5, 6):
        raise ValueError(f"{text!r}: want NAME=check_interval,probe_timeout,fence_timeout,"
                         "safety_margin,failover_timeout[,restart_grace]")
    return name, timing(*numbers)


# -- running it ----------------------------------------------------------------------------------

PARTS = ("jitter", "failover", "probe", "faults", "faults-fibers")


def _task(args):
    name, part, seed, t, opts = args
    if part == "jitter":
        out = jitter_run(seed, t, opts["jitter_s"], opts["profile"])
    elif part in ("failover", "probe"):
        out = failover_run(seed, t, probe=part == "probe" and opts["probe"])
    else:  # the random faults, with nested runs (the simulator's default) and with fibers
        out = safety_run(seed, t, opts["steps"], fibers=part == "faults-fibers")
    return name, part, {**out, "seed": seed, "part": part}


def sweep(candidates, jitter_seeds=12, jitter_s=120.0, failovers=10, safety_seeds=6,
          steps=30000, jobs=1, profile=None, unchecked=False, progress=None, probe=None):
    """Every candidate (name -> agent.Timing) through the parts on seeds 1..n of each (the
    random faults twice: nested runs and fibers); the rows of the table, in the candidates'
    order. profile: the jitter profile's knobs (jitter_run); probe: the lab probe's
    (cluster.LabProbe)."""
    opts = {"jitter_s": jitter_s, "profile": profile or {}, "steps": steps,
            "probe": probe or True}
    counts = {"jitter": jitter_seeds, "failover": failovers, "probe": failovers,
              "faults": safety_seeds, "faults-fibers": safety_seeds}
    refused, work = {}, []
    for name, t in candidates.items():
        try:
            agent.check_timing("candidate", t)
        except agent.ConfigError as exc:
            refused[name] = str(exc).split(": ", 2)[-1]
            if not unchecked:
                continue
        work += [(name, part, seed, t, opts) for part in PARTS
                 for seed in range(1, counts[part] + 1)]
    results = {name: {part: [] for part in PARTS} for name in candidates}
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for name, part, out in pool.imap_unordered(_task, work):
                results[name][part].append(out)
    else:
        for item in work:
            name, part, out = _task(item)
            results[name][part].append(out)
            if progress:
                progress(f"{name} {part} seed {item[2]}: "
                         f"{'VIOLATION ' + str(out['violation']) if out['violation'] else 'ok'}")
    rows = []
    for name, t in candidates.items():
        r = results[name]
        if name in refused and not unchecked:
            rows.append({"candidate": name, "timing": timing_text(t), "refused": refused[name]})
            continue
        row = summarize(name, t, r["jitter"], r["failover"], r["faults"] + r["faults-fibers"],
                        r["probe"])
        if name in refused:
            row["candidate"] += " (refused)"
        rows.append(row)
    return rows


def main(argv):
    sys.setrecursionlimit(20000)
    ap = argparse.ArgumentParser(prog="python -m tests.sim sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help=f"which of the built-in candidates ({', '.join(CANDIDATES)})")
    ap.add_argument("--timing", action="append", default=[], metavar="NAME=ci,pt,f,m,F",
                    help="a candidate of your own (repeat for more)")
    ap.add_argument("--jitter-seeds", type=int, default=12,
                    help="jitter runs; the slow host is pg1, pg2, arb in turn")
    ap.add_argument("--jitter-s", type=float, default=120.0, help="simulated s per jitter run")
    ap.add_argument("--loss", type=float, default=LOSS, help="jitter: loss on every link")
    ap.add_argument("--pause-fraction", type=float, default=PAUSE_FRACTION,
                    help="jitter: an agent's pause, as a fraction of fence_timeout")
    ap.add_argument("--pause-s", type=float, help="jitter: an agent's pause in s, for every "
                                                  "candidate (instead of --pause-fraction)")
    ap.add_argument("--spike-max", type=float, default=SPIKE_MAX_S,
                    help="jitter: the largest latency spike on the primary's egress, s")
    ap.add_argument("--pause-every", type=float,
                    help="jitter: a pause every this many s (the lab's experiment: 15); "
                         f"default {PAUSE_EVERY_S[0]:g} to {PAUSE_EVERY_S[1]:g} s at random")
    ap.add_argument("--no-slow-host", action="store_true",
                    help="jitter: no slow host (the lab's experiment has no CPU hog yet)")
    ap.add_argument("--write-every", type=float, default=WRITE_EVERY_S,
                    help="jitter: the client's write interval, s (5: a nearly idle cluster, "
                         "whose standby replies once a second)")
    ap.add_argument("--failovers", type=int, default=10,
                    help="clean failovers, each timed by the ideal client and the lab's probe")
    ap.add_argument("--probe-deadline", type=float, default=1.0,
                    help="the probe's wait for a COMMIT before it reconnects, s (the lab's 1)")
    ap.add_argument("--connect-timeout", type=float, default=2.0,
                    help="the probe's connect timeout per silent host, s (libpq's floor: 2)")
    ap.add_argument("--safety-seeds", type=int, default=6,
                    help="random-fault runs, each with nested runs and with fibers")
    ap.add_argument("--steps", type=int, default=30000, help="scheduler steps per fault run")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--unchecked", action="store_true",
                    help="also run candidates that check_timing refuses")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per finished run")
    args = ap.parse_args(argv)
    candidates = {}
    for name in filter(None, args.candidates.split(",")):
        if name not in CANDIDATES:
            ap.error(f"no candidate {name!r} (known: {', '.join(CANDIDATES)})")
        candidates[name] = CANDIDATES[name]
    for text in args.timing:
        try:
            name, t = parse_timing(text)
        except ValueError as exc:
            ap.error(str(exc))
        candidates[name] = t
    began = time.perf_counter()
    profile = {"loss": args.loss, "pause_fraction": args.pause_fraction,
               "pause_s": args.pause_s, "spike_max": args.spike_max,
               "write_every": args.write_every, "slow_host": not args.no_slow_host,
               "pause_every": (args.pause_every,) * 2 if args.pause_every else None}
    rows = sweep(candidates, args.jitter_seeds, args.jitter_s, args.failovers,
                 args.safety_seeds, args.steps, args.jobs, profile, args.unchecked,
                 progress=(lambda line: print(line, file=sys.stderr, flush=True))
                 if args.verbose else None,
                 probe={"deadline": args.probe_deadline, "connect_timeout": args.connect_timeout})
    wall = round(time.perf_counter() - began, 1)
    if args.json:
        print(json.dumps({"rows": rows, "wall_s": wall}))
    else:
        pause = f"{args.pause_s:g} s" if args.pause_s else f"{args.pause_fraction:g} x fence"
        every = f"{args.pause_every:g}" if args.pause_every else "3-6"
        print(f"Timing sweep (simulator): jitter {args.jitter_seeds} x {args.jitter_s:g} s "
              f"(loss {args.loss:.0%}, spikes <= {args.spike_max:g} s, pauses {pause} every "
              f"{every} s, {'no' if args.no_slow_host else 'a'} slow host, a write every "
              f"{args.write_every:g} s), {args.failovers} failovers (probe: "
              f"deadline {args.probe_deadline:g} s, connect_timeout {args.connect_timeout:g} s), "
              f"2 x {args.safety_seeds} fault runs x {args.steps} steps per candidate")
        for line in format_table(rows):
            print(line)
        for row in rows:
            for part, seed, (at, kind, detail) in row.get("violation_list", ()):
                print(f"  {row['candidate']}: {part} seed {seed}: VIOLATION {kind} at "
                      f"t={at}: {detail}")
                if part.startswith("faults"):
                    print(f"    replay: python -m tests.sim --seed {seed} --steps {args.steps} "
                          f"--timing {row['timing_arg']}"
                          + (" --fibers" if part == "faults-fibers" else ""))
        print(f"wall {wall} s")
    return 1 if any(row.get("violations") for row in rows) else 0
