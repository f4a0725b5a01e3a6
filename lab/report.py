"""Reports: one folder per experiment, with the raw records it was judged on and what is drawn
from them.

    figures.json   the experiment's figures and verdict (what `--json` prints), plus the
                   experiment's name, the hosts' addresses and when the load started
    probe.jsonl    the write probe's records (acknowledged or failed, one per attempt)
    tps.jsonl      pgbench's per-second samples: {"t": wall clock, "tps": …}
    events.jsonl   the agents' events and the port watcher's, merged by time (from the start of
                   the load on)
    timeline.txt   those events, the lab's own actions and the probe's runs of acknowledged or
                   failed writes, one line each, in seconds relative to the fault
    <name>.png     acknowledged writes per server and pgbench's tps over time, with the moments
                   of the experiment (cut, fence, grant, promotion, heal, rejoin) marked
    report.md      the picture, the moments, the figures and the verdict

Everything after the raw files is drawn from them by render(folder) (`python -m lab report
DIR`), through pure functions of the records (marks, timeline_text, markdown, label_rows) and
one that draws (plot: matplotlib, Agg backend, imported only there). A pingpong folder holds one
failover folder per round (round-N); a benchmark folder one experiment folder per trial
(trial-NN) and summary.json, the benchmark's summary.

The folders live outside the lab (default /var/tmp/bobry-reports, or $BOBRY_REPORT_DIR), so
that `lab down`, which removes the lab's directory, keeps them."""
import json
import os
import time
from pathlib import Path

ROOT_ENV, DEFAULT_ROOT = "BOBRY_REPORT_DIR", "/var/tmp/bobry-reports"
FIGURES, PROBE, TPS, EVENTS = "figures.json", "probe.jsonl", "tps.jsonl", "events.jsonl"
TIMELINE, MARKDOWN, SUMMARY = "timeline.txt", "report.md", "summary.json"

# the moment each experiment's times are relative to: the fault
ORIGIN = {"failover": "cut_at", "standby-loss": "cut_at", "switchover": "started_at",
          "jitter": "started_at"}
ORIGIN_NAME = {"failover": "the cut", "standby-loss": "the cut", "switchover": "the request",
               "jitter": "the start of the degradation"}
# moments that are the lab's own actions (the others are events some host logged)
LAB_ACTIONS = ("cut", "heal", "request", "degrade")
# how each kind of moment is drawn: colour, line style
STYLE = {"cut": ("#d62728", "-"), "fence": ("#9467bd", "--"), "grant": ("#ff7f0e", "-."),
         "promotion": ("#2ca02c", "-"), "heal": ("#1f77b4", "-"), "rejoin": ("#7f7f7f", "--"),
         "request": ("#d62728", "-"), "handover": ("#ff7f0e", "-."),
         "dropped": ("#9467bd", "--"), "degrade": ("#d62728", "-")}


# -- folders -----------------------------------------------------------------------------------
def report_root():
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def new_folder(name, root=None):
    """A new folder <root>/<name>-<date>-<time> (-2, -3 … if taken)."""
    base = Path(root or report_root()) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save(folder, name, result, records, tps, events, addresses, load_started_at):
    """Write an experiment's raw records into `folder` (made if missing), then render it.
    result: the experiment's figures; tps: pgbench's (wall-clock second, tps) samples; events:
    backend.events() (only those from a second before the load on are kept). Returns the
    folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"experiment": name, "addresses": dict(addresses),
               "load_started_at": load_started_at, **result}
    (folder / FIGURES).write_text(json.dumps(figures, indent=2) + "\n")
    _write_jsonl(folder / PROBE, records)
    _write_jsonl(folder / TPS, [{"t": t, "tps": v} for t, v in tps])
    since = (load_started_at or 0) - 1
    _write_jsonl(folder / EVENTS, [e for e in events if e.get("t", 0) >= since])
    render(folder)
    return folder


def save_summary(folder, title, summary, text):
    """A folder of folders (pingpong's rounds, a benchmark's trials): its summary and a
    report.md that links to each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY).write_text(json.dumps({"title": title, "text": text, **summary},
                                             indent=2) + "\n")
    render(folder)
    return folder


# -- pure: what the records say ----------------------------------------------------------------
def origin(figures):
    """The wall-clock time of the fault the experiment's times are relative to (None: none)."""
    return figures.get(ORIGIN.get(figures.get("experiment"), ""))


