"""What a training step costs besides its own work: no host read of a tensor outside logging steps (each one
waits for the GPU's queue), counted with bench/counting.py; and the device augmentation decides with none."""


from bench.counting import Counts, classify
from engine.config.loading import load_config
from engine.training.workflow import train
from helpers import tiny_overrides


def test_no_host_read_outside_logging_steps(tmp_path, tiny_demo):
    counts = Counts().install()
    try:
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2", "train.log_every=2",
                                               "loader.batch_size=2", "augment.enabled=false",
                                               "tracking.wandb.mode=offline")), attach=counts.attach)
    finally:
        counts.remove()
    epoch_length = len(counts.per_iteration) // 2
    found = classify(counts.per_iteration, epoch_length, log_every=2)
    assert found["plain_steps"] >= 4 and found["plain_reads"] == 0, counts.per_iteration
    assert found["logging_reads"] >= found["logging_steps"]  # the counter sees the step log's one read
    assert found["plain_collectives"] == found["logging_collectives"] == 0  # one process: no collective at all
