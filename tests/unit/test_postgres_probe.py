"""The PostgreSQL probe with a descriptor above 1023, where select() would raise ValueError
(an agent serving many connections, or a host with many open files, gets such descriptors)."""
import os
import resource
import select
import socket
import time

import psycopg2
import pytest

import agent


@pytest.fixture
def fd_limit():
    """This process may open more than 1024 descriptors (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1500")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1500), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_pg_query_polls_a_descriptor_above_1023(fd_limit):
    """A server that accepts and never answers: the probe times out (TimeoutError), where
    select() would have raised ValueError for a descriptor above 1023."""
    dummies = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connections; nobody ever answers them
        dsn = (f"host=127.0.0.1 port={silent.getsockname()[1]} user=x dbname=x "
               "sslmode=disable connect_timeout=10")
        try:
            while len(dummies) < 1100:
                dummies.append(os.open(os.devnull, os.O_RDONLY))
            conn = psycopg2.connect(dsn, async_=True)
            try:
                assert conn.fileno() > 1023
                with pytest.raises(ValueError):
                    select.select([conn.fileno()], [], [], 0)
                with pytest.raises(TimeoutError):
                    agent._wait_ready(conn, time.monotonic() + 0.3)
            finally:
                conn.close()
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                agent.pg_query(dsn, "select 1", timeout=0.3)
            assert time.monotonic() - began < 2
        finally:
            for fd in dummies:
                os.close(fd)
