"""Start-up: `--help` and a config error, each timed as a new process and checked for its exit code and
output (a command that crashes at once must not pass)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from bench.common import ROOT
from bench.rows import Row, row


def timed_command(args: list[str], expect_code: int, expect_text: str, runs: int) -> tuple[float, bool]:
    """Median seconds of `args` over `runs`, and whether every run exited with `expect_code` and printed
    `expect_text` (a command that crashes at once must not pass a start-up row)."""
    times, ok = [], True
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        ok = ok and proc.returncode == expect_code and expect_text in proc.stdout + proc.stderr
    return statistics.median(times), ok


def bench_startup(cfg: dict) -> dict:
    engine = [sys.executable, "-m", "engine.run"]
    help_s, help_ok = timed_command([*engine, "--help"], 0, "usage:", cfg["startup_runs"])
    error_s, error_ok = timed_command([*engine, "model.name=nope"], 2, "model.name", cfg["startup_runs"])
    return {"help_seconds": help_s, "help_ok": help_ok, "config_error_seconds": error_s, "config_error_ok": error_ok}


def rows(f: dict) -> list[Row]:
    if "help_seconds" not in f:
        return []
    return [row("`python -m engine.run --help` (exit 0, prints usage)", f"{f['help_seconds']:.2f} s", "< 2 s",
                f["help_seconds"] < 2 and f.get("help_ok", False)),
            row("config error `model.name=nope` (exit 2, names the key)", f"{f['config_error_seconds']:.2f} s",
                "< 2 s", f["config_error_seconds"] < 2 and f.get("config_error_ok", False))]
