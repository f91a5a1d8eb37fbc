import logging

import torch
from ignite.engine import Engine, Events

from engine.training.handlers import History, MetricsTable, Progress, ValidationMetrics
from engine.training.steps import StepLog


def fake_trainer(losses):
    it = iter(losses * 10)
    return Engine(lambda engine, batch: {"loss": torch.tensor(next(it))})


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_step_log_reduces_every_n_iterations_and_at_the_epochs_end():
    losses = [1.0, 3.0, 2.0, 6.0, 4.0]
    trainer, steps, seen = fake_trainer(losses), StepLog(every=2), []
    steps.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append((e.state.iteration, steps.reduced_now, steps.running_loss)))
    trainer.run(list(range(5)), max_epochs=2)
    assert [(it, loss) for it, reduced, loss in seen if reduced] == [
        (2, 2.0), (4, 4.0), (5, 4.0), (6, 1.0), (8, 2.5), (10, 5.0)]  # every 2nd iteration, and each epoch's end
    assert trainer.state.metrics["train_loss"] == sum(losses) / 5
    assert trainer.state.metrics["running_loss"] == 5.0


def test_step_log_carries_the_epochs_sums_over_a_resume():
    steps = StepLog(every=3)
    steps.epoch_sum, steps.epoch_steps = 7.5, 3
    again = StepLog(every=3)
    again.load_state_dict(steps.state_dict())
    assert (again.epoch_sum, again.epoch_steps) == (7.5, 3)
    trainer = fake_trainer([0.5])
    trainer.load_state_dict({"iteration": 3, "epoch_length": 5, "max_epochs": 1})  # resumed after 3 of 5 batches
    again.attach(trainer)
    trainer.run(list(range(5)))  # the last two batches: their sums are added to the restored ones
    assert trainer.state.metrics["train_loss"] == (7.5 + 1.0) / 5


def test_a_start_at_an_epochs_boundary_begins_with_empty_sums():
    """Restored sums of a mid-epoch checkpoint whose epoch is run again (another batch size) are not counted."""
    steps = StepLog(every=5)
    steps.load_state_dict({"epoch_sum": 100.0, "epoch_steps": 4})
    trainer = fake_trainer([2.0])
    steps.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    assert trainer.state.metrics["train_loss"] == 2.0


def test_nan_loss_stops_training_at_the_next_reduce():
    trainer = fake_trainer([1.0, float("nan"), 1.0, 1.0])
    steps = StepLog(every=3)
    steps.attach(trainer)
    trainer.run([0, 1, 2, 3], max_epochs=3)
    assert trainer.state.iteration == 3 and trainer.should_terminate and steps.diverged
    quiet = fake_trainer([1.0, float("inf")])
    StepLog(every=1, stop_on_nan=False).attach(quiet)  # fp16: the scaler skips such steps
    quiet.run([0, 1], max_epochs=2)
    assert quiet.state.iteration == 4


def test_step_log_requests_are_summed_at_each_reduce_and_keep_reducing_reduces_every_step():
    trainer, steps, reduced = fake_trainer([1.0, 1.0]), StepLog(every=4), []
    calls = []
    index = steps.request(lambda: calls.append(1) or len(calls) == 2)
    steps.attach(trainer)

    def watch(engine):
        if steps.reduced_now:
            reduced.append((engine.state.iteration, steps.flags[index]))
            steps.keep_reducing = steps.flags[index]

    trainer.add_event_handler(Events.ITERATION_COMPLETED, watch)
    trainer.run(list(range(12)), max_epochs=1)
    assert reduced == [(4, False), (8, True), (9, False), (12, False)]  # flags read at reduces only


def test_history_keeps_lr_epoch_times_and_seconds_across_resume():
    trainer = fake_trainer([0.5])
    history = History(sgd(0.25))
    history.attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    assert history.lr == 0.25 and history.lr_history[0] == (1, 0.25)
    assert len(history.epoch_seconds) == 3
    saved, again = history.state_dict(), History(sgd(0.25))
    again.load_state_dict(saved)
    assert again.epoch_seconds == history.epoch_seconds and again.seconds >= saved["seconds"] > 0


def test_plain_progress_lines_when_not_a_terminal(caplog):
    trainer = fake_trainer([0.5])
    steps = StepLog(every=2)
    steps.attach(trainer)
    Progress(History(sgd(0.1)), steps, tty=False).attach(trainer)
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


def test_metrics_table_records_after_each_validation_and_round_trips(tmp_path):
    history = History(sgd(0.1))
    validation = ValidationMetrics(["x"], "binary", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0)
    table = MetricsTable(tmp_path / "m.csv", "auc_macro", history, ["x"], validation)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    table.attach(trainer, evaluator)
    for epoch, auc in [(1, 0.6), (2, 0.8), (3, 0.7)]:
        trainer.state.epoch, trainer.state.iteration = epoch, epoch * 10
        validation.last_probs = torch.full((2, 1), epoch / 10)
        evaluator.add_event_handler(Events.STARTED, lambda e, a=auc: e.state.metrics.update(
            auc_macro=a, val_loss=1.0, fbeta_macro=0.5))
        evaluator.run([0])
        assert table.improved_at(epoch) == (epoch in (1, 2))
        evaluator._event_handlers[Events.STARTED].pop()
    assert table.best["epoch"] == 2 and len((tmp_path / "m.csv").read_text().splitlines()) == 4
    assert torch.equal(table.best_outputs["probs"], torch.full((2, 1), 0.2))  # the best validation's outputs
    other = MetricsTable(tmp_path / "m2.csv", "auc_macro", history, ["x"], validation)
    other.load_state_dict(table.state_dict())
    assert other.best == table.best and other.rows == table.rows and other.best_outputs == table.best_outputs
