"""`agent.py …` re-executes itself in the same process as a module that agent.LAUNCHER
compiles, without OpenSSL's hashlib backend and the ssl module (8 + 3.5 MiB of an agent's
memory), and only when the interpreter runs the file itself. A real agent process on loopback,
the file run under tools and options, and the pure choice of the command line. Seen failing,
each on a breakage of its own: the process test on a plain script run; the options test when
the relaunch dropped the options or did not happen; the directories test on a launcher that
kept the current directory or did not put the script's own; the program name, the cached
bytecode and cProfile on the first launcher; PYTHONINSPECT without its guard."""
import os
import shutil
import subprocess
import sys

from loopback_cluster import REPO

import agent

PY, FILE = "/usr/bin/python3", "/opt/bobry/agent.py"
ARGS = ["--config", "/etc/bobry/agent.ini", "--node", "pg1"]


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


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
    # it answered the fixture's sealed requests: its MAC (BLAKE2b, built into Python) matches
    # this process's


def test_interpreter_options_reach_the_agent():
    """-X importtime lists the imports of the interpreter that runs the agent: `_sha256`,
    hashlib's fallback once `_hashlib` is kept out, is imported only under the launcher."""
    result = run([sys.executable, "-X", "importtime", str(REPO / "agent.py"),
                  "--config", "/nonexistent/agent.ini", "--node", "arb"])
    assert result.returncode == 2
    assert "bad config: /nonexistent/agent.ini" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"psycopg2", "_sha256"} <= imported


def test_modules_come_from_the_agents_directory_not_the_current_one(tmp_path):
    """`-c` puts the current directory first on sys.path, a script run the script's own
    (resolved): an argparse.py in the current directory must not run (exit 99), one beside
    agent.py does, as in a script run (exit 98)."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "argparse.py").write_text("raise SystemExit(99)\n")
    shutil.copy(REPO / "agent.py", there / "agent.py")
    argv = [sys.executable, str(there / "agent.py"), "--config", "/nonexistent/agent.ini",
            "--node", "arb"]
    assert run(argv, cwd=here).returncode == 2
    (there / "argparse.py").write_text("raise SystemExit(98)\n")
    assert run(argv, cwd=here).returncode == 98


def test_the_program_is_named_as_run_and_no_bytecode_is_cached(tmp_path):
    """A cached .pyc is judged by the source's mtime and size: never used, never written."""
    copy = tmp_path / "agent.py"
    shutil.copy(REPO / "agent.py", copy)
    result = run([sys.executable, str(copy), "--config", "/nonexistent/agent.ini"])
    assert result.returncode == 2
    assert result.stderr.startswith("usage: agent.py ")
    assert "--node" in result.stderr
    assert not (tmp_path / "__pycache__").exists()


def test_a_tool_that_runs_the_file_runs_it_in_place(tmp_path):
    result = run([sys.executable, "-m", "cProfile", str(REPO / "agent.py"),
                  "--config", "/nonexistent/agent.ini", "--node", "arb"], cwd=tmp_path)
    assert "bad config: /nonexistent/agent.ini" in result.stderr  # (cProfile exits 0)
    assert "function calls" in result.stdout  # cProfile's report: it profiled the agent


def test_with_pythoninspect_the_file_runs_in_place():
    """The prompt that PYTHONINSPECT opens at the end belongs in the agent's own globals, not
    LAUNCHER's: the traceback of its exit names the file, not `<string>`."""
    result = run([sys.executable, str(REPO / "agent.py"), "--config", "/nonexistent/agent.ini",
                  "--node", "arb"], env={**os.environ, "PYTHONINSPECT": "1"},
                 stdin=subprocess.DEVNULL)
    assert f'File "{REPO / "agent.py"}", line' in result.stderr, result.stderr
    assert '"<string>"' not in result.stderr


def relaunch(*options, argv=(FILE, *ARGS), executable=PY, running=PY):
    return agent.relaunch_argv([PY, *options, *argv], list(argv), executable, running)


def test_the_relaunch_carries_the_interpreters_own_options():
    assert relaunch() == [PY, "-c", agent.LAUNCHER, FILE, *ARGS]
    for options in (["-X", "dev"], ["-Xdev"], ["-W", "ignore"], ["-u", "-B"], ["-uBs"],
                    ["-I"], ["-X", "importtime", "-Wd", "-O"]):
        assert relaunch(*options) == [PY, *options, "-c", agent.LAUNCHER, FILE, *ARGS]
    assert agent.relaunch_argv([PY, "agent.py"], ["agent.py"], PY, PY)[3] == os.path.abspath(
        "agent.py")


def test_no_relaunch_under_a_tool_another_binary_or_another_name():
    for options in (["-m", "cProfile"], ["-mcProfile"], ["-m", "pdb"], ["--"], ["-uc", "x"],
                    ["/venv/bin/coverage", "run"], ["-X"], ["-q", "trace.py"], ["-x"], ["-i"],
                    ["-ui"]):
        assert relaunch(*options) is None, options
    assert relaunch(running="/nonexistent/python") is None  # found on PATH, not the one that runs
    assert relaunch(running="") is None  # no /proc
    assert relaunch(executable="") is None
    assert relaunch(argv=("/usr/local/bin/bobry-agent", *ARGS)) is None  # compile() needs no
    # suffix, but the name says that someone installed it so on purpose: as it was
    assert agent.relaunch_argv([], [FILE, *ARGS], PY, PY) is None  # Python 3.9: no orig_argv
    assert agent.relaunch_argv([PY, "-m", "agent", *ARGS], [FILE, *ARGS], PY, PY) is None