def _since(t, o):
    return None if t is None or o is None else round(t - o, 3)


def _plus(a, b):
    return None if a is None or b is None else round(a + b, 3)


def marks(figures):
    """The experiment's moments as (kind, label, seconds after the origin), in time order; a
    moment that was not measured is left out."""
    name, f = figures.get("experiment"), figures
    heal = _since(f.get("healed_at"), origin(f))
    if name == "failover":
        old, new = f["old_primary"], f["new_primary"]
        found = [("cut", f"cut: {old} isolated", 0.0),
                 ("fence", f"fence: {old}'s port closed", f.get("fenced_at_s")),
                 ("grant", f"grant: arb names {new}", f.get("granted_at_s")),
                 ("promotion", f"{new} promoted", f.get("promoted_at_s")),
                 ("heal", "heal", heal),
                 ("rejoin", f"{old} rejoined", _plus(heal, f.get("rejoined_s")))]
    elif name == "standby-loss":
        found = [("cut", f"cut: {f['standby']} isolated", 0.0),
                 ("dropped", "standby dropped from sync", f.get("standby_dropped_at_s")),
                 ("heal", "heal", heal),
                 ("rejoin", f"{f['standby']} eligible again", _plus(heal, f.get("resync_s")))]
    elif name == "switchover":
        handover = f.get("handover_at_s")
        found = [("request", "switchover requested", 0.0),
                 ("handover", f"handover to {f['new_primary']}", handover),
                 ("rejoin", f"{f['old_primary']} rejoined", _plus(handover, f.get("rejoined_s")))]
    elif name == "jitter":
        found = [("degrade", "network degraded", 0.0), ("heal", "heal", heal)]
    else:
        found = []
    return sorted((m for m in found if m[2] is not None), key=lambda m: m[2])


def host_names(addresses):
    return {address: host for host, address in (addresses or {}).items()}


def probe_events(records, addresses):
    """The probe's records as timeline events: each run of writes acknowledged by one server
    starts with `writes_acked` (by, count, ids) and, if longer than one, ends with `last_ack`;
    each run of failed writes is one `writes_failed` (count, the first error)."""
    names = host_names(addresses)
    runs = []
    for r in sorted(records, key=lambda r: r.get("sent", r.get("ack", 0))):
        outcome = names.get(r.get("server"), r.get("server")) if "ack" in r else None
        if runs and runs[-1][0] == outcome:
            runs[-1][1].append(r)
        else:
            runs.append((outcome, [r]))
    out = []
    for outcome, rs in runs:
        ids = f"{rs[0]['id']}-{rs[-1]['id']}" if len(rs) > 1 else str(rs[0]["id"])
        if outcome is None:
            out.append({"t": rs[0]["sent"], "node": "client", "event": "writes_failed",
                        "count": len(rs), "ids": ids, "error": rs[0].get("error")})
            continue
        out.append({"t": rs[0]["ack"], "node": "client", "event": "writes_acked",
                    "by": outcome, "count": len(rs), "ids": ids})
        if len(rs) > 1:
            out.append({"t": rs[-1]["ack"], "node": "client", "event": "last_ack",
                        "by": outcome, "id": rs[-1]["id"]})
    return out


def lab_events(figures):
    """The lab's own actions (the cut, the heal, …) as timeline events."""
    o = origin(figures)
    if o is None:
        return []
    return [{"t": o + seconds, "node": "lab", "event": kind,
             **({"what": label.split(": ")[-1]} if label != kind else {})}
            for kind, label, seconds in marks(figures) if kind in LAB_ACTIONS]


def event_details(event, width=90):
    """An event's fields other than time, node and name, as `key=value`, each value cut to
    `width` characters."""
    parts = []
    for key, value in event.items():
        if key in ("t", "node", "event"):
            continue
        text = "-" if value is None else str(value).replace("\n", " ")
        if len(text) > width:
            text = text[:width - 1] + "…"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _clock(t):
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def timeline_lines(events, origin=None):
    """One line per event, in time order: the time (seconds relative to `origin`, or the
    wall clock when it is None), the node, the event and its details."""
    lines = []
    for e in sorted(events, key=lambda e: e["t"]):
        when = _clock(e["t"]) if origin is None else f"{e['t'] - origin:+9.3f} s"
        lines.append(f"{when}  {e.get('node', '?'):<7}{e.get('event', '?'):<16}"
                     f"{event_details(e)}".rstrip())
    return lines


