"""Integration tests run the real thing: network namespaces, iptables, PostgreSQL, agents.
Each test gets a fresh embedded lab and tears it down, whatever happens."""
import os

import pytest

from labtest import fresh_lab


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests need root (netns, iptables)")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture
def lab():
    yield from fresh_lab()


@pytest.fixture
def strict_lab():
    """A lab whose primary never stops waiting for its standby (strict_sync = true)."""
    yield from fresh_lab(strict_sync=True)
