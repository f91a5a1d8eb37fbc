import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, TEXT

HAND = "## Measured by hand\n\n| command | measured |\n|---|---|\n| `make demo` | 77 s |\n"
ENCODER_ROWS = ("Merlin encoder, 117.3 M parameters: forward GFLOPs per volume at its native 224x224x160",
                "CT-FM encoder, 77.8 M parameters: forward GFLOPs per volume at its native 320x320x320",
                "Merlin at 32x32x32 (reduced: native 224x224x160) on this CPU: extraction",
                "CT-FM at 32x32x32 (reduced: native 320x320x320) on this CPU: fine-tune step",
                "Merlin: head epoch from a 4,700 x 2048 float16 embedding table",
                "CT-FM: head epoch from a 4,700 x 512 float16 embedding table", "a frozen CT-FM probe")
ENCODER_FIGURES = ("enc_merlin_gflops", "enc_ctfm_gflops", "enc_merlin_params", "enc_ctfm_finetune_peak_bytes",
                   "enc_merlin_head_rows_seen", "enc_ctfm_head_steps", "enc_flow_filled")
FEEDING_ROWS = ("ring vs default_collate, libgomp's default wait", "ring vs default_collate, OMP_WAIT_POLICY=passive",
                "minor page faults per volume, ring vs default_collate", "memory-copy floor: one",
                "CPU cores per H100 to feed ResNet-18 at 560 volumes/s")
FEEDING_FIGURES = tuple(f"feed_{wait}_{name}" for wait in ("default", "passive") for name in
                        ("new_cpu_ms", "old_cpu_ms", "new_faults", "old_faults", "floor_ms"))


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
                   "--help", "config error", "CT-RATE preprocessing", "lungs kept", "the old 192 mm crop",
                   *ENCODER_ROWS, *FEEDING_ROWS):
        assert figure in text, figure
    for name in ("tutorial_w0", "cold_w0", "disk_w0", "ram_w0", "tutorial_w2", "cold_w2", "disk_w2", "ram_w2",
                 "memcpy_floor", "engine_epoch", "engine_epoch_no_wandb", "hand_epoch", "engine_ratio",
                 "baseline_pss", "cached_pss", "cache_bytes", "data_path_w0_samples_per_s", "step_gflops",
                 "matmul_gflops", "help_seconds", "config_error_seconds", *ENCODER_FIGURES, *FEEDING_FIGURES):
        assert re.search(rf"\| {name} \| [0-9.e+-]+ \|", text), name
    assert re.search(r"\| (met|MISSED) \|", text) and "Machine:" in text
    assert text.endswith(f"\n\n{HAND}") and "| old | table |" not in text
    assert re.search(r"\(spread [0-9.e+-]+-[0-9.e+-]+\)", text)
    for line in text.splitlines():  # a row without a target is reported, never met
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 6 and cells[4] in ("met", "MISSED", "reported"):
            assert (cells[3] == "") == (cells[4] == "reported"), line