def timeline_text(figures, events, records):
    """timeline.txt: the hosts' and the port watcher's events, the lab's actions and the
    probe's runs, relative to the fault."""
    o = origin(figures)
    name = figures.get("experiment", "?")
    merged = list(events) + lab_events(figures) + probe_events(records,
                                                                 figures.get("addresses"))
    head = (f"{name} experiment: every event in seconds relative to "
            f"{ORIGIN_NAME.get(name, 'the start')}"
            + (f" ({_clock(o)})" if o is not None else "") + "\n"
            "nodes: pg1, pg2, arb (their agents; port_open/port_closed: the port watcher, "
            "from the network), lab (the lab's actions), client (the write probe)\n")
    return head + "\n".join(timeline_lines(merged, o)) + "\n"


def label_rows(xs, widths):
    """Rows for labels that start at xs and are widths wide (same units), so that no two
    labels in one row overlap: each takes the lowest row whose last label ends before it."""
    ends, rows = [], [0] * len(xs)
    for i in sorted(range(len(xs)), key=lambda i: xs[i]):
        row = next((r for r, end in enumerate(ends) if end < xs[i]), len(ends))
        if row == len(ends):
            ends.append(0)
        ends[row] = xs[i] + widths[i]
        rows[i] = row
    return rows


def tps_by_second(tps, o):
    """pgbench's tps summed per whole second relative to o, with the seconds without a sample
    between the first and the last as 0 (a hole must show)."""
    totals = {}
    for t, value in tps:
        second = round(t - o)
        totals[second] = totals.get(second, 0) + value
    if not totals:
        return []
    return [(s, totals.get(s, 0)) for s in range(min(totals), max(totals) + 1)]


def headline(figures):
    """The figure the picture's title states, as text."""
    f = figures
    name = f.get("experiment")
    if name == "failover":
        return (f"failover {_num(f.get('failover_s'))} s "
                f"(cut to the first write acknowledged by {f['new_primary']})")
    if name == "switchover":
        return f"writes stopped for {_num(f.get('write_outage_s'))} s"
    if name == "standby-loss":
        return f"writes stopped for {_num(f.get('write_outage_s'))} s without the standby"
    if name == "jitter":
        return f"longest gap between acks {_num(f.get('longest_ack_gap_s'))} s"
    return ""


def _num(value):
    return "not measured" if value is None else f"{value:.2f}"


def title(figures):
    f = figures
    name = f.get("experiment", "?")
    backend = f.get("backend", "?")
    return {
        "failover": f"Failover ({backend} lab): isolate the primary {f.get('old_primary')} "
                    "under load",
        "standby-loss": f"Standby loss ({backend} lab): isolate the standby {f.get('standby')} "
                        "under load",
        "switchover": f"Switchover ({backend} lab): {f.get('old_primary')} hands over to "
                      f"{f.get('new_primary')} under load",
        "jitter": f"Jitter ({backend} lab): a degraded network for {f.get('minutes')} min",
    }.get(name, f"{name} ({backend} lab)")


def verdict_text(figures):
    return "OK" if figures.get("ok") else "FAILED: " + ", ".join(figures.get("failed_checks")
                                                                 or ["?"])


def _cell(value, key=""):
    if key.endswith("_at") and isinstance(value, (int, float)) and value > 1e8:
        return _clock(value)  # a wall-clock time
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


# keys of figures.json that are not figures (or too long for the table)
NOT_FIGURES = ("experiment", "addresses", "load_started_at", "backend", "tps", "failed_checks",
               "ok", "report_dir")


