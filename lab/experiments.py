"""Scripted experiments: each sets up load, injects a fault, measures, cleans up after itself
(load stopped, faults healed) and returns a dict of figures; report() makes it readable.

A figure that a trial could not measure is None, and a None figure fails the verdict: a missing
measurement never reads as a good one.

Event names relied on (backend.events(): every host's events.jsonl plus what the lab saw the
kernel do, merged by wall-clock "t"):
  agents    "fenced", "promoted", "rejoined" (node: a database host)
  arbiter   "granted", "handover", "eligibility" (node "arb"; fields primary, term, eligible)
  kernel    "port_closed", "port_open" (node: the database host whose PostgreSQL port the
            fence closed or opened)"""
import statistics
import time

from lab.backend import AGENT_HOSTS, DB_HOSTS, HOSTS, LabError
from lab.load import Pgbench, Probe


def _other(host):
    return next(h for h in DB_HOSTS if h != host)


# -- pure helpers over the raw records ----------------------------------------------------------
def acked(records):
    return [r for r in records if "ack" in r]


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
    present = set(new_ids)
    f = {
        "failover_s": seconds_since(first_on_new, cut_at),
        # until the new primary's first write; an old-primary ack in flight at the cut
        # does not end the outage
        "write_outage_s": longest_gap([r["ack"] for r in acks], cut_at, first_on_new)
        if first_on_new is not None else None,
        "acked": len(acks),
        "lost_acked": sum(1 for r in acks if r["id"] not in present),
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


def _under_load(backend, progress, name):
    """A primary with a synchronous standby, and the probe and pgbench running against it:
    (primary, standby, probe, pgbench)."""
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 120, progress)
    work = backend.work_dir(name)
    probe = Probe(backend, work / "probe.jsonl")
    pgbench = Pgbench(backend, work / "pgbench.log")
    probe.prepare()
    pgbench.prepare()
    probe.start()
    pgbench.start()
    return primary, _other(primary), probe, pgbench


def _view(backend):
    return backend.host_status("arb").get("view") or {}


def wait_for_rejoin(backend, progress, primary, old, timeout=120):
    """Seconds until `old` streams as the synchronous standby of `primary` and the arbiter
    has made it eligible again; None if that did not happen within timeout."""
    began = time.monotonic()

    def rejoined():
        return (backend.primary_with_sync_standby() == primary
                and _view(backend).get("eligible") == old)

    try:
        backend.wait_until(f"{old} back as the synchronous standby of {primary}", rejoined,
                           timeout, progress)
    except LabError:
        return None
    return round(time.monotonic() - began, 2)


def _checks(figures, expected):
    figures["failed_checks"] = [f"{k}={figures[k]}" for k, v in expected.items()
                                if figures[k] != v]
    figures["ok"] = not figures["failed_checks"]
    return figures


def failover(backend, progress, args=None, baseline=3.0, settle=8.0):
    """Isolate the primary under load; wait for the promotion and for the load to move; run
    `create table x(i int)` on the former standby; heal; wait for the old primary to rejoin
    as the synchronous standby; measure."""
    primary, standby, probe, pgbench = _under_load(backend, progress, "failover")
    new_address = backend.addresses[standby]
    try:
        time.sleep(baseline)
        progress(f"isolating the primary {primary}")
        cut_at = backend.isolate(primary)

        def promoted():
            return any(e["event"] == "promoted" and e["node"] == standby and e["t"] >= cut_at
                       for e in backend.events())

        def write_on_new_primary():
            return any(r.get("server") == new_address for r in acked(probe.records()))

        backend.wait_until(f"{standby} promoted", promoted, 60, progress)
        backend.wait_until(f"a write acknowledged by {standby}", write_on_new_primary, 30,
                           progress)
        time.sleep(settle)
        port = backend.config(standby).me.pg_port
        create = backend.client_sql("drop table if exists x; create table x(i int)",
                                    dsn=backend.dsn(host=new_address, port=port))
        fenced_while_isolated = bool(backend.host_status(primary).get("fenced"))
    finally:
        probe.stop()
        pgbench.stop()
        backend.heal()
        healed_at = time.time()
    wait_for_rejoin(backend, progress, standby, primary)
    new_ids = [int(row[0]) for row in backend.sql(standby, "select id from bobry_probe")]
    figures = failover_metrics(
        probe.records(), backend.events(), cut_at, primary, standby, backend.addresses, new_ids,
        healed_at=healed_at, tps=pgbench.tps(), create_table_ok=create.returncode == 0,
        create_table_error=create.stderr.strip() or None,
        old_primary_fenced=fenced_while_isolated, pgbench_restarts=pgbench.restarts())
    return {"backend": backend.name, "old_primary": primary, "new_primary": standby,
            "cut_at": cut_at, "healed_at": healed_at, **figures}


