"""Fixtures every test folder shares (`tiny_demo`, a session's 24 small phantoms and their CSV), and the order and
threads of `make test`'s three pytest-xdist workers (on two cores: the third fills the time the others spend
waiting on a process, a sleep or a rendezvous)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# scipy and scikit-learn for reference values, on this process's path only: the engine's processes the tests start
# see the image's packages (requirements-reference.lock says why)
sys.path.append(str(Path(sys.prefix) / "reference"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch (OpenMP) thread per worker, inherited by the runs it starts, so a worker's training does not spin
    # against the others'. Set before torch is imported (no test module imports it first).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The order `--dist loadfile` hands whole files out in. xdist gives each worker two files at the start: the three
# longest (the demo and the benchmark smoke, ~3 min each among three workers on a 2-core AVX2 EPYC; the pod tests,
# ~4.5 min with their waits), then three short ones (a long second file would queue behind the demo: 3 minutes
# run by one worker at the end, seen 2026-12-01), then the next longest as workers come free, and the many short
# files behind them.
LONGEST_FIRST = ("cli/test_demo.py", "kubernetes/test_k8s.py", "benchmarks/test_bench.py",
                 "data/test_sources.py", "training/test_tracking.py", "results/test_statistics_reference.py",
                 "training/test_workflow.py", "cli/test_run.py", "experiments/test_sweep.py", "experiments/test_cv.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the written order


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """24 phantoms of 32^3 voxels and their CT-RATE style CSV."""
    from engine.data.demo import generate

    return generate(tmp_path_factory.mktemp("demo"), num_volumes=24, shape=(32, 32, 32), seed=1)