def results_to_merge_into(tmp_path) -> Path:
    """A results file with a row, a note, a raw figure and the hand-measured section that `--only` must keep."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n- Date: 2026-01-01\n\n| figure | measured | target | |\n|---|---|---|---|\n"
                   "| kept row | 1.0x | | reported |\n\nNotes: kept.\n\n| name | value |\n|---|---|\n| kept | 1 |\n\n"
                   f"{HAND}")
    return out


def merged_rows_and_figures(out: Path, rows: tuple, figures: tuple) -> str:
    """The merged file's text, after checking each of a family's rows has a status and each raw figure a number,
    and the rows, figures and hand-measured section that were there before are kept."""
    text = out.read_text()
    for figure in rows:
        assert re.search(re.escape(figure) + r".*\| (met|MISSED|reported) \|", text), figure
    for name in figures:
        assert re.search(rf"\| {name} \| [0-9.e+-]+ \|", text), name
    assert "| kept row | 1.0x | | reported |" in text and "| kept | 1 |" in text and text.endswith(f"\n\n{HAND}")
    return text


@pytest.mark.slow
def test_encoders_smoke_makes_every_figure_and_merges_into_the_results_file(tmp_path):
    """`--only encoders` at smoke size: every encoder row and raw figure, the second frozen run extracting nothing
    (the log line in its row), merged into an existing results file whose other rows, header and hand-measured
    section stay."""
    out = results_to_merge_into(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "encoders", "--out", str(out)],
                          cwd=ROOT, capture_output=True, **TEXT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = merged_rows_and_figures(out, ENCODER_ROWS, ENCODER_FIGURES)
    assert "embeddings: all 8 volumes cached: no extraction" in text and "| enc_flow_filled | 8 |" in text
    assert "Notes: kept." in text and "- Updated by `python -m bench --only encoders`" in text


def test_feeding_smoke_makes_every_figure_and_merges_into_the_results_file(tmp_path):
    """`--only feeding` at smoke size (in this process: a new one would only add its imports): every feeding row
    with a status and every raw figure, merged into a results file whose other rows stay."""
    from bench.__main__ import main

    out = results_to_merge_into(tmp_path)
    assert main(["--smoke", "--only", "feeding", "--out", str(out)]) == 0
    text = merged_rows_and_figures(out, FEEDING_ROWS, FEEDING_FIGURES)
    assert "no CUDA here: no pinned buffers" in text or "CUDA: the ring's buffers pinned" in text


def test_feeding_rows_fail_a_slow_ring_and_a_measurement_too_good_to_be_true():
    """The CPU rows are met only inside [the memory-copy floor, 2.5 ms], the projection at <= 2 cores and above the
    floor, the faults row only when the old path's faults were counted (a counter reading nothing reads 0 for both)."""
    from bench.feeding import rows as feeding_rows

    good = {"feed_cuda": 0, "feed_shape": "256x256x128", "feed_batch": 4, "feed_volumes": 16, "feed_torch_threads": 2,
            "feed_volume_bytes": 16777216}
    for wait in ("default", "passive"):
        good.update({f"feed_{wait}_new_cpu_ms_all": [1.8, 2.0], f"feed_{wait}_old_cpu_ms_all": [11.0, 12.0],
                     f"feed_{wait}_new_faults_all": [0.06, 0.5], f"feed_{wait}_old_faults_all": [4096.0, 4096.3],
                     f"feed_{wait}_floor_ms_all": [1.1, 1.3]})

    def status(**change):
        return [r[3] for r in feeding_rows({**good, **change})]

    assert status() == ["met", "met", "met", "reported", "met"]
    assert status(feed_default_new_cpu_ms_all=[1.8, 3.0])[0] == "MISSED"  # the spread crosses 2.5 ms
    too_good = status(feed_default_new_cpu_ms_all=[0.2, 0.3], feed_passive_new_cpu_ms_all=[0.2, 0.3])
    assert too_good == ["MISSED", "MISSED", "met", "reported", "MISSED"]  # under the copy every batch needs
    assert status(feed_default_old_faults_all=[0.0, 0.0])[2] == "MISSED"  # the counter saw nothing
    assert status(feed_default_new_faults_all=[0.1, 12.0])[2] == "MISSED"
    assert status(feed_default_new_cpu_ms_all=[2.0, 3.7])[4] == "MISSED"  # 560 x 3.7 ms = 2.07 cores
    assert feeding_rows({}) == []  # --only left the family out


