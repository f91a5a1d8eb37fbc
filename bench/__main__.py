"""`python -m bench [--smoke] [--out FILE]`: data pipeline, engine overhead, memory, data path and start-up,
measured as ratios within one run on this machine; prints a table and rewrites bench/RESULTS.md. Each family
is one module that measures and formats its own rows (pipeline, overhead, memory, augment, data_path, startup,
phases, field_of_view, distributed); report.py writes the table and the file. `python -m bench gpu` is the GPU's
own benchmark (gpu.py, bench/RESULTS-gpu.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(volumes=24, source=(256, 256, 128), target=(96, 96, 96), epochs=5, train_volumes=64, train_size=64,
            engine_epochs=5, engine_repeats=3, startup_runs=5, rank_volumes=64, rank_size=128,
            ranks=2, rank_fill=True, rank_pairs=2,  # a first 2-rank run fills the disk cache: not measured
            memory_repeats=2,
            augment_shapes=(("64", (64, 64, 64), 5), ("ctrate", (128, 256, 256), 1)),
            data_path_shape=(128, 256, 256), data_path_volumes=32, matmul_size=2048, roofline_size=64,
            roofline_steps=3, loader_volumes=48, loader_size=64, loader_epochs=3, loader_repeats=2, layout_size=48,
            layout_steps=5,
            loader_model=("model.variant=18", "model.widen_factor=1.0"),
            phase_train=36, phase_val=12, phase_size=64, phase_epochs=2, phase_cold=1, phase_warm=3,
            phase_memory_warm=2,
            phase_model=("model.variant=18", "model.widen_factor=1.0", "model.first_conv_stride=2"),
            gradcam_volumes=2, gradcam_maps=4, fov_shape=(512, 512, 300), fov_spacing=(0.7, 0.7, 1.0), fov_repeats=3,
            steps_volumes=60, steps_before=True, restart_volumes=2000, restart_repeats=3, restart_before=True,
            restart_warm=True, restart_model=("model.variant=18", "model.widen_factor=1.0"))
SMOKE = dict(volumes=4, source=(32, 32, 16), target=(16, 16, 16), epochs=2, train_volumes=8, train_size=16,
             engine_epochs=3, engine_repeats=1, startup_runs=1, rank_volumes=8, rank_size=16,
             ranks=1,  # torchrun's runs with one worker: the smoke checks the benchmark's code makes every figure
             #           (the engine's two-rank paths are tested in tests/cli and tests/kubernetes)
             rank_fill=False, rank_pairs=1, memory_repeats=1, augment_shapes=(("64", (16, 16, 16), 1),),
             data_path_shape=(16, 32, 32), data_path_volumes=8, matmul_size=256, roofline_size=16, roofline_steps=1,
             loader_volumes=8, loader_size=16, loader_epochs=2, loader_repeats=1, layout_size=16, layout_steps=1,
             loader_model=("model.variant=10", "model.widen_factor=0.25"),
             phase_train=6, phase_val=4, phase_size=16, phase_epochs=1, phase_cold=1, phase_warm=1, phase_memory_warm=1,
             phase_model=("model.variant=10", "model.widen_factor=0.25"),
             gradcam_volumes=1, gradcam_maps=2, gradcam_size=[32, 32, 16], fov_shape=(128, 128, 75),
             fov_spacing=(2.8, 2.8, 4.0), fov_repeats=1, fov_shrink=4, phase_memory_apart=False,
             steps_volumes=20, steps_before=False, restart_volumes=20, restart_repeats=1, restart_before=False,
             restart_warm=False, restart_model=("model.variant=10", "model.widen_factor=0.25"),
             pss_every=0.25,  # seconds between PSS samples (full: 20 ms, the phases 100 ms); the smoke's, coarser
             in_process=True)  # pipeline and memory children run in this process: the smoke checks the figures,
#                                not what a new process costs (each costs seconds of imports)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:
        from bench.gpu import main as gpu  # here, not at the top: see the families' import below

        return gpu(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every figure is produced")
    parser.add_argument("--out", help="where the results go (default: bench/RESULTS.md; with --only, none)")
    parser.add_argument("--only", help="comma-separated families (prints their rows; RESULTS.md only with --out)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from bench.pipeline import child_pipeline  # the child's peak PSS is a figure: it imports this family alone

        print(json.dumps(child_pipeline(json.loads(args.child))))
        return 0
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = SMOKE if args.smoke else FULL
    start = time.time()
    # the families here, not at the top: each imports torch and MONAI (~6 s, ~400 MB), which `--help` and the
    # pipeline child above (whose peak PSS is a measured figure) must not
    from bench import augment, data_path, distributed, field_of_view, memory, overhead, phases, pipeline, startup
    from bench.report import markdown, write_results

    families = {"pipeline": pipeline.bench_pipeline, "engine": overhead.bench_engine, "memory": memory.bench_memory,
                "ranks": memory.bench_ranks, "augment": lambda c, w: augment.augment_figures(c),
                "data_path": data_path.bench_data_path, "roofline": lambda c, w: data_path.bench_roofline(c),
                "layout": lambda c, w: overhead.bench_layout(c), "loaders": memory.bench_loaders,
                "phases": phases.bench_phases, "gradcam": lambda c, w: phases.bench_grad_cam(c),
                "startup": lambda c, w: startup.bench_startup(c), "field_of_view": field_of_view.bench_field_of_view,
                "steps": distributed.bench_steps, "restart": distributed.bench_restart}
    table = [pipeline, overhead, memory, augment, data_path, startup, phases, field_of_view, distributed]  # row order
    chosen = args.only.split(",") if args.only else list(families)
    if unknown := set(chosen) - set(families):
        parser.error(f"--only: unknown {sorted(unknown)}; families: {', '.join(families)}")
    with tempfile.TemporaryDirectory(prefix="ct3d-bench-") as tmp:
        figures = {}
        for name in chosen:
            began = time.time()
            figures.update(families[name](cfg, Path(tmp)))
            print(f"bench: {name} took {time.time() - began:.1f} s", file=sys.stderr, flush=True)
    text = markdown(figures, table, cfg, args.smoke, time.time() - start)
    out = args.out or (None if args.only else ROOT / "bench" / "RESULTS.md")
    print(write_results(out, text) if out else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
