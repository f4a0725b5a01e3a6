"""Scripted experiments: each sets up load, injects a fault, measures, cleans up after itself
(load stopped, faults healed) and returns a dict of figures; report() makes it readable."""
import statistics
import time

from lab.backend import AGENT_HOSTS, DB_HOSTS, HOSTS
from lab.load import Pgbench, Probe


def _other(host):
    return next(h for h in DB_HOSTS if h != host)


def acked(records):
    return [r for r in records if "ack" in r]


def failover_metrics(records, events, cut_at, primary, standby, addresses, new_ids):
    """The figures of one failover, from the probe's records, the agents' events (wall-clock)
    and the ids present on the new primary. Pure, so that it is tested on its own."""
    acks = acked(records)
    before = [r["ack"] for r in acks if r["ack"] <= cut_at]
    after = [r for r in acks if r["ack"] > cut_at]
    on_new = [r["ack"] for r in after if r["server"] == addresses[standby]]

    def first(kind, node):
        times = [e["t"] - cut_at for e in events if e["event"] == kind and e["node"] == node
                 and e["t"] >= cut_at]
        return round(min(times), 3) if times else None

    present = set(new_ids)
    return {
        "failover_s": round(min(on_new) - cut_at, 3) if on_new else None,
        "write_outage_s": round(min(r["ack"] for r in after) - max(before), 3)
        if before and after else None,
        "acked": len(acks),
        "lost_acked": sum(1 for r in acks if r["id"] not in present),
        "acked_by_old_primary_after_cut": sum(1 for r in after
                                              if r["server"] == addresses[primary]),
        "promotions": sum(1 for e in events if e["event"] == "promoted" and e["t"] >= cut_at),
        "fenced_at_s": first("fenced", primary),
        "granted_at_s": first("granted", "arb"),
        "promoted_at_s": first("promoted", standby),
    }


def _start_load(backend, name):
    work = backend.work_dir(name)
    probe = Probe(backend, work / "probe.jsonl")
    pgbench = Pgbench(backend, work / "pgbench.log")
    probe.prepare()
    pgbench.prepare()
    probe.start()
    pgbench.start()
    return probe, pgbench


def failover(backend, progress, args=None, baseline=3.0, settle=8.0):
    """Isolate the primary under load; wait for the promotion and for the load to move; run
    `create table x(i int)` on the former standby; heal; measure."""
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 120, progress)
    standby = _other(primary)
    probe, pgbench = _start_load(backend, "failover")
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
    finally:
        probe.stop()
        pgbench.stop()
        backend.heal()
    time.sleep(2.0)  # the healed old primary hears that it was replaced
    old = backend.host_status(primary)
    new_ids = [int(row[0]) for row in backend.sql(standby, "select id from bobry_probe")]
    figures = failover_metrics(probe.records(), backend.events(), cut_at, primary, standby,
                               backend.addresses, new_ids)
    figures.update(
        backend=backend.name, old_primary=primary, new_primary=standby,
        cut_at=cut_at, create_table_ok=create.returncode == 0,
        create_table_error=create.stderr.strip() or None,
        old_primary_fenced=bool(old.get("fenced")),
        old_primary_after_heal=old.get("role"),
        pgbench_restarts=pgbench.restarts(),
        tps=[[round(t - cut_at), tps] for t, tps in pgbench.tps()],
    )
    figures["fenced_before_promotion"] = (figures["fenced_at_s"] is not None
                                          and figures["promoted_at_s"] is not None
                                          and figures["fenced_at_s"] < figures["promoted_at_s"])
    expected = {"lost_acked": 0, "acked_by_old_primary_after_cut": 0, "promotions": 1,
                "create_table_ok": True, "old_primary_fenced": True,
                "fenced_before_promotion": True}
    figures["failed_checks"] = [f"{k}={figures[k]}" for k, v in expected.items()
                                if figures[k] != v]
    figures["ok"] = not figures["failed_checks"]
    return figures


def jitter(backend, progress, args=None, minutes=None, pause=0.5, every=15.0, loss=0.05,
           rate="10mbit"):
    """A degraded but working network for `minutes`: `loss` random packet loss into every
    host, a bandwidth cap on the primary, and SIGSTOP pauses of `pause` s (half of
    fence_timeout) of one agent after another. Nothing may fence or promote."""
    minutes = minutes if minutes is not None else getattr(args, "minutes", 5.0)
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 120, progress)
    probe, pgbench = _start_load(backend, "jitter")
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
        "acked": len(acks), "lost_acked": sum(1 for r in acks if r["id"] not in ids),
        "probe_failures": sum(1 for r in probe.records() if "error" in r),
        "longest_ack_gap_s": round(max(gaps), 3) if gaps else None,
        "median_tps": statistics.median(tps) if tps else 0,
    }
    figures["ok"] = figures["promotions"] == 0 and figures["fences"] == 0 \
        and figures["lost_acked"] == 0
    return figures


EXPERIMENTS = {"failover": failover, "jitter": jitter}


def _s(value):
    return "-" if value is None else f"+{value:.2f} s"


def report(name, f):
    if name == "jitter":
        return "\n".join([
            f"Jitter experiment ({f['backend']} lab): {f['minutes']} min of {f['loss']:.0%} "
            f"packet loss into every host, {f['bandwidth_cap']} cap on the primary, "
            f"{f['agent_pauses']} agent pauses of {f['pause_s']} s",
            f"  promotions            {f['promotions']}",
            f"  fences                {f['fences']}",
            f"  acknowledged writes   {f['acked']}, lost {f['lost_acked']}, "
            f"probe failures {f['probe_failures']}, longest gap {f['longest_ack_gap_s']} s",
            f"  pgbench median tps    {f['median_tps']}",
            f"  verdict               {'OK' if f['ok'] else 'FAILED'}"])
    old, new = f["old_primary"], f["new_primary"]
    buckets = {}
    for t, tps in f["tps"]:
        buckets[t] = buckets.get(t, 0) + tps
    tps_line = " ".join(f"{t:+d}:{buckets[t]:.0f}" for t in sorted(buckets) if -3 <= t <= 12)
    return "\n".join([
        f"Failover experiment ({f['backend']} lab): isolate the primary {old} under load",
        f"  cut at                          {time.strftime('%H:%M:%S', time.localtime(f['cut_at']))}",
        f"  {old} fenced itself              {_s(f['fenced_at_s'])}",
        f"  arb granted {new} a new term      {_s(f['granted_at_s'])}",
        f"  {new} promoted                   {_s(f['promoted_at_s'])}",
        f"  first write acked by {new}       {_s(f['failover_s'])}   (failover_s)",
        f"  write outage                    {f['write_outage_s']} s (last ack before the cut "
        "to the first after)",
        f"  acknowledged writes             {f['acked']}, lost {f['lost_acked']}",
        f"  acked by {old} after the cut     {f['acked_by_old_primary_after_cut']}",
        f"  promotions                      {f['promotions']}",
        f"  create table x(i int) on {new}   {'ok' if f['create_table_ok'] else 'FAILED: ' + str(f['create_table_error'])}",  # noqa: E501
        f"  {old} after the heal             {'fenced' if f['old_primary_fenced'] else 'NOT fenced'} "  # noqa: E501
        f"({f['old_primary_after_heal']})",
        f"  pgbench tps by second from the cut (restarted {f['pgbench_restarts']} times):",
        f"    {tps_line}",
        f"  verdict                         "
        f"{'OK' if f['ok'] else 'FAILED: ' + ', '.join(f['failed_checks'])}"])
