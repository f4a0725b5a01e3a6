"""Chaos in the lab: `python -m lab chaos --minutes M --seed S [--json]`.

Random faults from a schedule that the seed alone decides (`schedule()`: the same seed, the
same faults at the same offsets) under the write probe and pgbench (`under_load`): links cut
and healed, one-way cuts, isolated hosts, agents killed (SIGKILL, started again as systemd
would), stopped (SIGSTOP, then SIGCONT), PostgreSQL stopped behind its agent's back, random
packet loss. Checked from the client host:

  - at most one host acknowledges writes: besides the multi-host probe, one probe per database
    host writes to that host alone (target_session_attrs=read-write); every acknowledgement
    carries the server's timeline, PostgreSQL's count of promotions. `dual_primary_s` adds up
    the time during which a host went on acknowledging on an older timeline after the other
    host had acknowledged on a newer one (or both on the same one): it must be 0;
  - no acknowledged write lost: every acknowledged id, of every probe, is on the primary at
    the end (`lost_acked`);
  - after the last fault the cluster is back to a primary with a synchronous standby that the
    arbiter names eligible within CONVERGE_S (`converged`, `converged_s`).

The figures come from `chaos_metrics()`, a pure function of the raw records."""
import collections
import contextlib
import random
import time

from lab.backend import AGENT_HOSTS, DB_HOSTS, HOSTS, LabError
from lab.experiments import _other, _view, acked, lost, under_load, verdict
from lab.load import Probe

CONVERGE_S = 60.0
HOST_PROBE_BASE = {"pg1": -4 * 10**12, "pg2": -2 * 10**12}  # id ranges of the host probes

# kind -> weight
KINDS = {"cut": 4, "one_way": 3, "isolate": 4, "kill_agent": 3, "pause_agent": 3,
         "stop_pg": 2, "loss": 2}
LINKS = [(a, b) for i, a in enumerate(HOSTS) for b in HOSTS[i + 1:]]


def schedule(seed, minutes, mean_gap=5.0):
    """[(offset s, kind, target, duration s)]: the faults of a run, from the seed alone.
    A fault starts when the previous one has been undone plus a gap, so that each heal
    undoes exactly its own fault."""
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    faults, t = [], rng.uniform(2.0, 5.0)
    while t < minutes * 60:
        kind = rng.choices(kinds, weights)[0]
        if kind in ("cut", "one_way"):
            a, b = rng.choice(LINKS)
            target = (a, b) if rng.random() < 0.5 else (b, a)
        elif kind == "isolate":
            target = rng.choice(HOSTS)
        elif kind in ("kill_agent", "pause_agent"):
            target = rng.choice(AGENT_HOSTS)
        elif kind == "stop_pg":
            target = rng.choice(DB_HOSTS)
        else:  # loss: into one host, a probability
            target = (rng.choice(HOSTS), rng.choice((0.05, 0.2, 0.5)))
        duration = round(rng.choice((0.5, 1.5, 3.0, 6.0, 12.0)) * rng.uniform(0.7, 1.3), 2)
        faults.append((round(t, 2), kind, target, duration))
        t += duration + rng.expovariate(1.0 / mean_gap) + 0.5
    return faults


def describe(kind, target, duration):
    what = {"cut": lambda: f"cut {target[0]} {target[1]}",
            "one_way": lambda: f"one-way cut: {target[0]} cannot connect to {target[1]}",
            "isolate": lambda: f"isolate {target}",
            "kill_agent": lambda: f"SIGKILL {target}'s agent (started again after)",
            "pause_agent": lambda: f"SIGSTOP {target}'s agent (SIGCONT after)",
            "stop_pg": lambda: f"stop PostgreSQL on {target} (its agent starts it)",
            "loss": lambda: f"{target[1]:.0%} packet loss into {target[0]}"}[kind]()
    return f"{what} for {duration} s"