def markdown(figures, text_report=None, png=None, png_error=None):
    """report.md: title, verdict, the picture, the moments, the figures, the text report."""
    f = figures
    o = origin(f)
    name = f.get("experiment", "?")
    lines = [f"# {title(f)}", "", f"**Verdict: {verdict_text(f)}**", ""]
    if o is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o))
        lines += [f"Run at {when}: {headline(f)}.", ""]
    if png:
        lines += [f"![{name}: acknowledged writes and pgbench tps over time]({png})", ""]
    elif png_error:
        lines += [f"(no picture: {png_error})", ""]
    moments = marks(f)
    if moments:
        lines += [f"| moment | seconds after {ORIGIN_NAME.get(name, 'the start')} |",
                  "|---|---:|"]
        lines += [f"| {label} | {seconds:+.2f} |" for _, label, seconds in moments]
        lines.append("")
    lines += ["## Figures", "", "| figure | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v, k)} |" for k, v in f.items() if k not in NOT_FIGURES]
    lines.append("")
    if f.get("failed_checks"):
        lines += ["Failed checks:", ""] + [f"- {c}" for c in f["failed_checks"]] + [""]
    if text_report:
        lines += ["## As printed", "", "```", text_report, "```", ""]
    relative_to = ORIGIN_NAME.get(name, "the start")
    raw = (f"[{PROBE}]({PROBE}) (write probe), [{TPS}]({TPS}) (pgbench), "
           f"[{EVENTS}]({EVENTS}) (agents and port watcher)")
    lines += ["## Files", "",
              f"- [{TIMELINE}]({TIMELINE}): every event, relative to {relative_to}",
              f"- [{FIGURES}]({FIGURES}): the figures (as `--json` prints them)",
              f"- raw records: {raw}",
              "", "Drawn again from the raw records by `python -m lab report <this folder>`.",
              ""]
    return "\n".join(lines)


