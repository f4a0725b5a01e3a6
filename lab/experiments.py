"""Scripted experiments. Each runs its load and its faults inside `under_load`, which always
stops the load, heals every fault and resumes paused agents, whatever happened. It then hands
the raw records (the probe's acknowledgements, pgbench's per-second samples, the events that
the agents and the lab logged) to a pure `*_metrics` function. The figures and the verdict come
from that function alone, so they are unit-tested without a lab. report() makes them readable.

A figure that a trial could not measure is None, and a None figure fails the verdict: a missing
measurement never reads as a good one.

Event names relied on (backend.events(): every host's events.jsonl plus what the lab saw the
kernel do, merged by wall-clock "t"):
  agents    "fenced", "promoted", "rejoined" (node: a database host)
  arbiter   "granted", "handover", "eligibility" (node "arb"; fields primary, term, eligible)
  kernel    "port_closed", "port_open" (node: the database host whose PostgreSQL port the
            fence closed or opened)"""
import contextlib
import statistics
import time
from pathlib import Path

from lab.backend import AGENT_HOSTS, DB_HOSTS, HOSTS, LabError
from lab.load import PROBE_DEADLINE_S, Bulk, Pgbench, Probe

# Bounds every trial is judged against (the benchmarks' speed goals are in lab/bench.py).
MAX_WRITE_GAP_S = 5.0
"""standby-loss and jitter: the longest silence between two acknowledged writes. Losing the
standby stalls writes for failover_timeout (2 s) plus a round trip to the arbiter; under jitter
nothing should stall them at all, and 5 s is the standby-loss goal, so a degraded network may
not stall writes for longer than losing the standby outright does."""
MAX_CLOCK_OFFSET_S = 0.05
"""Every figure subtracts times taken on different hosts (the cut on the isolated host, the
events on the agents' hosts, the acknowledgements on the client, the port watcher's record):
an experiment refuses to start when a host's clock is further than this from the lab
machine's (LXC containers and network namespaces share its clock; VMs need time sync)."""
RESUMED_TPS_SHARE = 0.5
"""standby-loss: once writes resume, the primary alone runs pgbench at at least half its rate
(median of the seconds from one second after the resumption to the heal)."""


def _other(host):
    return next(h for h in DB_HOSTS if h != host)


# -- pure helpers over the raw records ----------------------------------------------------------
def acked(records):
    return [r for r in records if "ack" in r]


def lost(acks, ids):
    """How many acknowledged writes are missing from `ids` (the ids a node holds)."""
    present = set(ids)
    return sum(1 for r in acks if r["id"] not in present)


def first_event(events, kind, node, since, **fields):
    """The time of the first `kind` event of `node` at or after `since` whose fields equal
    `fields`; None if there is none (or `since` is unknown)."""
    if since is None:
        return None
    times = [e["t"] for e in events if e["event"] == kind and e["node"] == node
             and e["t"] >= since and all(e.get(k) == v for k, v in fields.items())]
    return min(times, default=None)


def count_events(events, kind, since, nodes=None):
    return sum(1 for e in events if e["event"] == kind and e["t"] >= since
               and (nodes is None or e["node"] in nodes))


def seconds_since(t, origin):
    """t - origin in seconds (ms precision); None when either is unknown."""
    return None if t is None or origin is None else round(t - origin, 3)


def longest_silence(times, start, end=None):
    """The longest gap (a, b) between consecutive acknowledgement times that overlaps the
    window [start, end] (end None: up to the last acknowledgement). A window that ends in
    silence counts up to `end`. An acknowledgement in flight at `start` does not end the
    silence: only the gaps matter, not the first acknowledgement after `start`. None when
    nothing was acknowledged at or before `start` (no baseline) or after it (writes never
    came back)."""
    times = sorted(times)
    if not any(t <= start for t in times) or not any(t > start for t in times):
        return None
    pairs = list(zip(times, times[1:]))
    if end is not None and times[-1] < end:
        pairs.append((times[-1], end))
    overlapping = [(a, b) for a, b in pairs if b > start and (end is None or a < end)]
    return max(overlapping, key=lambda gap: gap[1] - gap[0], default=None)


def longest_gap(times, start, end=None):
    """The length in seconds of longest_silence(); None when it is None."""
    gap = longest_silence(times, start, end)
    return None if gap is None else round(gap[1] - gap[0], 3)


def median(values):
    values = list(values)
    return statistics.median(values) if values else None


