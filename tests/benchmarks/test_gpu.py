"""`bench gpu`'s parts that decide what its figures mean, checked without a GPU: the bf16 peak by the GPU's exact
name, GPU busy from the profiler's kernel intervals, and the time budget that drops the least important rows. The
smoke run on the CPU is in test_bench.py."""

import re

import pytest
import torch

from bench.gpu import Planned, run_plan
from bench.gpu_peaks import BF16_PEAK, peak_source, peak_tflops
from bench.gpu_report import markdown
from bench.gpu_steps import kernel_seconds, profiled_kernel_seconds

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.5),  # SXM5: data sheet 1,979 TFLOP/s with sparsity
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
])
def test_bf16_peak_is_the_data_sheets_dense_figure_for_the_exact_device_name(name, peak):
    assert peak_tflops(name) == peak
    assert "data sheet" in peak_source(name)


@pytest.mark.parametrize("name", ["NVIDIA H100", "H100 80GB HBM3", "NVIDIA H100 80GB HBM3 ", "nvidia h200",
                                  "NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""])
def test_a_name_not_in_the_table_gets_no_peak_not_a_neighbours(name):
    assert peak_tflops(name) is None
    assert "no % of peak" in peak_source(name)


def test_an_sxm_h100_is_no_longer_given_the_pcie_cards_peak():
    """The issue's case: a part of the name ('H100') gave the SXM card 756 and a "% of peak" 1.31x too high."""
    sxm, pcie = peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("NVIDIA H100 PCIe")
    assert sxm / pcie == pytest.approx(1.308, abs=0.001)
    assert all(peak > 100 for peak, _ in BF16_PEAK.values())


def result_with_one_step(tflops: float) -> dict:
    row = Planned("steps", "r", lambda: {}, 1.0, order=("18", False, False, False, 4), label="ResNet-18, default")
    row.figures = {"samples_per_s": 100.0, "busy": 0.5, "tflops": tflops, "peak_memory_gib": 1.0,
                   "warmup_seconds": 1.0}
    return {"size": [8, 8, 8], "batch": 4, "rows": [row], "seconds": 1.0}


def test_the_results_give_a_share_of_peak_only_for_a_known_gpu():
    known = markdown(result_with_one_step(494.75), "NVIDIA H100 80GB HBM3", cuda=True)
    assert "| 494.8 (50% of 989.5) |" in known and "| 50% |" in known  # the busy column, from the profiler
    unknown = markdown(result_with_one_step(494.75), "NVIDIA H100 SXM5 96GB", cuda=True)
    assert "494.8 (peak unknown)" in unknown and not re.search(r"[0-9]% of [0-9]", unknown)
    assert "not in bench/gpu_peaks.py" in unknown


def test_kernel_time_is_the_union_of_kernel_intervals_not_their_sum():
    events = [{"cat": "kernel", "ts": 0, "dur": 100},  # stream 1
              {"cat": "kernel", "ts": 50, "dur": 100},  # stream 2, overlapping: 0-150 is busy once
              {"cat": "kernel", "ts": 300, "dur": 50},
              {"cat": "gpu_memcpy", "ts": 200, "dur": 90},  # a copy engine, not the SMs
              {"cat": "cpu_op", "ts": 0, "dur": 1000},
              {"cat": "kernel", "ts": 320, "dur": 10}]  # inside the one before
    assert kernel_seconds({"traceEvents": events}) == pytest.approx(200e-6)
    assert kernel_seconds({"traceEvents": [e for e in events if e["cat"] != "kernel"]}) is None


def test_on_the_cpu_the_profiler_runs_and_reports_no_busy_figure():
    x = torch.randn(64, 64)
    assert profiled_kernel_seconds(lambda: x @ x, CPU) is None


def planned(name: str, estimate: float, takes: float, now: list[float], keep: bool = False) -> Planned:
    def run() -> dict:
        now[0] += takes
        return {"took": takes}

    return Planned("steps", name, run, estimate, keep)


def test_the_budget_drops_the_least_important_rows_first_names_them_and_never_the_kept_ones(capsys):
    now = [0.0]
    rows = [planned("first model row", 20, 30, now, keep=True), planned("feeding", 60, 80, now, keep=True),
            planned("engine", 40, 40, now), planned("channels-last", 20, 20, now),
            planned("compile", 90, 90, now), planned("cheap but less important", 5, 5, now)]
    run_plan(rows, 200, CPU, clock=lambda: now[0])
    ran = [r.name for r in rows if "took" in r.figures]
    dropped = [r.name for r in rows if "dropped" in r.figures]
    assert ran == ["first model row", "feeding", "engine", "channels-last"]  # 170 s spent, 30 left
    assert dropped == ["compile", "cheap but less important"]  # not the cheap one in compile's place
    err = capsys.readouterr().err
    assert "dropped compile (time budget: ~90 s estimated, 30 s left)" in err
    assert "dropped cheap but less important" in err


def test_rows_that_may_not_be_dropped_run_past_the_budget_and_without_one_every_row_runs():
    now = [0.0]
    rows = [planned("first model row", 20, 500, now, keep=True), planned("feeding", 60, 60, now, keep=True),
            planned("engine", 1, 1, now)]
    run_plan(rows, 100, CPU, clock=lambda: now[0])
    assert [("took" in r.figures, "dropped" in r.figures) for r in rows] == [(True, False), (True, False),
                                                                          (False, True)]
    now = [0.0]
    rows = [planned(f"row {i}", 1000, 1000, now) for i in range(3)]
    run_plan(rows, None, CPU, clock=lambda: now[0])
    assert all("took" in r.figures for r in rows)


def test_a_row_that_fails_is_reported_failed_and_the_next_still_runs():
    def broken() -> dict:
        raise RuntimeError("CUDA out of memory")

    rows = [Planned("steps", "broken", broken, 1.0), Planned("steps", "fine", lambda: {"ok": 1}, 1.0)]
    run_plan(rows, None, CPU)
    assert rows[0].figures == {"failed": "RuntimeError: CUDA out of memory"} and rows[1].figures == {"ok": 1}


def test_without_cuda_a_pod_that_asked_for_a_gpu_fails_and_a_laptop_does_not(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    from bench.__main__ import main

    assert main(["gpu", "--require-cuda", "--out", str(tmp_path / "r.md")]) == 1
    assert main(["gpu", "--out", str(tmp_path / "r.md")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "r.md").exists()