def standby_loss(backend, progress, args=None, baseline=3.0, cut_for=8.0):
    """Isolate the standby under load: the primary must take writes again within seconds, no
    one may promote, and after the heal the standby must become eligible again."""
    primary, standby, probe, pgbench = _under_load(backend, progress, "standby-loss")
    try:
        time.sleep(baseline)
        progress(f"isolating the standby {standby}")
        cut_at = backend.isolate(standby)
        time.sleep(cut_for)
    finally:
        probe.stop()
        pgbench.stop()
        backend.heal()
    resynced_s = wait_for_rejoin(backend, progress, primary, standby)
    acks = acked(probe.records())
    after = [r["ack"] for r in acks if r["ack"] > cut_at]
    before = [r["ack"] for r in acks if r["ack"] <= cut_at]
    ids = {int(row[0]) for row in backend.sql(primary, "select id from bobry_probe")}
    events = [e for e in backend.events() if e["t"] >= cut_at]
    figures = {
        "backend": backend.name, "primary": primary, "standby": standby,
        "write_outage_s": round(min(after) - max(before), 3) if before and after else None,
        "acked": len(acks), "lost_acked": sum(1 for r in acks if r["id"] not in ids),
        "promotions": sum(1 for e in events if e["event"] == "promoted"),
        "fences": sum(1 for e in events if e["event"] == "fenced"),
        "resync_s": resynced_s, "resynced": resynced_s is not None,
    }
    figures["writes_resumed"] = figures["write_outage_s"] is not None
    return _checks(figures, {"writes_resumed": True, "lost_acked": 0, "promotions": 0,
                             "fences": 0, "resynced": True})


CHECKSUM_SQL = ("select count(*), coalesce(md5(string_agg(id::text, ',' order by id)), '') "
                "from bobry_probe")


def pingpong(backend, progress, args=None, rounds=None):
    """`rounds` failovers back and forth, each healed and rejoined before the next; at the end
    both nodes must hold the same probe rows."""
    rounds = rounds if rounds is not None else getattr(args, "rounds", 3)
    runs = []
    for round_no in range(1, rounds + 1):
        progress(f"pingpong round {round_no}/{rounds}")
        runs.append(failover(backend, progress, settle=2.0))
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 60, progress)
    standby = _other(primary)

    def equal():
        return backend.sql(primary, CHECKSUM_SQL) == backend.sql(standby, CHECKSUM_SQL)

    try:
        backend.wait_until("the standby replays everything", equal, 30)
        data_equal = True
    except LabError:
        data_equal = False
    [[count, checksum]] = backend.sql(primary, CHECKSUM_SQL)
    figures = {
        "backend": backend.name, "rounds": rounds,
        "promotions": sum(r["promotions"] for r in runs),
        "lost_acked": sum(r["lost_acked"] for r in runs),
        "acked_by_old_primary_after_cut": sum(r["acked_by_old_primary_after_cut"] for r in runs),
        "failover_s": [r["failover_s"] for r in runs],
        "rejoined_s": [r["rejoined_s"] for r in runs],
        "rows": int(count), "checksum": checksum, "data_equal": data_equal,
        "round_failures": {i: r["failed_checks"] for i, r in enumerate(runs, 1)
                           if r["failed_checks"]},
    }
    figures["no_round_failed"] = not figures["round_failures"]
    return _checks(figures, {"promotions": rounds, "lost_acked": 0,
                             "acked_by_old_primary_after_cut": 0, "data_equal": True,
                             "no_round_failed": True})