def apply(backend, run, kind, target):
    """Start a fault; returns its undo."""
    if kind == "cut":
        backend.cut(*target)
        return lambda: backend.heal(*target)
    if kind == "one_way":
        backend.cut(*target, one_way=True)
        return lambda: backend.heal(*target)
    if kind == "isolate":
        backend.isolate(target)
        return lambda: backend.heal(target)
    if kind == "kill_agent":
        with contextlib.suppress(LabError):  # not running: started at the end all the same
            backend.signal_agent(target, "KILL")
        return lambda: backend.start_agent(target)
    if kind == "pause_agent":
        run.pause(target)
        return lambda: run.resume(target)
    if kind == "stop_pg":
        backend.stop_pg(target)
        return lambda: None  # the agent starts it again (or fails over)
    host, probability = target
    backend.set_loss(host, probability)
    return lambda: backend.remove_loss(host, probability)


def timeline_overlaps(acks, addresses):
    """Seconds during which a host acknowledged on an older (or the same) timeline after the
    other host had acknowledged on a newer (the same) one; and the episodes, for the report.
    acks: records with ack (time), server (address) and tli."""
    host_of = {a: h for h, a in addresses.items()}
    spans = {}  # (host, tli) -> [first, last]
    for r in acks:
        host, tli = host_of.get(r.get("server")), r.get("tli")
        if host is None or tli is None:
            continue
        span = spans.setdefault((host, tli), [r["ack"], r["ack"]])
        span[0], span[1] = min(span[0], r["ack"]), max(span[1], r["ack"])
    total, episodes = 0.0, []
    keys = sorted(spans)
    for i, (h1, t1) in enumerate(keys):
        for h2, t2 in keys[i + 1:]:
            if h1 == h2:
                continue
            (f1, l1), (f2, l2) = spans[(h1, t1)], spans[(h2, t2)]
            if t1 == t2:
                overlap = min(l1, l2) - max(f1, f2)
            elif t1 < t2:  # h1 still acknowledged on t1 after h2 began on t2
                overlap = l1 - f2
            else:
                overlap = l2 - f1
            if overlap > 0:
                total += overlap
                episodes.append({"hosts": [h1, h2], "timelines": [t1, t2],
                                 "seconds": round(overlap, 3)})
    return round(total, 3), episodes


def chaos_metrics(records, host_records, events, started, stopped, ids, addresses, faults,
                  converged_s, *, tps=(), seed=None, minutes=None):
    """The figures and verdict of a chaos run. records: the multi-host probe's; host_records:
    {host: that host's own probe's records}; ids: the probe ids on the primary at the end;
    faults: the faults applied, [(offset, kind, target, duration)]; converged_s: seconds from
    the last fault's undo to primary + eligible synchronous standby (None: not within
    CONVERGE_S)."""
    all_acks = acked(records) + [r for rs in host_records.values() for r in acked(rs)]
    dual_s, episodes = timeline_overlaps(all_acks, addresses)
    by_kind = collections.Counter(kind for _, kind, _, _ in faults)
    f = {
        "seed": seed, "minutes": minutes,
        "faults": len(faults), "faults_by_kind": dict(sorted(by_kind.items())),
        "failovers": sum(1 for e in events if e["event"] == "granted" and e["t"] >= started),
        "promotions": sum(1 for e in events if e["event"] == "promoted" and e["t"] >= started),
        "fences": sum(1 for e in events if e["event"] == "fenced" and e["t"] >= started),
        # the port watcher: how often each database port stopped taking clients
        "ports_closed": {h: sum(1 for e in events if e["event"] == "port_closed"
                                and e["node"] == h and e["t"] >= started) for h in DB_HOSTS},
        "acked": len(all_acks),
        "acked_by_host": {h: sum(1 for r in all_acks if r.get("server") == a)
                          for h, a in sorted(addresses.items()) if h in DB_HOSTS},
        "lost_acked": lost(all_acks, ids),
        "dual_primary_s": dual_s, "dual_primary_episodes": episodes,
        "converged": converged_s is not None, "converged_s": converged_s,
        "median_tps": _median([v for t, v in tps if started <= t <= stopped]),
        "started_at": started, "stopped_at": stopped,
    }
    return verdict(f, expected={"lost_acked": 0, "dual_primary_s": 0.0, "converged": True},
                   above={"acked": 0, "faults": 0})


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _converged(backend):
    primary = backend.primary_with_sync_standby()
    return primary is not None and _view(backend).get("eligible") == _other(primary) \
        and _view(backend).get("primary") == primary


