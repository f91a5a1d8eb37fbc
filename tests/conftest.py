"""Fixtures every test folder shares: `tiny_demo`, a session's 24 small phantoms and their CSV."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """24 phantoms of 32^3 voxels and their CT-RATE style CSV."""
    from engine.data.demo import generate

    return generate(tmp_path_factory.mktemp("demo"), num_volumes=24, shape=(32, 32, 32), seed=1)
