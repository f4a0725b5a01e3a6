"""The fence's adapter against the real kernel: agent.Fence in a scratch network namespace of
its own (nftables, timed set elements), removed at the end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NS = "bobry-fencetest"

SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import agent
fence, out = agent.Fence(5432), {}
fence.install()
out["installed"] = agent.describe_lease(fence.lease())
fence.open_for(0.5)
out["open_for"] = fence.lease()
out["renew_live"] = fence.renew(1.0)
out["after_renew"] = fence.lease()
fence.install()  # a restarted agent keeps the kernel's state
out["kept_by_install"] = fence.lease() is not None
fence.open_for(0.2)
time.sleep(0.4)
out["lapsed"] = fence.lease()
out["renew_lapsed"] = fence.renew(1.0)  # a late renewal must not reopen the port
out["after_late_renew"] = fence.lease()
fence.open()
out["standby"] = fence.lease()
fence.close()
out["closed"] = fence.lease()
print(json.dumps(out))
"""


@pytest.fixture
def namespace():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def test_a_lease_lapses_by_itself_and_a_late_renewal_never_reopens_it(namespace):
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT,
                             str(REPO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["installed"] == "closed (fenced)"
    assert 0.3 < out["open_for"] <= 0.5
    assert out["renew_live"] is True and 0.8 < out["after_renew"] <= 1.0
    assert out["kept_by_install"]
    assert out["lapsed"] is None
    assert out["renew_lapsed"] is False and out["after_late_renew"] is None
    assert out["standby"] == float("inf")
    assert out["closed"] is None
