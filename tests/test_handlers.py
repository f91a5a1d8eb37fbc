import logging

import torch
from ignite.engine import Engine

from engine.handlers import MetricsTable, Progress, TrainStats, ValidationMetrics
from engine.workflow import make_inferer, resolve_amp


def fake_trainer(losses, epoch_length):
    it = iter(losses * 10)
    return Engine(lambda engine, batch: {"loss": torch.tensor(next(it))})


def test_train_stats_mean_loss_per_epoch_and_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    trainer = fake_trainer([1.0, 3.0], 2)
    stats = TrainStats(opt)
    stats.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    assert stats.last_epoch_loss == 2.0 and stats.lr == 0.25


def test_plain_progress_lines_when_not_a_terminal(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = fake_trainer([0.5], 4)
    stats = TrainStats(opt)
    stats.attach(trainer)
    Progress(stats, log_every=2, tty=False).attach(trainer)
    with caplog.at_level(logging.INFO, logger="ct3d"):
        trainer.run([0, 1, 2, 3], max_epochs=1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/1 iteration 2/4 loss 0.5000 lr 0.1", "epoch 1/1 iteration 4/4 loss 0.5000 lr 0.1"]


def test_validation_metrics_on_bare_engine():
    batches = [(torch.tensor([[3.0], [-3.0]]), torch.tensor([[1.0], [0.0]])),
               (torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [1.0]]))]
    evaluator = Engine(lambda engine, batch: {"pred": batch[0], "label": batch[1]})
    ValidationMetrics(["x"], "binary", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0).attach(evaluator)
    evaluator.run(batches)
    m = evaluator.state.metrics
    assert m["auc_macro"] == 1.0 and m["accuracy"] == 0.75
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([3.0, -3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert abs(m["val_loss"] - float(expected)) < 1e-6
    evaluator.run(batches[:1])  # a new epoch starts from nothing
    assert evaluator.state.metrics["accuracy"] == 1.0


def test_metrics_table_tracks_best_and_round_trips(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    stats = TrainStats(opt)
    table = MetricsTable(tmp_path / "m.csv", "auc_macro", stats, ["x"])
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    for epoch, auc in [(1, 0.6), (2, 0.8), (3, 0.7)]:
        trainer.state.epoch, trainer.state.iteration = epoch, epoch * 10
        evaluator.state.metrics = {"auc_macro": auc}
        improved = table.record(trainer, evaluator)
        assert improved == (epoch in (1, 2))
    assert table.best["epoch"] == 2 and len((tmp_path / "m.csv").read_text().splitlines()) == 4
    other = MetricsTable(tmp_path / "m2.csv", "auc_macro", stats, ["x"])
    other.load_state_dict(table.state_dict())
    assert other.best == table.best and other.rows == table.rows


def test_mixed_precision_only_on_cuda():
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) is None and resolve_amp("auto", cpu) is None
    net = torch.nn.Linear(2, 1)
    out = make_inferer(cpu, None)(torch.ones(1, 2), net)
    assert out.dtype == torch.float32


def test_bf16_inferer_autocasts_the_forward_pass():
    net = torch.nn.Linear(2, 1)
    assert make_inferer(torch.device("cpu"), torch.bfloat16)(torch.ones(1, 2), net).dtype == torch.bfloat16


def test_checkpoints_snapshot_state_before_background_write(tmp_path):
    from engine.checkpoint import load_checkpoint
    from engine.handlers import Checkpoints

    weights = {"w": torch.zeros(1000)}
    checkpoints = Checkpoints(tmp_path, lambda: {"model": weights, "trainer": {"epoch": 1, "iteration": 1}})
    paths = checkpoints.save("best", "last")
    weights["w"] += 1  # training goes on while the writer runs
    checkpoints.wait()
    for path in paths:
        assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(1000))


def test_checkpoint_write_error_surfaces_in_training_thread(tmp_path, monkeypatch):
    import pytest

    from engine import handlers

    def broken(path, state):
        raise OSError("disk full")

    monkeypatch.setattr(handlers, "save_checkpoint", broken)
    checkpoints = handlers.Checkpoints(tmp_path, lambda: {"model": {}})
    checkpoints.save("last")
    with pytest.raises(OSError, match="disk full"):
        checkpoints.wait()
