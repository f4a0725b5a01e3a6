"""ruff over the whole repository with tests/ruff.toml: CI runs it through this test."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--config", "tests/ruff.toml", "."],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_modules_have_unique_basenames():
    # pytest's default import mode imports tests/unit/x.py and tests/integration/x.py as the
    # same module `x`: the second is a collection error that stops the whole run (CI, stop 14)
    seen = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if "__init__.py" in {p.name for p in path.parent.iterdir()}:
            continue  # a package's modules are imported under the package's name
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename"
        seen[path.name] = path
