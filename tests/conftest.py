import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """24 phantoms of 32^3 voxels and their CT-RATE style CSV."""
    from engine.demo import generate

    return generate(tmp_path_factory.mktemp("demo"), num_volumes=24, shape=(32, 32, 32), seed=1)


def tiny_overrides(tmp_path: Path, datalist: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long training run on tiny volumes."""
    return [
        f"data.train={datalist}", "data.demo.enabled=false", "preprocess.spatial_size=[32,32,32]",
        f"cache.dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'runs'}", "output.name=run",
        "loader.batch_size=4", "train.epochs=1", "model.widen_factor=0.25", "cache.workers=1",
        "tracking.wandb.mode=disabled", *extra,
    ]