def chaos(backend, progress, args=None, minutes=None, seed=None):
    minutes = minutes if minutes is not None else getattr(args, "minutes", 3.0)
    seed = seed if seed is not None else getattr(args, "seed", 1)
    plan = schedule(seed, minutes)
    applied = []
    with under_load(backend, progress, "chaos", seconds=minutes * 60 + 300) as run:
        work = backend.work_dir("chaos-hosts")
        host_probes = {}
        for host in DB_HOSTS:
            dsn = backend.dsn(host=backend.addresses[host],
                              port=backend.config(host).me.pg_port)
            probe = Probe(backend, work / f"probe-{host}.jsonl", dsn=dsn,
                          id_base=HOST_PROBE_BASE[host], seconds=minutes * 60 + 300)
            probe.prepare()
            probe.start()
            host_probes[host] = probe
        try:
            started = time.time()
            for offset, kind, target, duration in plan:
                time.sleep(max(0.0, started + offset - time.time()))
                progress(f"\rchaos {time.time() - started:6.1f} s: "
                         f"{describe(kind, target, duration):70}", end="")
                try:
                    undo = apply(backend, run, kind, target)
                except LabError as exc:  # e.g. an agent that is not running to be stopped
                    progress(f"\nchaos: {kind} {target} not applied: {exc}")
                    continue
                applied.append((offset, kind, target, duration))
                time.sleep(duration)
                undo()
            time.sleep(max(0.0, started + minutes * 60 - time.time()))
            progress("")
            backend.heal()
            for host in sorted(run.paused):
                run.resume(host)
            for host in AGENT_HOSTS:
                backend.start_agent(host)
            stopped = time.time()
            try:
                backend.wait_until("primary + eligible synchronous standby",
                                   lambda: _converged(backend), CONVERGE_S, progress)
                converged_s = round(time.time() - stopped, 1)
            except LabError:
                converged_s = None
            time.sleep(2.0)  # writes on the converged cluster
        finally:
            for probe in host_probes.values():
                probe.stop()
    primary = backend.primary_with_sync_standby() or _view(backend).get("primary")
    ids = [int(r[0]) for r in backend.sql(primary, "select id from bobry_probe")]
    figures = chaos_metrics(run.records(), {h: p.records() for h, p in host_probes.items()},
                            backend.events(), started, stopped, ids, backend.addresses,
                            applied, converged_s, tps=run.tps(), seed=seed, minutes=minutes)
    return {"backend": backend.name, "primary_at_end": primary, **figures}


def report(f):
    lines = [f"Chaos ({f['backend']} lab): {f['minutes']} min of random faults, seed {f['seed']}",
             f"  {'faults':<30}{f['faults']}: " + ", ".join(
                 f"{k} {v}" for k, v in f["faults_by_kind"].items()),
             (f"  {'failovers (grants)':<30}{f['failovers']} ({f['promotions']} promotions, "
              f"{f['fences']} fences; ports closed {f['ports_closed']})"),
             f"  {'acknowledged writes':<30}{f['acked']} " + str(f["acked_by_host"]),
             f"  {'lost_acked':<30}{f['lost_acked']}",
             f"  {'dual_primary_s':<30}{f['dual_primary_s']}"
             + (f" {f['dual_primary_episodes']}" if f["dual_primary_episodes"] else ""),
             f"  {'converged':<30}{f['converged']}"
             + (f" ({f['converged_s']} s after the last fault)" if f["converged"] else
                f" (not within {CONVERGE_S:.0f} s)"),
             f"  {'pgbench median tps':<30}{f['median_tps']}",
             f"  {'verdict':<30}" + ("OK" if f["ok"] else
                                     "FAILED: " + ", ".join(f["failed_checks"]))]
    return "\n".join(lines)