def switchover(backend, progress, args=None, baseline=3.0, settle=3.0):
    """A planned switchover under load: the roles swap, nothing acknowledged is lost."""
    primary, standby, probe, pgbench = _under_load(backend, progress, "switchover")
    try:
        time.sleep(baseline)
        progress(f"switchover: {primary} hands over to {standby}")
        started = time.time()
        answer = backend.switchover()
        if answer.get("done"):
            backend.wait_until(f"a write acknowledged by {standby}", lambda: any(
                r.get("server") == backend.addresses[standby] for r in acked(probe.records())),
                30, progress)
            time.sleep(settle)
    finally:
        probe.stop()
        pgbench.stop()
    rejoined_s = wait_for_rejoin(backend, progress, standby, primary) if answer.get("done") \
        else None
    records = probe.records()
    acks = acked(records)
    ids = {int(row[0]) for row in backend.sql(standby if answer.get("done") else primary,
                                              "select id from bobry_probe")}
    after = [r for r in acks if r["ack"] > started]
    # the old primary acknowledges until the handover, so the outage is the longest silence
    # between two acknowledgements from the request on
    times = [r["ack"] for r in acks]
    gaps = [b - a for a, b in zip(times, times[1:]) if b > started]
    handed = [e["t"] for e in backend.events() if e["event"] == "handover" and e["t"] >= started]
    figures = {
        "backend": backend.name, "old_primary": primary, "new_primary": standby,
        "done": bool(answer.get("done")), "reason": answer.get("reason"),
        "write_outage_s": round(max(gaps), 3) if gaps else None,
        "acked": len(acks), "lost_acked": sum(1 for r in acks if r["id"] not in ids),
        "acked_by_old_primary_after_handover": sum(
            1 for r in after if handed and r["ack"] > handed[0]
            and r["server"] == backend.addresses[primary]),
        "rejoined_s": rejoined_s, "rejoined": rejoined_s is not None,
    }
    return _checks(figures, {"done": True, "lost_acked": 0,
                             "acked_by_old_primary_after_handover": 0, "rejoined": True})