def test_only_merges_rows_by_figure_and_raw_figures_by_name(tmp_path):
    """An --only rerun replaces its own rows and raw figures and the line saying when; every other line stays."""
    from types import SimpleNamespace

    from bench.report import merge_results

    family = SimpleNamespace(rows=lambda f: [("mine", f"{f['mine']}x", "", "reported"), ("new", "2x", "", "reported")])
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n- Date: 2026-01-01\n- Sizes: full\n\n| figure | measured | target | |\n"
                   "|---|---|---|---|\n| other | 3x |  | reported |\n| mine | 1x |  | reported |\n| mine too | 4x |  | "
                   "reported |\n\nNotes: kept.\n\n| name | value |\n|---|---|\n| mine | 1 |\n| theirs | 5 |\n\n"
                   f"{HAND}")
    for value in (7, 8):  # twice: the second replaces the first's rows and its line
        text = merge_results(out, {"mine": value}, [family], ["mine"], {}, False, 1.0)
    table = text.split("| figure | measured | target | |\n|---|---|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert table == ["| other | 3x |  | reported |", "| mine | 8x |  | reported |", "| mine too | 4x |  | reported |",
                     "| new | 2x |  | reported |"]
    assert "| mine | 8 |\n| theirs | 5 |\n\n" in text and "Notes: kept." in text and text.endswith(f"\n\n{HAND}")
    assert text.count("- Updated by `python -m bench --only mine`: ") == 1
    assert text.index("- Sizes: full\n- Updated by") < text.index("| figure |")


def test_encoder_headline_is_missed_below_target_or_when_the_head_did_less_than_its_work():
    """The headline is met only when the whole spread clears 100x and the head epoch saw every row and was no
    faster than half its floor (a head loop skipping batches would make the ratio look good)."""
    from bench.encoders import headline

    good = {"enc_merlin_rows": 47_000, "enc_merlin_features": 2048, "enc_merlin_head_batch": 64,
            "enc_merlin_extract_batch": 2, "enc_merlin_head_steps": 735, "enc_merlin_head_rows_seen": 47_000,
            "enc_merlin_extract_seconds_all": [3.0, 3.2], "enc_merlin_head_epoch_all": [1.5, 1.7],
            "enc_merlin_head_floor_all": [0.5, 0.6]}
    good["enc_merlin_ratio_all"] = [(47_000 * s + h) / h for s, h in zip(good["enc_merlin_extract_seconds_all"],
                                                                       good["enc_merlin_head_epoch_all"])]

    def status(**change):
        f = {**good, **change}
        return headline(f, "merlin", "Merlin", "here")[3]

    assert status() == "met"
    assert status(enc_merlin_ratio_all=[90.0, 150.0]) == "MISSED"  # the spread crosses the target
    assert status(enc_merlin_head_rows_seen=23_500) == "MISSED"  # half the table
    assert status(enc_merlin_head_epoch_all=[0.2, 1.7]) == "MISSED"  # under half its floor


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
    assert "failed" not in text and "dropped (" not in text  # the smoke has no time budget: every row runs
    assert "Dropped for time (least important first): none" in text
    for row in ("ResNet-18, default layout, cudnn.benchmark on, torch.compile off",
                "ResNet-18, channels-last 3D, cudnn.benchmark on", "cudnn.benchmark off", "ram cache (0 worker",
                "disk cache ("):
        assert re.search(re.escape(row) + r".*\| [0-9.]+ \|", text), row
    for batch in (2, 4):  # the smoke's batches (4, 8, 16 on a GPU): the hand loop's row and the engine's beside it,
        #                   with no GPU busy figure without a GPU's profiler kernel time
        assert re.search(rf"torch.compile off \| {batch} \| [0-9.]+ \| - \|", text), batch
        assert re.search(rf"\n\| {batch} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| - \|\n", text), batch
    ran = re.findall(r"^\| (.+?) \| [0-9]+ \| [0-9]+ \|$", text, re.M)  # the cost table: rows in the order they ran
    assert ran[0].startswith("ResNet-18, default layout") and ran[1].startswith("the engine's loaders feeding")
    for row in ENCODER_ROWS[:-1]:  # the encoders at smoke size, on the device it was given (no workflow row)
        assert re.search(re.escape(row) + r".*\| (met|MISSED|reported) \|", text), row


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
