"""`python -m bench [--smoke] [--only FAMILIES] [--out FILE]`: data pipeline, engine overhead, memory, data path,
start-up and the pretrained encoders, measured as ratios within one run on this machine; prints a table and
rewrites bench/RESULTS.md (with --only: merges those families' rows into it). Each family is one module that
measures and formats its own rows (pipeline, overhead, memory, augment, data_path, startup, phases, field_of_view,
distributed, encoders, encoder_workflow and feeding); report.py writes the table and the file. `python -m bench
gpu` is the GPU's own benchmark (gpu.py, bench/RESULTS-gpu.md)."""

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
            restart_warm=True, restart_model=("model.variant=18", "model.widen_factor=1.0"),
            # encoders: timed on this CPU at a reduced size (half Merlin's native 224x224x160 per axis, CT-FM's 320^3
            # by a fifth per axis), the counts at native; the workflow: a small CT-FM probe on the phantoms
            enc_sizes={"merlin": (112, 112, 80), "ctfm": (64, 64, 64)}, enc_extract_batch=2,
            enc_finetune_batch={"merlin": 1, "ctfm": 1}, enc_steps=2, enc_repeats=3, enc_rows=47_000,
            enc_flow_volumes=40, enc_flow_size=96, enc_flow_epochs=(4, 2),
            enc_flow_ctfm={"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2, 4, 4]},
            feed_shape=(256, 256, 128), feed_volumes=16, feed_batch=4, feed_epochs=3, feed_repeats=7)
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
             enc_sizes={"merlin": (32, 32, 32), "ctfm": (32, 32, 32)}, enc_extract_batch=1,
             enc_finetune_batch={"merlin": 2, "ctfm": 2}, enc_steps=1, enc_repeats=1, enc_rows=4_700,
             enc_flow_volumes=8, enc_flow_size=16, enc_flow_epochs=(2, 2),
             enc_flow_ctfm={"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 2]},
             feed_shape=(32, 32, 16), feed_volumes=8, feed_batch=4, feed_epochs=1, feed_repeats=2,
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
    parser.add_argument("--out", help="where the results go (default: bench/RESULTS.md)")
    parser.add_argument("--only", help="comma-separated families: their rows replace theirs in the results file, "
                                       "the other families' rows kept")
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
    from bench import (
        augment,
        data_path,
        distributed,
        encoder_workflow,
        encoders,
        feeding,
        field_of_view,
        memory,
        overhead,
        phases,
        pipeline,
        startup,
    )
    from bench.report import markdown, merge_results, write_results

    families = {"pipeline": pipeline.bench_pipeline, "engine": overhead.bench_engine, "memory": memory.bench_memory,
                "ranks": memory.bench_ranks, "augment": lambda c, w: augment.augment_figures(c),
                "data_path": data_path.bench_data_path, "roofline": lambda c, w: data_path.bench_roofline(c),
                "layout": lambda c, w: overhead.bench_layout(c), "loaders": memory.bench_loaders,
                "phases": phases.bench_phases, "gradcam": lambda c, w: phases.bench_grad_cam(c),
                "startup": lambda c, w: startup.bench_startup(c), "field_of_view": field_of_view.bench_field_of_view,
                "steps": distributed.bench_steps, "restart": distributed.bench_restart,
                "encoders": lambda c, w: {**encoders.bench_encoders(c, w), **encoder_workflow.bench_workflow(c, w)},
                "feeding": feeding.bench_feeding}
    table = [pipeline, overhead, memory, augment, data_path, startup, phases, field_of_view, distributed, encoders,
             encoder_workflow, feeding]  # row order
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
    out = Path(args.out) if args.out else ROOT / "bench" / "RESULTS.md"
    if args.only:
        merge_results(out, figures, table, chosen, cfg, args.smoke, time.time() - start)
        print(text)
    else:
        print(write_results(out, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
