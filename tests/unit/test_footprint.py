"""The agents' footprint as the bench reads it from /proc: parsed from this very process's
files, and the CPU share between two samples."""
import os
from pathlib import Path

from lab import footprint


def test_parse_reads_this_process():
    status = Path("/proc/self/status").read_text()
    stat = Path("/proc/self/stat").read_text()
    rss, cpu = footprint.parse(status, stat)
    rss_line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    rss_kib = int(rss_line.split()[1])
    assert rss == round(rss_kib / 1024, 1) and rss > 1.0
    times = os.times()
    assert 0 < cpu <= times.user + times.system + times.children_user + times.children_system + 0.02


def test_parse_takes_a_command_name_with_spaces_and_parentheses():
    stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 3 0 1000 0 0"
    assert footprint.parse("Name:\tx\nVmRSS:\t   20480 kB\n", stat) == (20.0, 3.5)


def test_usage_is_the_cpu_share_between_samples_of_one_process():
    before = {"pg1": (10, 25.0, 100.0, 1000.0), "pg2": (11, 25.0, 50.0, 1000.0),
              "arb": (12, 20.0, 7.0, 1000.0)}
    after = {"pg1": (10, 26.0, 100.5, 1010.0), "pg2": (99, 25.0, 0.2, 1010.0),  # restarted
             "arb": (12, 20.0, 7.05, 1010.0)}
    figures = footprint.usage(before, after, {"pg1": "primary", "arb": "arbiter"})
    assert figures == {"primary": {"rss_mib": 26.0, "cpu_pct": 5.0},
                       "arbiter": {"rss_mib": 20.0, "cpu_pct": 0.5}}
