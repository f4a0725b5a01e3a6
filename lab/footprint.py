"""The agents' footprint: resident memory and CPU per host, read from /proc on the host. CPU
counts the agent's threads and the children it waited for (pg_ctl, pg_controldata, pg_rewind): what
running the agent costs the host."""
import os
import time

from lab.backend import AGENT_HOSTS

# the hosts share this kernel (network namespaces, LXC containers) or run Linux, whose
# USER_HZ is 100 on every architecture Debian builds
CLK_TCK = os.sysconf("SC_CLK_TCK")
# an idle node wakes some 30 times a second: its CPU over 10 s moved by up to 0.3 % of a core
# from one window to the next on this machine (2 shared cores), over 20 s by 0.1-0.2 %; a
# longer window narrows that, but not how busy the machine is (README, "The footprint")
IDLE_S = 30.0
GOALS = {"rss_mib": 40.0, "idle_cpu_pct": 1.0}
ROLES = ("arbiter", "primary", "standby")  # each must have idle figures (roles_now)


def parse(status, stat):
    """(resident MiB, CPU seconds so far) from /proc/PID/status and /proc/PID/stat."""
    rss_kib = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
    fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: comm may hold spaces
    utime_to_cstime = fields[11:15]  # fields 14-17: utime, stime, cutime, cstime
    return round(rss_kib / 1024, 1), sum(int(t) for t in utime_to_cstime) / CLK_TCK


def sample(backend):
    """host -> (pid, resident MiB, CPU seconds, monotonic time) for each agent that runs."""
    out = {}
    for host in AGENT_HOSTS:
        pid = backend.agent_pid(host)
        if pid is None:
            continue
        text = backend.run(host, ["cat", f"/proc/{pid}/status", f"/proc/{pid}/stat"]).stdout
        status, _, stat = text.rstrip("\n").rpartition("\n")
        if "VmRSS:" in status and ")" in stat:
            out[host] = (pid, *parse(status, stat), time.monotonic())
    return out


def usage(before, after, roles):
    """role -> {"rss_mib", "cpu_pct"} between two samples, for the agents that ran throughout
    (the same pid); roles: host -> the role named in the figures."""
    figures = {}
    for host, (pid, rss, cpu, at) in after.items():
        if host in before and before[host][0] == pid and at > before[host][3]:
            cpu_pct = 100 * (cpu - before[host][2]) / (at - before[host][3])
            figures[roles.get(host, host)] = {"rss_mib": rss, "cpu_pct": round(cpu_pct, 2)}
    return figures


def roles_now(backend):
    """host -> primary, standby or arbiter, once the primary has its synchronous standby."""
    primary = backend.wait_until("a primary with a synchronous standby",
                                 backend.primary_with_sync_standby, 60)
    return {primary: "primary", ("pg2" if primary == "pg1" else "pg1"): "standby",
            "arb": "arbiter"}


def idle(backend, seconds=IDLE_S):
    """Each role's footprint over `seconds` of a healthy cluster (the lab's own load aside)."""
    roles = roles_now(backend)
    before = sample(backend)
    time.sleep(seconds)
    return usage(before, sample(backend), roles)


def missed_goals(idle_figures, worst_figures):
    """worst_figures: role -> the largest RSS and CPU share over the trials (a failover's CPU
    has no goal: the agent then works)."""
    missed = [f"agent RSS of the {role} {f['rss_mib']:.1f} MiB > {GOALS['rss_mib']:.0f} MiB"
              for figures in (idle_figures, worst_figures)
              for role, f in sorted(figures.items()) if f["rss_mib"] > GOALS["rss_mib"]]
    missed += [f"idle agent CPU of the {role} {f['cpu_pct']:.2f} % > "
               f"{GOALS['idle_cpu_pct']:.0f} % of a core"
               for role, f in sorted(idle_figures.items())
               if f["cpu_pct"] > GOALS["idle_cpu_pct"]]
    missed += [f"idle agent footprint of the {role}: not measured"  # e.g. restarted meanwhile
               for role in ROLES if role not in idle_figures]
    return missed
