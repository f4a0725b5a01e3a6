"""`agent.py …` re-executes itself in the same process as an imported module, without
OpenSSL's hashlib backend and the ssl module (agent.py, LAUNCHER: 8 + 3.5 MiB of an agent's
memory). A real agent process on loopback. Seen failing: the first on a plain script run,
the second when the re-execution drops the interpreter's options."""
import subprocess
import sys

from loopback_cluster import REPO

import agent


def test_the_agent_runs_as_a_module_in_the_process_it_was_started_as(arbiter_process):
    proc, ini, _ = arbiter_process
    with open(f"/proc/{proc.pid}/maps") as f:
        mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}
    extensions = {name.split(".")[0] for name in mapped if ".cpython-" in name}
    assert "_psycopg" in extensions  # the check sees extension modules where they are
    assert not extensions & {"_ssl", "_hashlib"}
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")[:-1]
    assert argv == [sys.executable, "-c", agent.LAUNCHER, str(REPO / "agent.py"),
                    "--config", ini, "--node", "arb"]
    # it answered the fixture's sealed requests: its MAC (Python's own SHA-256) matches this
    # process's (OpenSSL's)


def test_interpreter_options_reach_the_agent():
    """-X importtime lists the imports of the interpreter that runs the agent: psycopg2 is
    imported only after the re-execution."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "agent.py"),
                             "--config", "/nonexistent/agent.ini", "--node", "arb"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bad config: /nonexistent/agent.ini" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "psycopg2" in imported


def test_no_module_comes_from_the_directory_the_agent_was_started_in(tmp_path):
    """`-c` puts the current directory first on sys.path, a script run the script's own: an
    argparse.py there, which agent.py imports first, must not run. Seen failing (exit 99) on
    the first launcher, which kept the directory."""
    (tmp_path / "argparse.py").write_text("raise SystemExit(99)\n")
    result = subprocess.run([sys.executable, str(REPO / "agent.py"), "--config",
                             "/nonexistent/agent.ini", "--node", "arb"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, "bad config" in result.stderr) == (2, True), result.stderr
