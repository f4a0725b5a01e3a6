import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # labtest: helpers shared by the lab suites


def pytest_addoption(parser):
    parser.addoption("--lab-backend", choices=["netns", "vagrant"], default="netns",
                     help="tests/infra: check the embedded lab (built by the tests) or the "
                          "running Vagrant lab")