def summary_markdown(summary, subfolders):
    """report.md of a folder of folders: the summary as printed and a link to each."""
    ok = summary.get("ok")
    names = list(summary.get("figures") or ())  # a benchmark's figures, one column each
    lines = [f"# {summary.get('title', '?')}", "",
             f"**Verdict: {'OK' if ok else 'FAILED'}**", "", "```", summary.get("text", ""),
             "```", "", "| " + " | ".join(["run", *names, "verdict", "report"]) + " |",
             "|" + "---|" * (len(names) + 3)]
    for sub in subfolders:
        try:
            f = json.loads((sub / FIGURES).read_text())
        except (OSError, ValueError):
            lines.append(f"| {sub.name} | " + "- | " * len(names) + "no figures | - |")
            continue
        cells = [sub.name, *(_cell(f.get(name)) for name in names), _cell(verdict_text(f)),
                 f"[{sub.name}/{MARKDOWN}]({sub.name}/{MARKDOWN})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- drawing -----------------------------------------------------------------------------------
def plot(figures, records, tps, path):
    """The picture: acknowledged writes per server (cumulative) and failed writes above,
    pgbench's tps by second below, the experiment's moments as labelled vertical lines, the
    headline figure in the title. Writes a PNG to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    f = figures
    o = origin(f)
    if o is None:
        o = min([r.get("sent", 0) for r in records] + [t for t, _ in tps], default=0)
    names = host_names(f.get("addresses"))
    moments = marks(f)
    times = ([r["sent"] - o for r in records] + [t - o for t, _ in tps]
             + [seconds for _, _, seconds in moments])
    low, high = (min(times, default=-1) - 0.5, max(times, default=1) + 0.5)

    width_in, fontsize, row_pt = 11.0, 8, 11
    axes_width_in = width_in * 0.86
    per_char = (high - low) / axes_width_in * fontsize * 0.62 / 72
    labels = [f"{label} {seconds:+.2f}" for _, label, seconds in moments]
    widths = [(len(text) + 1) * per_char for text in labels]
    # a label starts at its line, or ends there when it would run past the right edge
    right = [s + w > high for (_, _, s), w in zip(moments, widths)]
    rows = label_rows([s - w if r else s for (_, _, s), w, r in zip(moments, widths, right)],
                      widths)
    nrows = max(rows, default=-1) + 1
    top_in = 0.45 + nrows * row_pt / 72
    height_in = 6.0 + top_in
    fig, (ax_w, ax_t) = plt.subplots(2, 1, sharex=True, figsize=(width_in, height_in),
                                     gridspec_kw={"height_ratios": [3, 2]})
    fig.subplots_adjust(left=0.08, right=0.94, bottom=0.08, top=1 - top_in / height_in,
                        hspace=0.08)

    servers = {}
    for r in sorted((r for r in records if "ack" in r), key=lambda r: r["ack"]):
        servers.setdefault(names.get(r["server"], r["server"]), []).append(r["ack"] - o)
    for host in sorted(servers):
        acks = servers[host]
        ax_w.step(acks, range(1, len(acks) + 1), where="post", linewidth=1.6,
                  label=f"acknowledged by {host} ({len(acks)})")
    failed = [r["sent"] - o for r in records if "ack" not in r]
    if failed:
        ax_w.plot(failed, [0] * len(failed), "x", color="#d62728", markersize=5,
                  label=f"write failed ({len(failed)})", clip_on=False)
    ax_w.set_ylabel("acknowledged writes\n(cumulative, per server)")
    ax_w.set_ylim(bottom=0)
    ax_w.legend(loc="upper left", fontsize=fontsize, framealpha=0.9)
    ax_w.grid(alpha=0.3)

    seconds_tps = tps_by_second(tps, o)
    if seconds_tps:
        # a sample is about the second before it: drawn over (s - 1, s]
        xs = [seconds_tps[0][0] - 1] + [s for s, _ in seconds_tps]
        ys = [seconds_tps[0][1]] + [v for _, v in seconds_tps]
        ax_t.step(xs, ys, where="pre",
                  color="#333333", linewidth=1.4, label="pgbench tps (a second without a "
                                                        "sample: 0)")
        ax_t.legend(loc="lower left", fontsize=fontsize, framealpha=0.9)
    ax_t.set_ylabel("pgbench tps")
    ax_t.set_ylim(bottom=0)
    ax_t.set_xlabel(f"seconds after {ORIGIN_NAME.get(f.get('experiment'), 'the start')}")
    ax_t.set_xlim(low, high)
    ax_t.grid(alpha=0.3)

    on_top = blended_transform_factory(ax_w.transData, ax_w.transAxes)
    for (kind, _, seconds), text, row, at_right in zip(moments, labels, rows, right):
        colour, style = STYLE.get(kind, ("#000000", ":"))
        for ax in (ax_w, ax_t):
            ax.axvline(seconds, color=colour, linestyle=style, linewidth=1.3)
        ax_w.annotate(text, xy=(seconds, 1), xycoords=on_top, xytext=(0, 3 + row * row_pt),
                      textcoords="offset points", fontsize=fontsize, color=colour,
                      ha="right" if at_right else "left", va="bottom", annotation_clip=False)

    if f.get("experiment") == "failover" and f.get("failover_s") is not None:
        y = ax_w.get_ylim()[1] * 0.55
        ax_w.annotate("", xy=(f["failover_s"], y), xytext=(0, y),
                      arrowprops={"arrowstyle": "<->", "color": "#d62728", "lw": 1.5})
        ax_w.annotate(f"failover {f['failover_s']:.2f} s", xy=(f["failover_s"] / 2, y),
                      xytext=(0, 5), textcoords="offset points", ha="center", va="bottom",
                      fontsize=fontsize + 2, color="#d62728", fontweight="bold",
                      bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    fig.suptitle(f"{title(f)}: {headline(f)} · verdict "
                 f"{'OK' if f.get('ok') else 'FAILED'}", fontsize=fontsize + 3, y=0.995,
                 va="top")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- rendering a folder ------------------------------------------------------------------------
def _subfolders(folder, prefix):
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))


def render(folder):
    """(Re)draw a report folder from its raw files: timeline.txt, the PNG and report.md of an
    experiment; of a folder of folders, each of them and its report.md. Returns the path of
    report.md."""
    folder = Path(folder)
    if (folder / SUMMARY).exists():
        subs = _subfolders(folder, "trial-") + _subfolders(folder, "round-")
        for sub in subs:
            render(sub)
        summary = json.loads((folder / SUMMARY).read_text())
        (folder / MARKDOWN).write_text(summary_markdown(summary, subs))
        return folder / MARKDOWN
    figures = json.loads((folder / FIGURES).read_text())
    records = _read_jsonl(folder / PROBE)
    tps = [(s["t"], s["tps"]) for s in _read_jsonl(folder / TPS)]
    events = _read_jsonl(folder / EVENTS)
    (folder / TIMELINE).write_text(timeline_text(figures, events, records))
    png, png_error = f"{figures.get('experiment', 'experiment')}.png", None
    try:
        plot(figures, records, tps, folder / png)
    except ImportError as exc:
        png, png_error = None, f"matplotlib is not installed ({exc})"
    try:
        from lab import experiments
        text = experiments.report(figures["experiment"], figures)
    except (KeyError, TypeError, ValueError) as exc:  # an older or partial figures.json
        text = f"(the text report could not be made: {type(exc).__name__}: {exc})"
    (folder / MARKDOWN).write_text(markdown(figures, text, png, png_error))
    return folder / MARKDOWN