def slowest_minute_tps(tps, start, end):
    """pgbench's mean tps in the slowest minute of [start, end]: the window is cut into whole
    minutes (at least one; a remainder is spread over them) and a minute without a sample
    counts 0. tps: (wall-clock second, tps) samples, one a second, each about the second
    before it. None for an empty window."""
    if end is None or end <= start:
        return None
    n = max(1, round((end - start) / 60))
    width = (end - start) / n
    totals = [0.0] * n
    for t, value in tps:
        if start <= t - 0.5 < end:
            totals[min(int((t - 0.5 - start) // width), n - 1)] += value
    return round(min(totals) / width, 2)


def tps_timeline(tps, first=-3, last=12):
    """pgbench's tps by whole second from the cut ([second, tps] pairs, as in the `tps`
    figure), summed per second, with every second between the first and the last sample
    present and clipped to [first, last]: a second without a sample (pgbench restarting,
    connecting) reads 0, so a hole shows."""
    totals = {}
    for second, value in tps:
        totals[second] = totals.get(second, 0) + value
    if not totals:
        return []
    low, high = max(first, min(totals)), min(last, max(totals))
    return [(second, totals.get(second, 0)) for second in range(low, high + 1)]


def verdict(figures, expected=(), measured=(), at_most=(), at_least=(), above=()):
    """Adds failed_checks and ok to figures. expected: {key: the value it must have};
    measured: keys that must not be None; at_most, at_least, above: {key: bound}, where a
    value of None fails too (a figure that could not be measured never passes)."""
    failed = [f"{k}=None (not measured)" for k in measured if figures[k] is None]
    failed += [f"{k}={figures[k]} (want {want})" for k, want in dict(expected).items()
               if figures[k] != want]
    for sign, bounds, holds in (("<=", at_most, lambda v, b: v <= b),
                                (">=", at_least, lambda v, b: v >= b),
                                (">", above, lambda v, b: v > b)):
        for k, bound in dict(bounds).items():
            if figures[k] is None:
                failed.append(f"{k}=None (not measured)")
            elif not holds(figures[k], bound):
                failed.append(f"{k}={figures[k]} (want {sign} {bound})")
    figures["failed_checks"] = list(dict.fromkeys(failed))
    figures["ok"] = not figures["failed_checks"]
    return figures


def _term_unchanged(before, after):
    return None if before is None or after is None else before == after


# -- the figures of each experiment --------------------------------------------------------------
def failover_metrics(records, events, cut_at, primary, standby, addresses, new_ids, *,
                     healed_at=None, tps=(), create_table_ok=None, create_table_error=None,
                     old_primary_fenced=None, pgbench_restarts=None):
    """The figures and verdict of one failover. records: the probe's; events: as in the module
    docstring; cut_at: when the isolation of `primary` was in place; healed_at: when the heal
    was done; new_ids: the probe ids on the new primary `standby`; tps: pgbench's (wall-clock
    second, tps) samples; create_table_ok/_error, old_primary_fenced, pgbench_restarts: what
    the experiment saw (None: not seen, which fails the verdict)."""
    acks = acked(records)
    after = [r for r in acks if r["ack"] > cut_at]
    first_on_new = min((r["ack"] for r in after if r["server"] == addresses[standby]),
                       default=None)
    port_closed = first_event(events, "port_closed", primary, cut_at)
    granted = first_event(events, "granted", "arb", cut_at, primary=standby)
    eligible_again = first_event(events, "eligibility", "arb", healed_at, eligible=primary)
    divergence = [e.get("divergence") for e in events
                  if e["event"] == "rejoined" and e["node"] == primary and e["t"] >= cut_at]
    f = {
        "failover_s": seconds_since(first_on_new, cut_at),
        # until the new primary's first write; an old-primary ack in flight at the cut
        # does not end the outage
        "write_outage_s": longest_gap([r["ack"] for r in acks], cut_at, first_on_new)
        if first_on_new is not None else None,
        "acked": len(acks),
        "lost_acked": lost(acks, new_ids),
        "acked_by_old_primary_after_cut": sum(1 for r in after
                                              if r["server"] == addresses[primary]),
        "promotions": count_events(events, "promoted", cut_at),
        "fenced_at_s": seconds_since(port_closed, cut_at),  # the kernel closed the port
        "agent_fenced_at_s": seconds_since(first_event(events, "fenced", primary, cut_at),
                                           cut_at),  # the agent said so (it may not)
        "granted_at_s": seconds_since(granted, cut_at),
        "promoted_at_s": seconds_since(first_event(events, "promoted", standby, cut_at),
                                       cut_at),
        "fenced_before_grant": port_closed is not None and granted is not None
        and port_closed < granted,
        "rejoined_s": seconds_since(eligible_again, healed_at),
        "divergence": divergence[0] if divergence else None,
        "create_table_ok": create_table_ok, "create_table_error": create_table_error,
        "old_primary_fenced": old_primary_fenced,
        "pgbench_restarts": pgbench_restarts,
        "tps": [[round(t - cut_at), value] for t, value in tps],
    }
    f["fenced_before_promotion"] = f["fenced_before_grant"]  # the old key: the grant decides
    f["rejoined"] = f["rejoined_s"] is not None
    return verdict(f, expected={"lost_acked": 0, "acked_by_old_primary_after_cut": 0,
                                "promotions": 1, "create_table_ok": True,
                                "old_primary_fenced": True, "fenced_before_grant": True},
                   measured=("failover_s", "write_outage_s", "fenced_at_s", "granted_at_s",
                             "promoted_at_s", "rejoined_s"),
                   above={"acked": 0})


def standby_loss_metrics(records, events, cut_at, healed_at, primary, standby, ids, *,
                         tps=(), rate=100, term_before=None, term_after=None):
    """The figures and verdict of losing the standby for [cut_at, healed_at]. ids: the probe
    ids on the primary; rate: pgbench's rate; term_before/after: the arbiter's term when the
    load started and after the standby was eligible again."""
    acks = acked(records)
    silence = longest_silence([r["ack"] for r in acks], cut_at, healed_at) \
        if healed_at is not None else None
    resumed_at = silence[1] if silence else None
    f = {
        "write_outage_s": round(silence[1] - silence[0], 3) if silence else None,
        "acked": len(acks), "lost_acked": lost(acks, ids),
        "promotions": count_events(events, "promoted", cut_at),
        "fences": count_events(events, "fenced", cut_at),
        "ports_closed": count_events(events, "port_closed", cut_at, DB_HOSTS),
        "standby_dropped_at_s": seconds_since(
            first_event(events, "eligibility", "arb", cut_at, eligible=None), cut_at),
        "tps_after_resume": median(v for t, v in tps if resumed_at is not None
                                   and resumed_at + 1 < t <= healed_at),
        "resync_s": seconds_since(first_event(events, "eligibility", "arb", healed_at,
                                              eligible=standby), healed_at),
        "term_before": term_before, "term_after": term_after,
        "term_unchanged": _term_unchanged(term_before, term_after),
    }
    f["writes_resumed"] = f["write_outage_s"] is not None and resumed_at != healed_at
    f["resynced"] = f["resync_s"] is not None
    return verdict(f, expected={"writes_resumed": True, "lost_acked": 0, "promotions": 0,
                                "fences": 0, "ports_closed": 0, "term_unchanged": True},
                   measured=("standby_dropped_at_s", "resync_s"),
                   at_most={"write_outage_s": MAX_WRITE_GAP_S},
                   at_least={"tps_after_resume": RESUMED_TPS_SHARE * rate},
                   above={"acked": 0})


def switchover_metrics(records, events, started, primary, standby, addresses, ids, answer):
    """The figures and verdict of a switchover from `primary` to `standby` requested at
    `started`. answer: the agents' reply; ids: the probe ids on the new primary (on the old one
    if the switchover was refused)."""
    acks = acked(records)
    handover = first_event(events, "handover", "arb", started, primary=standby)
    f = {
        "done": bool(answer.get("done")), "reason": answer.get("reason"),
        "handover_at_s": seconds_since(handover, started),
        # the old primary acknowledges until its fence, so: the longest silence between two
        # acknowledgements from the request on
        "write_outage_s": longest_gap([r["ack"] for r in acks], started),
        "acked": len(acks), "lost_acked": lost(acks, ids),
        "acked_by_old_primary_after_handover": None if handover is None else sum(
            1 for r in acks if r["ack"] > handover and r["server"] == addresses[primary]),
        # from the handover to the arbiter's view naming the old primary eligible again
        "rejoined_s": seconds_since(first_event(events, "eligibility", "arb", handover,
                                                eligible=primary), handover),
    }
    f["rejoined"] = f["rejoined_s"] is not None
    return verdict(f, expected={"done": True, "lost_acked": 0,
                                "acked_by_old_primary_after_handover": 0},
                   measured=("handover_at_s", "write_outage_s", "rejoined_s"),
                   above={"acked": 0})


def jitter_metrics(records, events, start, end, ids, *, tps=(), agent_pauses=0,
                   term_before=None, term_after=None):
    """The figures and verdict of a degraded network over [start, end] (end: when the faults
    were healed). ids: the probe ids on the primary."""
    acks = acked(records)
    f = {
        "agent_pauses": agent_pauses,
        "promotions": count_events(events, "promoted", start),
        "fences": count_events(events, "fenced", start),
        "ports_closed": count_events(events, "port_closed", start, DB_HOSTS),
        "grants": count_events(events, "granted", start),
        "sync_drops": sum(1 for e in events if e["event"] == "eligibility"
                          and e["t"] >= start and e.get("eligible") is None),
        "acked": len(acks), "lost_acked": lost(acks, ids),
        "probe_failures": sum(1 for r in records if "error" in r),
        "longest_ack_gap_s": longest_gap([r["ack"] for r in acks], start, end)
        if end is not None else None,
        "median_tps": median(v for t, v in tps if end is not None and start <= t <= end),
        "slowest_minute_tps": slowest_minute_tps(tps, start, end),
        "term_before": term_before, "term_after": term_after,
        "term_unchanged": _term_unchanged(term_before, term_after),
    }
    return verdict(f, expected={"promotions": 0, "fences": 0, "ports_closed": 0, "grants": 0,
                                "sync_drops": 0, "lost_acked": 0, "term_unchanged": True},
                   measured=("median_tps",),
                   at_most={"longest_ack_gap_s": MAX_WRITE_GAP_S},
                   above={"acked": 0, "agent_pauses": 0, "slowest_minute_tps": 0})


def pingpong_metrics(runs, rounds, primary_rows, standby_rows):
    """The figures and verdict of `rounds` failovers: runs are their figures (failover()),
    primary_rows and standby_rows the (row count, md5 of the ids) of the probe table on each
    node at the end (None: could not be read)."""
    f = {
        "rounds": rounds, "rounds_run": len(runs),
        "promotions": sum(r["promotions"] for r in runs),
        "lost_acked": sum(r["lost_acked"] for r in runs),
        "acked_by_old_primary_after_cut": sum(r["acked_by_old_primary_after_cut"] for r in runs),
        "failover_s": [r["failover_s"] for r in runs],
        "rejoined_s": [r["rejoined_s"] for r in runs],
        "rows": primary_rows[0] if primary_rows else None,
        "checksum": primary_rows[1] if primary_rows else None,
        "data_equal": primary_rows is not None and primary_rows == standby_rows,
        "round_failures": {i: r["failed_checks"] for i, r in enumerate(runs, 1)
                           if r["failed_checks"]},
    }
    f["no_round_failed"] = not f["round_failures"]
    return verdict(f, expected={"rounds_run": rounds, "promotions": rounds, "lost_acked": 0,
                                "acked_by_old_primary_after_cut": 0, "data_equal": True,
                                "no_round_failed": True},
                   above={"rows": 0})


# -- load and faults, written once ------------------------------------------------------------
def _view(backend):
    return backend.host_status("arb").get("view") or {}


class LoadRun:
    """What under_load yields: the roles, the load, the agents paused so far, the arbiter's
    term when the load started and, once the block is left, when the faults were healed."""

    def __init__(self, backend, primary, probe, pgbench):
        self.backend, self.primary, self.standby = backend, primary, _other(primary)
        self.probe, self.pgbench = probe, pgbench
        self.paused = set()
        self.term_before = self.healed_at = self.started_at = None
        self.clock_offsets_ms = {}

    def pause_for(self, host, seconds):
        """Freeze host's agent for `seconds`: one command on the host (STOP; sleep; CONT)."""
        self.backend.pause_agent(host, seconds)

    def pause(self, host):
        self.paused.add(host)  # first: on any error, the exit sends SIGCONT
        self.backend.signal_agent(host, "STOP")

    def resume(self, host):
        self.backend.signal_agent(host, "CONT")
        self.paused.discard(host)

    def records(self):
        return self.probe.records()

    def tps(self):
        return self.pgbench.tps()

    def _resume_all(self):
        errors = []
        for host in sorted(self.paused):
            try:
                self.resume(host)
            except LabError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _heal(self):
        self.backend.heal()
        self.healed_at = time.time()


def check_clocks(backend, progress=None, limit=MAX_CLOCK_OFFSET_S):
    """Each host's clock offset against the lab machine's, in ms ({host: offset}); raises
    LabError when one is further than `limit`."""
    offsets = backend.clock_offsets()
    ms = {host: round(offset * 1000, 1) for host, (offset, _) in offsets.items()}
    if progress:
        progress("clock offsets (ms): " + ", ".join(
            f"{host} {ms[host]:+.1f} ±{error * 1000:.1f}" for host, (_, error) in offsets.items()))
    far = {host: v for host, v in ms.items() if abs(v) > limit * 1000}
    if far:
        raise LabError(f"clocks too far apart for the figures ({far} ms, limit "
                       f"{limit * 1000:.0f} ms): fix time sync on the machines first")
    return ms


@contextlib.contextmanager
def under_load(backend, progress, name, seconds=None, rate=100, deadline=PROBE_DEADLINE_S):
    """`with under_load(backend, progress, name) as run:` waits for a primary with a
    synchronous standby, starts the write probe and pgbench against it, and on leaving the
    block, whatever happened, resumes the agents paused with run.pause(), heals every fault,
    notes run.healed_at, then stops the probe and pgbench (in this order: the load sees the
    whole fault window, and every step runs even if one before it failed). seconds: how long
    the probe may run (probe.py stops by itself after 600 s by default); rate: pgbench's
    transactions per second (0: as fast as it goes); deadline: how long the write probe waits
    for a commit before it gives up on that connection (a client's own choice)."""
    offsets = check_clocks(backend, progress)
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 120, progress)
    work = backend.work_dir(name)
    probe = Probe(backend, work / "probe.jsonl", deadline=deadline, seconds=seconds)
    pgbench = Pgbench(backend, work / "pgbench.log", rate=rate)
    probe.prepare()
    pgbench.prepare()
    run = LoadRun(backend, primary, probe, pgbench)
    run.clock_offsets_ms = offsets
    run.term_before = _view(backend).get("term")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(pgbench.stop)
        cleanup.callback(probe.stop)
        cleanup.callback(run._heal)
        cleanup.callback(run._resume_all)
        run.started_at = time.time()
        probe.start()
        pgbench.start()
        yield run


def wait_for_rejoin(backend, progress, primary, old, timeout=120):
    """Wait until `old` streams as the synchronous standby of `primary` and the arbiter has
    made it eligible again: True, or False after timeout. (Only the wait: the figure comes
    from the arbiter's event.)"""
    def rejoined():
        return (backend.primary_with_sync_standby() == primary
                and _view(backend).get("eligible") == old)

    try:
        backend.wait_until(f"{old} back as the synchronous standby of {primary}", rejoined,
                           timeout, progress)
    except LabError:
        return False
    return True


def _probe_ids(backend, host):
    return [int(row[0]) for row in backend.sql(host, "select id from bobry_probe")]


def _report_dir(args, report_dir):
    return report_dir if report_dir is not None else getattr(args, "report_dir", None)


def publish(backend, name, run, result, report_dir=None):
    """Write the experiment's report folder (lab/report.py: the raw records, the timeline,
    the picture, report.md) into report_dir, or a new folder under the reports' root; its
    path goes into result["report_dir"]. Returns result."""
    from lab import report as reports
    folder = report_dir if report_dir is not None else reports.new_folder(name)
    reports.save(folder, name, result, run.records(), run.tps(), backend.events(),
                backend.addresses, run.started_at)
    result["report_dir"] = str(folder)
    return result


# -- the experiments ---------------------------------------------------------------------------
def failover(backend, progress, args=None, baseline=3.0, settle=8.0, report_dir=None):
    """Isolate the primary under load; wait for the promotion and for the load to move; run
    `create table x(i int)` on the former standby; heal; wait for the old primary to rejoin
    as the synchronous standby; measure. The report goes to report_dir (or args.report_dir,
    or a new folder). args.rate: pgbench's rate (default 100 tps, 0 as fast as it goes);
    args.bulk_mb: a bulk load of that many MiB starts after the baseline and the cut comes
    when half of it is written (the standby replays what it received before it promotes;
    the old primary writes on alone, and pg_rewind undoes that when it rejoins);
    args.probe_deadline: the write probe's commit deadline (default PROBE_DEADLINE_S)."""
    rate = getattr(args, "rate", None)
    bulk_mb = getattr(args, "bulk_mb", None) or 0
    deadline = getattr(args, "probe_deadline", None) or PROBE_DEADLINE_S
    with under_load(backend, progress, "failover", rate=100 if rate is None else rate,
                    deadline=deadline) as run, \
            contextlib.ExitStack() as bulk_cleanup:
        primary, standby = run.primary, run.standby
        new_address = backend.addresses[standby]
        time.sleep(baseline)
        bulk = None
        if bulk_mb:
            bulk = Bulk(backend, primary, bulk_mb, backend.work_dir("bulk") / "bulk.log")
            bulk_cleanup.callback(bulk.stop)
            bulk.start()
            backend.wait_until(f"{bulk_mb // 2} MiB of the bulk load written",
                               lambda: bulk.written_mb() >= bulk_mb / 2, 600, progress)
        progress(f"isolating the primary {primary}")
        cut_at = backend.isolate(primary)
        bulk_at_cut = bulk.written_mb() if bulk else None

        def promoted():
            return any(e["event"] == "promoted" and e["node"] == standby and e["t"] >= cut_at
                       for e in backend.events())

        def write_on_new_primary():
            return any(r.get("server") == new_address for r in acked(run.records()))

        backend.wait_until(f"{standby} promoted", promoted, 60, progress)
        backend.wait_until(f"a write acknowledged by {standby}", write_on_new_primary, 30,
                           progress)
        time.sleep(settle)
        port = backend.config(standby).me.pg_port
        create = backend.client_sql("drop table if exists x; create table x(i int)",
                                    dsn=backend.dsn(host=new_address, port=port))
        fenced_while_isolated = bool(backend.host_status(primary).get("fenced"))
        bulk_alone = round(bulk.written_mb() - bulk_at_cut, 1) if bulk else None
    wait_for_rejoin(backend, progress, standby, primary)
    figures = failover_metrics(
        run.records(), backend.events(), cut_at, primary, standby, backend.addresses,
        _probe_ids(backend, standby), healed_at=run.healed_at, tps=run.tps(),
        create_table_ok=create.returncode == 0,  # psql's NOTICE on stderr is not an error
        create_table_error=(create.stderr.strip() or None) if create.returncode else None,
        old_primary_fenced=fenced_while_isolated, pgbench_restarts=run.pgbench.restarts())
    return publish(backend, "failover", run, {
        "backend": backend.name, "old_primary": primary, "new_primary": standby,
        "cut_at": cut_at, "healed_at": run.healed_at, "pgbench_rate": run.pgbench.rate,
        "probe_deadline_s": deadline,
        "bulk_mb": bulk_mb or None, "bulk_mb_at_cut": bulk_at_cut,
        "bulk_mb_written_alone": bulk_alone,
        "clock_offsets_ms": run.clock_offsets_ms, **figures}, _report_dir(args, report_dir))


def standby_loss(backend, progress, args=None, baseline=3.0, cut_for=8.0, report_dir=None):
    """Isolate the standby under load: the primary must take writes again within seconds, no
    one may promote, and after the heal the standby must become eligible again."""
    with under_load(backend, progress, "standby-loss") as run:
        time.sleep(baseline)
        progress(f"isolating the standby {run.standby}")
        cut_at = backend.isolate(run.standby)
        time.sleep(cut_for)
    wait_for_rejoin(backend, progress, run.primary, run.standby)
    figures = standby_loss_metrics(
        run.records(), backend.events(), cut_at, run.healed_at, run.primary, run.standby,
        _probe_ids(backend, run.primary), tps=run.tps(), rate=run.pgbench.rate,
        term_before=run.term_before, term_after=_view(backend).get("term"))
    return publish(backend, "standby-loss", run, {
        "backend": backend.name, "primary": run.primary, "standby": run.standby,
        "cut_at": cut_at, "healed_at": run.healed_at,
        "clock_offsets_ms": run.clock_offsets_ms, **figures}, _report_dir(args, report_dir))


CHECKSUM_SQL = ("select count(*), coalesce(md5(string_agg(id::text, ',' order by id)), '') "
                "from bobry_probe")


def pingpong(backend, progress, args=None, rounds=None, report_dir=None):
    """`rounds` failovers back and forth, each healed and rejoined before the next; at the end
    both nodes must hold the same probe rows. The report folder holds each round's (round-N)."""
    from lab import report as reports
    rounds = rounds if rounds is not None else getattr(args, "rounds", 3)
    folder = _report_dir(args, report_dir)
    folder = Path(folder) if folder is not None else reports.new_folder("pingpong")
    runs = []
    for round_no in range(1, rounds + 1):
        progress(f"pingpong round {round_no}/{rounds}")
        runs.append(failover(backend, progress, settle=2.0,
                             report_dir=folder / f"round-{round_no}"))
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 60, progress)
    standby = _other(primary)

    def rows(host):
        [[count, checksum]] = backend.sql(host, CHECKSUM_SQL)
        return int(count), checksum

    with contextlib.suppress(LabError):  # not equal in time: pingpong_metrics says so
        backend.wait_until("the standby replays everything",
                           lambda: rows(primary) == rows(standby), 30)
    offsets = {}  # the largest offset of each host over the rounds
    for r in runs:
        for host, value in r["clock_offsets_ms"].items():
            offsets[host] = max(offsets.get(host, value), value, key=abs)
    result = {"backend": backend.name, "clock_offsets_ms": offsets,
              **pingpong_metrics(runs, rounds, rows(primary), rows(standby))}
    reports.save_summary(folder, f"Pingpong experiment ({backend.name} lab): {rounds} "
                         "failovers back and forth", result, report("pingpong", result))
    result["report_dir"] = str(folder)
    return result


def switchover(backend, progress, args=None, baseline=3.0, settle=3.0, report_dir=None):
    """A planned switchover under load: the roles swap, nothing acknowledged is lost, the old
    primary comes back as the eligible synchronous standby."""
    with under_load(backend, progress, "switchover") as run:
        primary, standby = run.primary, run.standby
        time.sleep(baseline)
        progress(f"switchover: {primary} hands over to {standby}")
        started = time.time()
        answer = backend.switchover()
        if answer.get("done"):
            backend.wait_until(f"a write acknowledged by {standby}", lambda: any(
                r.get("server") == backend.addresses[standby] for r in acked(run.records())),
                30, progress)
            time.sleep(settle)
    if answer.get("done"):
        wait_for_rejoin(backend, progress, standby, primary)
    figures = switchover_metrics(
        run.records(), backend.events(), started, primary, standby, backend.addresses,
        _probe_ids(backend, standby if answer.get("done") else primary), answer)
    return publish(backend, "switchover", run, {
        "backend": backend.name, "old_primary": primary, "new_primary": standby,
        "started_at": started, "clock_offsets_ms": run.clock_offsets_ms, **figures},
        _report_dir(args, report_dir))


def jitter(backend, progress, args=None, minutes=None, pause=0.5, every=15.0, loss=0.05,
           rate="10mbit", baseline=3.0, hog="primary", report_dir=None):
    """A degraded but working network for `minutes`: `loss` random packet loss into every
    host, a bandwidth cap on the primary, SIGSTOP pauses of `pause` s (half of
    fence_timeout) of one agent after another, and a CPU hog (a busy loop) on the host `hog`
    ("primary", a host's name, or None). Nothing may fence, promote or drop the standby
    from sync, and writes must go on."""
    minutes = minutes if minutes is not None else getattr(args, "minutes", 5.0)
    pause = getattr(args, "pause", None) or pause
    hog = getattr(args, "hog", hog)
    pauses = 0
    with under_load(backend, progress, "jitter") as run, contextlib.ExitStack() as hogs:
        time.sleep(baseline)
        start = time.time()
        for host in HOSTS:
            backend.set_loss(host, loss)
        backend.cap_bandwidth(run.primary, rate)
        hog = run.primary if hog == "primary" else None if hog == "none" else hog
        if hog is not None:
            # bounded by `timeout` too, should this process die before it stops the hog
            busy = backend.spawn(hog, ["timeout", str(int(minutes * 60 + 60)), "sh", "-c",
                                       "while :; do :; done"], "/dev/null")
            hogs.callback(busy.stop)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(max(0.0, min(every, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            host = AGENT_HOSTS[pauses % len(AGENT_HOSTS)]
            run.pause_for(host, pause)
            pauses += 1
            progress(f"\rjitter: {time.time() - start:.0f} s, paused {host}'s agent", end="")
        progress("")
    figures = jitter_metrics(
        run.records(), backend.events(), start, run.healed_at,
        _probe_ids(backend, run.primary), tps=run.tps(), agent_pauses=pauses,
        term_before=run.term_before, term_after=_view(backend).get("term"))
    return publish(backend, "jitter", run, {
        "backend": backend.name, "primary": run.primary, "minutes": minutes, "loss": loss,
        "bandwidth_cap": rate, "pause_s": pause, "cpu_hog": hog, "started_at": start,
        "healed_at": run.healed_at, "clock_offsets_ms": run.clock_offsets_ms, **figures},
        _report_dir(args, report_dir))


EXPERIMENTS = {"failover": failover, "jitter": jitter, "pingpong": pingpong,
               "switchover": switchover, "standby-loss": standby_loss}


# -- reports ---------------------------------------------------------------------------------
def _s(value):
    return "-" if value is None else f"+{value:.2f} s"


def _v(value, unit=" s"):
    return "not measured" if value is None else f"{value}{unit}"


def _verdict(f):
    return "OK" if f["ok"] else "FAILED: " + ", ".join(f["failed_checks"])


def _lines(title, rows, f):
    """A report: the title, one line per (label, value) row, the hosts' clock offsets
    against the lab machine's, and the verdict."""
    if f.get("clock_offsets_ms"):
        rows = [*rows, ("clock offsets (ms)", ", ".join(
            f"{host} {ms:+.1f}" for host, ms in f["clock_offsets_ms"].items()))]
    return [title, *(f"  {label:<34}{value}" for label, value in rows),
            f"  {'verdict':<34}{_verdict(f)}"]


def _report_jitter(f):
    title = (f"Jitter experiment ({f['backend']} lab): {f['minutes']} min of {f['loss']:.0%} "
             f"packet loss into every host, {f['bandwidth_cap']} cap on the primary, "
             f"{f['agent_pauses']} agent pauses of {f['pause_s']} s"
             + (f", a CPU hog on {f['cpu_hog']}" if f.get("cpu_hog") else ""))
    return _lines(title, [
        ("promotions, grants", f"{f['promotions']}, {f['grants']}"),
        ("fences (agent, kernel)", f"{f['fences']}, {f['ports_closed']}"),
        ("standby dropped from sync", f"{f['sync_drops']} times"),
        ("arbiter's term", f"{f['term_before']} -> {f['term_after']}"),
        ("acknowledged writes",
         f"{f['acked']}, lost {f['lost_acked']}, probe failures {f['probe_failures']}"),
        ("longest gap between acks",
         f"{_v(f['longest_ack_gap_s'])} (bound <= {MAX_WRITE_GAP_S} s)"),
        ("pgbench median tps", _v(f["median_tps"], "")),
        ("pgbench tps, slowest minute", f"{_v(f['slowest_minute_tps'], '')} (bound > 0)"),
    ], f)


def _report_failover(f):
    old, new = f["old_primary"], f["new_primary"]
    tps_line = " ".join(f"{t:+d}:{tps:.0f}" for t, tps in tps_timeline(f["tps"]))
    create = "ok" if f["create_table_ok"] else f"FAILED: {f['create_table_error']}"
    title = f"Failover experiment ({f['backend']} lab): isolate the primary {old} under load"
    return _lines(title, [
        ("cut at", time.strftime("%H:%M:%S", time.localtime(f["cut_at"]))),
        (f"{old}'s port closed (kernel)", _s(f["fenced_at_s"])),
        (f"{old}'s agent logged its fence", _s(f["agent_fenced_at_s"])),
        (f"arb granted {new} a new term", _s(f["granted_at_s"])),
        (f"{new} promoted", _s(f["promoted_at_s"])),
        ("port closed before the grant", "yes" if f["fenced_before_grant"] else "NO"),
        (f"first write acked by {new}", f"{_s(f['failover_s'])}   (failover_s)"),
        ("write outage", (f"{_v(f['write_outage_s'])} (longest silence from the cut to "
                          f"the first write on {new})")),
        ("acknowledged writes", f"{f['acked']}, lost {f['lost_acked']}"),
        (f"acked by {old} after the cut", f["acked_by_old_primary_after_cut"]),
        ("promotions", f["promotions"]),
        (f"create table x(i int) on {new}", create),
        (f"{old} while isolated", "fenced" if f["old_primary_fenced"] else "NOT fenced"),
        (f"{old} after the heal", f"eligible sync standby again after {f['rejoined_s']} s"
         if f["rejoined"] else "did NOT rejoin"),
        ("rewind", f["divergence"] or "-"),
        *_load_rows(f, old),
        (f"pgbench tps by second from the cut (restarted {f['pgbench_restarts']} times)",
         f"\n    {tps_line}"),
    ], f)


def _load_rows(f, old):
    """The load's own rows: pgbench's rate, and the bulk load's when there was one."""
    rate = f.get("pgbench_rate", 100)
    rows = [("pgbench rate", f"{rate} tps" if rate else "unthrottled"),
            # a report of before the option: the probe's deadline was 1 s then
            ("write probe's commit deadline", f"{f.get('probe_deadline_s', 1.0)} s")]
    if f.get("bulk_mb"):
        rows += [("bulk load", f"{f['bulk_mb']} MiB in one transaction: {f['bulk_mb_at_cut']} "
                               f"MiB of WAL at the cut, {f['bulk_mb_written_alone']} MiB more "
                               f"on {old} alone")]
    return rows


def _report_pingpong(f):
    title = f"Pingpong experiment ({f['backend']} lab): {f['rounds']} failovers back and forth"
    return _lines(title, [
        ("promotions", f["promotions"]),
        ("failover_s per round", f["failover_s"]),
        ("rejoined after heal (s)", f["rejoined_s"]),
        ("lost acknowledged writes", f["lost_acked"]),
        ("acked by a replaced primary", f["acked_by_old_primary_after_cut"]),
        ("probe rows", f"{f['rows']} on both nodes, md5 {f['checksum']}" if f["data_equal"]
         else "DIFFER between the nodes"),
    ], f)


def _report_switchover(f):
    title = (f"Switchover experiment ({f['backend']} lab): {f['old_primary']} hands over to "
             f"{f['new_primary']} under load")
    return _lines(title, [
        ("done", f"{f['done']} ({f['reason']})"),
        ("arbiter's handover", f"{_s(f['handover_at_s'])} after the request"),
        ("write outage", _v(f["write_outage_s"])),
        ("acknowledged writes", f"{f['acked']}, lost {f['lost_acked']}"),
        ("acked by the old primary after it", f["acked_by_old_primary_after_handover"]),
        ("old primary eligible again", f"{_v(f['rejoined_s'])} after the handover"),
    ], f)


def _report_standby_loss(f):
    title = (f"Standby-loss experiment ({f['backend']} lab): isolate the standby "
             f"{f['standby']} under load")
    return _lines(title, [
        (f"writes on {f['primary']} stopped for",
         f"{_v(f['write_outage_s'])} (bound <= {MAX_WRITE_GAP_S} s)"),
        ("standby dropped from sync", f"{_s(f['standby_dropped_at_s'])} after the cut"),
        ("pgbench after the resume", f"{_v(f['tps_after_resume'], ' tps')} (median)"),
        ("acknowledged writes", f"{f['acked']}, lost {f['lost_acked']}"),
        ("promotions, fences (agent/kernel)",
         f"{f['promotions']}, {f['fences']}, {f['ports_closed']}"),
        ("arbiter's term", f"{f['term_before']} -> {f['term_after']}"),
        ("standby eligible again", f"{_v(f['resync_s'])} after the heal"),
    ], f)


REPORTS = {"standby-loss": _report_standby_loss, "failover": _report_failover,
           "jitter": _report_jitter, "pingpong": _report_pingpong,
           "switchover": _report_switchover}


def report(name, figures):
    return "\n".join(REPORTS[name](figures))
