import re
import subprocess
import sys

import pytest

from helpers import ROOT, TEXT


@pytest.mark.slow
def test_benchmark_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, **TEXT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for figure in ("RAM cache vs tutorial Dataset, 0 workers", "warm disk cache (new process) vs tutorial, 2 workers",
                   "memory-copy floor, 0 workers", "(all default handlers, W&B offline) vs hand-written loop",
                   "engine epoch without W&B", "peak PSS",
                   "--help", "config error"):
        assert figure in text, figure
    for name in ("tutorial_w0", "cold_w0", "disk_w0", "ram_w0", "tutorial_w2", "cold_w2", "disk_w2", "ram_w2",
                 "memcpy_floor", "engine_epoch", "engine_epoch_no_wandb", "hand_epoch", "engine_ratio",
                 "baseline_pss", "cached_pss", "cache_bytes",
                 "help_seconds", "config_error_seconds"):
        assert re.search(rf"\| {name} \| [0-9.e+-]+ \|", text), name
    assert re.search(r"\| (met|MISSED) \|", text) and "Machine:" in text
