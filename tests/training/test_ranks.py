"""What every rank must agree on, with the collectives stood in for: the resume's world size, each rank's own
random state, rank 0's verdict on stopping and its validation figures."""

import pytest
import torch
from ignite.engine import Engine

from engine.training.handlers import ValidationMetrics
from engine.training.state import RandomState, TrainerState
from engine.training.steps import share_stop
from engine.utils.errors import CT3DError


def ranks(monkeypatch, rank: int, world: int) -> None:
    import ignite.distributed as idist

    monkeypatch.setattr(idist, "get_rank", lambda: rank)
    monkeypatch.setattr(idist, "get_world_size", lambda: world)


def trainer_at(epoch_length: int) -> Engine:
    trainer = Engine(lambda engine, batch: None)
    trainer.state.epoch_length, trainer.state.max_epochs = epoch_length, 3
    return trainer


def test_a_mid_epoch_checkpoint_is_refused_under_another_world_size_and_an_epochs_end_is_not(monkeypatch):
    ranks(monkeypatch, 0, 4)
    mid = {"epoch": 2, "iteration": 7, "epoch_length": 5, "stopped_early": False, "world_size": 2}
    with pytest.raises(CT3DError, match=r"epoch 2 after 2 of its 5 iterations, with 2 rank\(s\); this run has 4"):
        TrainerState(trainer_at(5)).load_state_dict(mid)
    end = TrainerState(trainer_at(3))  # 4 ranks: fewer steps an epoch; epoch 2 done
    end.load_state_dict({**mid, "iteration": 10})
    assert end.trainer.state.epoch == 2
    ranks(monkeypatch, 0, 2)

    class Sampler:
        skipped = None

        def skip_next(self, samples):
            self.skipped = samples

    same = trainer_at(5)
    same.state.dataloader = type("Loader", (), {"sampler": Sampler(), "batch_size": 2})()
    TrainerState(same).load_state_dict(mid)  # the world it was taken with: at the next batch
    assert same.state.iteration == 7 and same.state.dataloader.sampler.skipped == 4


def test_each_rank_resumes_its_own_random_state(monkeypatch):
    import torch.distributed as dist

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(RandomState._own())
    ranks(monkeypatch, 1, 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, own: out.__setitem__(slice(None), states))
    saved = RandomState().state_dict()
    assert torch.equal(saved["torch"], states[0]["torch"]) and len(saved["per_rank"]) == 2
    torch.manual_seed(99)
    RandomState().load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])  # rank 1's, not rank 0's
    ranks(monkeypatch, 1, 3)  # another world size: rank 0's for all
    RandomState().load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])


@pytest.mark.parametrize("rank_0_stops", [True, False])
def test_rank_0s_verdict_on_stopping_is_every_ranks(monkeypatch, rank_0_stops):
    import ignite.distributed as idist

    ranks(monkeypatch, 1, 2)
    sent = []
    monkeypatch.setattr(idist, "broadcast", lambda value, src: sent.append((float(value), src))
                        or torch.tensor(float(rank_0_stops)))
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    share_stop(trainer, evaluator)
    trainer.should_terminate = not rank_0_stops  # this rank's own early stopping thought otherwise
    evaluator.run([0])
    assert trainer.should_terminate is rank_0_stops and sent == [(float(not rank_0_stops), 0)]


def test_validation_figures_are_rank_0s_on_every_rank(monkeypatch):
    import torch.distributed as dist

    validation = ValidationMetrics(["x"], "binary", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0, rule="youden")
    validation.outputs = lambda: (torch.tensor([[2.0], [-1.0]]), torch.tensor([[1.0], [0.0]]))
    rank_0 = ({"auc_macro": 0.25, "val_loss": 9.0}, [0.3], {"scale": [2.0], "bias": [0.1]}, [0.05])
    ranks(monkeypatch, 1, 2)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda shared, src: shared.__setitem__(0, rank_0))
    evaluator = Engine(lambda e, b: None)
    validation.compute(evaluator)  # this rank computes nothing of its own: it takes rank 0's
    assert evaluator.state.metrics["auc_macro"] == 0.25 and validation.thresholds == [0.3]
    assert validation.calibration == {"scale": [2.0], "bias": [0.1]} and validation.ece == [0.05]


def test_a_mid_epoch_checkpoint_is_refused_under_another_seed(monkeypatch):
    ranks(monkeypatch, 0, 1)
    trainer = trainer_at(5)
    trainer.state.dataloader = type("Loader", (), {"sampler": type("S", (), {"seed": 7})(), "batch_size": 2})()
    with pytest.raises(CT3DError, match=r"train.seed=3; this run has 7"):
        TrainerState(trainer).load_state_dict({"epoch": 2, "iteration": 7, "epoch_length": 5, "stopped_early": False,
                                               "world_size": 1, "seed": 3})


def test_what_rank_0_met_reaches_every_rank(monkeypatch):
    import torch.distributed as dist

    from engine.training.ranks import on_rank_0

    ranks(monkeypatch, 1, 2)
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda shared, src: shared.__setitem__(0, (None, "disk full", False)))
    with pytest.raises(RuntimeError, match="rank 0 failed: disk full"):  # not left waiting in a broadcast
        on_rank_0(lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda shared, src: shared.__setitem__(0, (None, "datalist x: row 3", True)))
    with pytest.raises(CT3DError, match="row 3"):
        on_rank_0(lambda: 1)
    ranks(monkeypatch, 0, 2)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda shared, src: None)

    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # rank 0 raises its own error, after the broadcast
        on_rank_0(fails)
