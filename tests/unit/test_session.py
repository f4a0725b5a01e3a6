"""agent.Session against a real PostgreSQL of its own (a Unix socket in a temporary directory,
no TCP): one backend serves every statement; a restart between two statements costs no
failure (the broken session is replaced within the same deadline); a server that is down is
an error, as a new connection's would be."""
import os
import pwd
import shutil
import subprocess
import tempfile

import psycopg2
import pytest

import agent

BIN = "/usr/lib/postgresql/15/bin"


def as_postgres(*argv):
    subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                   capture_output=True, timeout=120)


@pytest.fixture
def server():
    if not os.path.exists(f"{BIN}/initdb") or os.geteuid() != 0:
        pytest.skip("needs PostgreSQL 15 and root (to run it as postgres)")
    top = tempfile.mkdtemp(prefix="bobry-session-")
    pw = pwd.getpwnam("postgres")
    os.chown(top, pw.pw_uid, pw.pw_gid)
    data = os.path.join(top, "data")
    as_postgres(f"{BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres")
    options = f"-c listen_addresses='' -c unix_socket_directories={top} -p 5499"

    def pg_ctl(*args):
        as_postgres(f"{BIN}/pg_ctl", *args, "-D", data, "-w", "-o", options,
                    "-l", os.path.join(top, "log"))

    pg_ctl("start")
    try:
        yield f"host={top} port=5499 user=postgres dbname=postgres", pg_ctl
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{BIN}/pg_ctl", "stop", "-D",
                        data, "-m", "immediate"], capture_output=True, timeout=60)
        shutil.rmtree(top)


def backend(session, dsn):
    return session.query(dsn, "select pg_backend_pid()", timeout=5.0)[0][0]


def test_one_backend_serves_every_statement(server):
    dsn, _ = server
    session = agent.Session()
    assert len({backend(session, dsn) for _ in range(5)}) == 1
    session.close()


def test_a_restart_between_two_statements_costs_no_failure(server):
    dsn, pg_ctl = server
    session = agent.Session()
    before = backend(session, dsn)
    pg_ctl("restart", "-m", "fast")
    assert backend(session, dsn) != before  # the broken session replaced, in the same call
    session.close()


def test_a_server_that_is_down_is_an_error(server):
    dsn, pg_ctl = server
    session = agent.Session()
    backend(session, dsn)
    pg_ctl("stop", "-m", "fast")
    with pytest.raises(psycopg2.OperationalError):
        backend(session, dsn)
    assert session.conn is None
    pg_ctl("start")
    backend(session, dsn)
    session.close()