def jitter(backend, progress, args=None, minutes=None, pause=0.5, every=15.0, loss=0.05,
           rate="10mbit"):
    """A degraded but working network for `minutes`: `loss` random packet loss into every
    host, a bandwidth cap on the primary, and SIGSTOP pauses of `pause` s (half of
    fence_timeout) of one agent after another. Nothing may fence or promote."""
    minutes = minutes if minutes is not None else getattr(args, "minutes", 5.0)
    primary, _, probe, pgbench = _under_load(backend, progress, "jitter")
    start = time.time()
    paused = []
    try:
        for host in HOSTS:
            backend.set_loss(host, loss)
        backend.cap_bandwidth(primary, rate)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(max(0.0, min(every, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            host = AGENT_HOSTS[len(paused) % len(AGENT_HOSTS)]
            backend.signal_agent(host, "STOP")
            time.sleep(pause)
            backend.signal_agent(host, "CONT")
            paused.append(host)
            progress(f"\rjitter: {time.time() - start:.0f} s, paused {host}'s agent", end="")
        progress("")
    finally:
        for host in AGENT_HOSTS:
            if backend.agent_pid(host):
                backend.signal_agent(host, "CONT")
        backend.heal()
        probe.stop()
        pgbench.stop()
    events = [e for e in backend.events() if e["t"] >= start]
    acks = acked(probe.records())
    gaps = [b["ack"] - a["ack"] for a, b in zip(acks, acks[1:])]
    ids = {int(row[0]) for row in backend.sql(primary, "select id from bobry_probe")}
    tps = [t for _, t in pgbench.tps()]
    figures = {
        "backend": backend.name, "minutes": minutes, "loss": loss, "bandwidth_cap": rate,
        "agent_pauses": len(paused), "pause_s": pause,
        "promotions": sum(1 for e in events if e["event"] == "promoted"),
        "fences": sum(1 for e in events if e["event"] == "fenced"),
        "grants": sum(1 for e in events if e["event"] == "granted"),
        "sync_drops": sum(1 for e in events if e["event"] == "eligibility"
                          and e.get("eligible") is None),
        "acked": len(acks), "lost_acked": sum(1 for r in acks if r["id"] not in ids),
        "probe_failures": sum(1 for r in probe.records() if "error" in r),
        "longest_ack_gap_s": round(max(gaps), 3) if gaps else None,
        "median_tps": statistics.median(tps) if tps else 0,
    }
    return _checks(figures, {"promotions": 0, "fences": 0, "lost_acked": 0})


EXPERIMENTS = {"failover": failover, "jitter": jitter, "pingpong": pingpong,
               "switchover": switchover, "standby-loss": standby_loss}


def _s(value):
    return "-" if value is None else f"+{value:.2f} s"


def _v(value, unit=" s"):
    return "not measured" if value is None else f"{value}{unit}"


def _verdict(f):
    return "OK" if f["ok"] else "FAILED: " + ", ".join(f["failed_checks"])


def _report_jitter(f):
    return [f"Jitter experiment ({f['backend']} lab): {f['minutes']} min of {f['loss']:.0%} "
            f"packet loss into every host, {f['bandwidth_cap']} cap on the primary, "
            f"{f['agent_pauses']} agent pauses of {f['pause_s']} s",
            f"  promotions                {f['promotions']}",
            f"  fences                    {f['fences']}",
            f"  standby dropped from sync {f['sync_drops']} times",
            f"  acknowledged writes       {f['acked']}, lost {f['lost_acked']}, probe failures "
            f"{f['probe_failures']}, longest gap {f['longest_ack_gap_s']} s",
            f"  pgbench median tps        {f['median_tps']}",
            f"  verdict                   {_verdict(f)}"]


def _lines(title, rows, f):
    """A report: the title, one line per (label, value) row, and the verdict."""
    return [title, *(f"  {label:<34}{value}" for label, value in rows),
            f"  {'verdict':<34}{_verdict(f)}"]


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
        (f"pgbench tps by second from the cut (restarted {f['pgbench_restarts']} times)",
         f"\n    {tps_line}"),
    ], f)


def _report_pingpong(f):
    return [f"Pingpong experiment ({f['backend']} lab): {f['rounds']} failovers back and forth",
            f"  promotions                {f['promotions']}",
            f"  failover_s per round      {f['failover_s']}",
            f"  rejoined after heal (s)   {f['rejoined_s']}",
            f"  lost acknowledged writes  {f['lost_acked']}",
            f"  acked by a replaced primary {f['acked_by_old_primary_after_cut']}",
            f"  probe rows                {f['rows']} on both nodes, md5 {f['checksum']}"
            if f["data_equal"] else "  probe rows                DIFFER between the nodes",
            f"  verdict                   {_verdict(f)}"]


def _report_switchover(f):
    return [f"Switchover experiment ({f['backend']} lab): {f['old_primary']} hands over to "
            f"{f['new_primary']} under load",
            f"  done                      {f['done']} ({f['reason']})",
            f"  write outage              {f['write_outage_s']} s",
            f"  acknowledged writes       {f['acked']}, lost {f['lost_acked']}",
            f"  acked by the old primary after the handover "
            f"{f['acked_by_old_primary_after_handover']}",
            f"  old primary back as sync standby after {f['rejoined_s']} s",
            f"  verdict                   {_verdict(f)}"]


def _report_standby_loss(f):
    return [f"Standby-loss experiment ({f['backend']} lab): isolate the standby {f['standby']} "
            "under load",
            f"  writes on {f['primary']} stopped for  {f['write_outage_s']} s",
            f"  acknowledged writes       {f['acked']}, lost {f['lost_acked']}",
            f"  promotions, fences        {f['promotions']}, {f['fences']}",
            f"  standby eligible again    {f['resync_s']} s after the heal",
            f"  verdict                   {_verdict(f)}"]


REPORTS = {"standby-loss": _report_standby_loss, "failover": _report_failover, "jitter": _report_jitter,
           "pingpong": _report_pingpong, "switchover": _report_switchover}


def report(name, figures):
    return "\n".join(REPORTS[name](figures))
