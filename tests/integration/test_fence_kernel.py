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
import agent, subprocess
def nft_elements(name):
    listed = subprocess.run(["nft", "list", "set", "inet", "bobry_fence", name],
                            capture_output=True, text=True, check=True).stdout
    return listed[listed.find("elements"):].split("}")[0]
fence, out = agent.Fence(5432), {}
fence.install()
out["installed"] = agent.describe_lease(fence.lease())
out["unarmed_open"] = fence.open_for(0.5)  # a write needs an armed window
fence.arm(0.3)
out["open_for_ok"] = fence.open_for(0.5)
out["open_for"] = fence.lease()
out["nft_lists_open_for"] = nft_elements("lease")  # nft's own reading of what was written
out["renew_unarmed"] = fence.renew(1.0)  # the window is used up by the write
fence.arm(0.3)
out["renew_live"] = fence.renew(1.0)
out["after_renew"] = fence.lease()
fence.install()  # a restarted agent keeps the kernel's state
out["kept_by_install"] = fence.lease() is not None
fence.arm(0.3)
fence.open_for(0.2)
time.sleep(0.4)
out["lapsed"] = fence.lease()
fence.arm(0.3)
out["renew_lapsed"] = fence.renew(1.0)  # a late renewal must not reopen the port
out["after_late_renew"] = fence.lease()
fence.arm(0.1)
time.sleep(0.3)  # the agent stalls after arming
out["late_open"] = fence.open_for(1.0)
out["after_late_open"] = fence.lease()
killed = agent.Fence(5432)  # an agent killed while its nft child stalls with a write
killed.arm(0.3)
restarted = agent.Fence(5432)  # the agent started again: the same table, a new incarnation
restarted.install()
restarted.arm(0.3)
out["stale_write"] = killed.open_for(1.0)  # the stalled child commits in the new window
out["after_stale_write"] = fence.lease()
out["restarted_write"] = restarted.open_for(0.5)
for write in ("open", "hold"):  # the writes without a timeout: a stale one would never end
    killed = agent.Fence(5432)
    killed.arm(0.3)
    restarted.arm(0.3)
    restarted.open_for(0.5)
    out[f"stale_{write}"] = getattr(killed, write)()
    out[f"after_stale_{write}"] = fence.lease()
fence.let_through("10.1.2.3", 5)
out["nft_lists_handover"] = nft_elements("handover")
fence.stop_letting_through()
out["handover_after_stop"] = nft_elements("handover")
fence.arm(3)
out["nft_lists_token"] = nft_elements("fresh")
out["token"] = fence.token
fence.open_for(0.1)  # takes the window
fence.close()
out["unarmed_standby"] = fence.open()
fence.arm(0.3)
out["standby_ok"] = fence.open()
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


def test_a_lease_lapses_by_itself_and_a_late_or_stale_write_never_opens_the_port(namespace):
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT,
                             str(REPO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["installed"] == "closed (fenced)"
    assert out["unarmed_open"] is False and out["open_for_ok"] is True
    assert 0.3 < out["open_for"] <= 0.5
    # the elements are written as netlink messages: nft reads them as the rules match them
    assert out["nft_lists_open_for"].startswith("elements = { 5432 timeout 500ms expires ")
    assert out["nft_lists_handover"].startswith("elements = { 10.1.2.3 timeout 5s expires ")
    assert "elements" not in out["handover_after_stop"]
    assert out["nft_lists_token"].startswith(f"elements = {{ {out['token']:#010x} timeout 3s ")
    assert out["renew_unarmed"] is False
    assert out["renew_live"] is True and 0.8 < out["after_renew"] <= 1.0
    assert out["kept_by_install"]
    assert out["lapsed"] is None
    assert out["renew_lapsed"] is False and out["after_late_renew"] is None
    assert out["late_open"] is False and out["after_late_open"] is None  # too late: refused
    # a write armed by an earlier incarnation never takes the window of a later one
    assert out["stale_write"] is False and out["after_stale_write"] is None
    assert out["restarted_write"] is True
    for write in ("open", "hold"):
        assert out[f"stale_{write}"] is False and out[f"after_stale_{write}"] <= 0.5
    assert out["unarmed_standby"] is False and out["standby_ok"] is True
    assert out["standby"] == float("inf")
    assert out["closed"] is None
