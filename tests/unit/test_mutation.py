"""The decisions' mutation run (tests/mutation.py core, 2 to 4 minutes on 2 cores): every
mutant of agent.py's decision functions is killed by tests/unit/test_decisions.py and
test_decision_invariants.py, or listed with its reason in tests/mutation_survivors.md.
Runs in CI (CI=true) and with BOBRY_MUTATION=1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("BOBRY_MUTATION")),
                    reason="2 to 4 minutes: runs in CI, or with BOBRY_MUTATION=1")
def test_every_decision_mutant_is_killed_or_listed():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "mutation.py"), "core"],
                            cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
