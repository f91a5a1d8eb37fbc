import re
import subprocess
import sys

import pytest

from helpers import ROOT, TEXT

HAND = "## Measured by hand\n\n| command | measured |\n|---|---|\n| `make demo` | 77 s |\n"


@pytest.mark.slow
def test_benchmark_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Benchmark results\n\n| old | table |\n\n{HAND}")  # a rerun keeps the hand-measured section
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, **TEXT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for figure in ("RAM cache vs tutorial Dataset, 0 workers", "warm disk cache (new process) vs tutorial, 2 workers",
                   "memory-copy floor, 0 workers", "vs a hand-written loop doing the same",
                   "engine epoch without W&B", "peak PSS", "data path:", "roofline:",
                   "--help", "config error", "CT-RATE preprocessing", "lungs kept", "the old 192 mm crop"):
        assert figure in text, figure
    for name in ("tutorial_w0", "cold_w0", "disk_w0", "ram_w0", "tutorial_w2", "cold_w2", "disk_w2", "ram_w2",
                 "memcpy_floor", "engine_epoch", "engine_epoch_no_wandb", "hand_epoch", "engine_ratio",
                 "baseline_pss", "cached_pss", "cache_bytes", "data_path_w0_samples_per_s", "step_gflops",
                 "matmul_gflops", "help_seconds", "config_error_seconds"):
        assert re.search(rf"\| {name} \| [0-9.e+-]+ \|", text), name
    assert re.search(r"\| (met|MISSED) \|", text) and "Machine:" in text
    assert text.endswith(f"\n\n{HAND}") and "| old | table |" not in text
    assert re.search(r"\(spread [0-9.e+-]+-[0-9.e+-]+\)", text)
    for line in text.splitlines():  # a row without a target is reported, never met
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 6 and cells[4] in ("met", "MISSED", "reported"):
            assert (cells[3] == "") == (cells[4] == "reported"), line


def test_rows_without_a_target_are_never_met_and_targets_inside_the_noise_are_missed():
    from bench.rows import ratio_row, row

    assert row("figure", "1.0x")[3] == "reported"
    assert row("figure", "1.0x", "<= 2x", True)[3] == "met"
    assert ratio_row("engine", 1.00, (0.97, 1.02), 1.03, lower_is_better=True)[3] == "met"
    assert ratio_row("engine", 1.01, (0.97, 1.05), 1.03, lower_is_better=True)[3] == "MISSED"  # median meets it
    assert ratio_row("cache", 25.0, (18.0, 30.0), 20, lower_is_better=False)[3] == "MISSED"


def test_a_crashing_command_fails_its_start_up_row():
    from bench.rows import row
    from bench.startup import timed_command

    seconds, ok = timed_command([sys.executable, "-c", "raise SystemExit(1)"], 0, "usage:", runs=1)
    assert seconds < 2 and not ok  # fast, but it crashed
    assert row("start-up", f"{seconds:.2f} s", "< 2 s", seconds < 2 and ok)[3] == "MISSED"
    seconds, ok = timed_command([sys.executable, "-m", "engine.run", "--help"], 0, "usage:", runs=1)
    assert ok


def test_gpu_benchmark_says_there_is_no_gpu_and_its_smoke_runs_on_the_cpu(tmp_path, capsys, monkeypatch):
    """Without CUDA `bench gpu` exits 0 saying so and writes nothing; its code path, at smoke size on the CPU,
    produces every row (a configuration that fails would say `failed`). In this process (`python -m bench`'s
    main): a new one would only add its imports."""
    import torch

    from bench.__main__ import main

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    if not torch.cuda.is_available():
        assert main(["gpu", "--out", str(tmp_path / "none.md")]) == 0
        assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "none.md").exists()
    out = tmp_path / "RESULTS-gpu.md"
    out.write_text(f"# GPU benchmark results\n\n| old | table |\n\n{HAND}")
    assert main(["gpu", "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.endswith(f"\n\n{HAND}") and "| old | table |" not in text  # the rerun kept the hand-measured part
    assert "failed" not in text and "skipped" not in text
    for row in ("ResNet-18, default layout, cudnn.benchmark on, torch.compile off",
                "ResNet-18, channels-last 3D, cudnn.benchmark on", "cudnn.benchmark off", "ram cache (0 worker",
                "disk cache ("):
        assert re.search(re.escape(row) + r".*\| [0-9.]+ \|", text), row


def test_memory_rows_have_a_lower_bound_an_empty_cache_fails():
    """A RAM cache that held nothing (or held a second copy) would pass an upper bound alone; every memory row is
    two-sided, with its spread over the repeats."""
    from bench.memory import rows as memory_rows

    empty = {"baseline_pss_all": [1.0e9, 1.1e9], "cached_pss_all": [1.0e9, 1.1e9], "baseline_pss": 1.05e9,
             "cached_pss": 1.05e9, "cache_bytes": 5e8, "cache_built_pss_all": [1e6, 2e6],
             "ranks_pss_cached_all": [2e9, 2e9], "ranks_pss_uncached_all": [2e9, 2e9], "ranks_pss_cached": 2e9,
             "ranks_pss_uncached": 2e9, "ranks_cache_bytes": 5e8}
    full = {**empty, "cached_pss_all": [1.5e9, 1.6e9], "cached_pss": 1.55e9, "cache_built_pss_all": [5.1e8, 5.2e8],
            "ranks_pss_cached_all": [2.5e9, 2.45e9], "ranks_pss_cached": 2.475e9}
    doubled = {**full, "cache_built_pss_all": [1.0e9, 1.01e9]}
    status = {name: {r[0].split(" (")[0]: r[3] for r in memory_rows(f)}
              for name, f in (("empty", empty), ("full", full), ("doubled", doubled))}
    rows = ["peak PSS, RAM cache + 2 workers vs baseline + cache bytes", "RAM cache: PSS its building added vs the "
            "cached bytes", "2-rank run: RAM cache's share of peak PSS vs one copy of the cached bytes"]
    assert [status["empty"][r] for r in rows] == ["MISSED"] * 3
    assert [status["full"][r] for r in rows] == ["met"] * 3
    assert status["doubled"][rows[1]] == "MISSED"
    assert all("(spread" in r[1] for r in memory_rows(full) if r[0].split(" (")[0] in rows)


def test_a_rewrite_keeps_the_hand_measured_section_verbatim_and_nothing_else_of_the_old_file(tmp_path):
    """`make bench` rewrites RESULTS.md; the figures measured by hand (make demo, make test), which the README links
    to, are carried over as they were: from their heading to the next `## ` heading, wherever they stood."""
    from bench.report import write_results

    results = tmp_path / "RESULTS.md"
    hand = "## Measured by hand\n\nKept as it is.  \n\n### make test\n\n| `make test` | 7 min 22 s |\n\n"
    results.write_text(f"# Benchmark results\n\n| old | 1.0x |\n\n{hand}## Later\n\nnot kept\n")
    written = write_results(results, "# Benchmark results\n\n| new | 2.0x |\n")
    kept = hand.rstrip("\n")  # the trailing blank lines that led to the next heading
    assert results.read_text() == written == f"# Benchmark results\n\n| new | 2.0x |\n\n{kept}\n"
    assert write_results(results, "# Benchmark results\n\n| new | 2.0x |\n") == written  # and the next rerun too

    results.write_text("# Benchmark results\n\n## Measured by handwriting\n\nnot the section\n")
    assert write_results(results, "# new\n") == "# new\n" == results.read_text()
    assert write_results(tmp_path / "absent.md", "# new\n") == "# new\n"
