"""The unit suites' real arbiter agent on loopback (test_agent_under_abuse.py,
test_launcher.py)."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from loopback_cluster import REPO, write_cluster

import agent


@pytest.fixture
def arbiter_process():
    """`agent.py --config … --node arb` on loopback: (process, config dir, log path)."""
    with tempfile.TemporaryDirectory(prefix="bobry-abuse-") as directory:
        ini = write_cluster(directory)
        log_path = Path(directory) / "agent.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(REPO / "agent.py"), "--config", ini,
                                     "--node", "arb"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=directory)
        try:
            cfg = agent.load_config(ini, "pg2")
            key = agent.read_secret(cfg.agent_key_file).encode()
            deadline = time.monotonic() + 15
            while True:
                try:
                    agent.call(cfg, key, cfg.arbiter, "status", {}, timeout=0.5)
                    break
                except (OSError, agent.ProtocolError):
                    assert proc.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
            yield proc, ini, log_path
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
