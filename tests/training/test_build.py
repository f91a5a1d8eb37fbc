"""Builders: precision, inferer, loaders, validation schedule, torch set-up."""

import os

import pytest
import torch

from engine.training.build import make_inferer, resolve_amp


def test_mixed_precision_only_on_cuda():
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) is None and resolve_amp("auto", cpu) is None
    net = torch.nn.Linear(2, 1)
    out = make_inferer(cpu, None)(torch.ones(1, 2), net)
    assert out.dtype == torch.float32


def test_bf16_inferer_autocasts_the_forward_pass():
    net = torch.nn.Linear(2, 1)
    assert make_inferer(torch.device("cpu"), torch.bfloat16)(torch.ones(1, 2), net).dtype == torch.bfloat16


def test_trainer_reshuffles_each_epoch_through_monai_and_the_order_depends_on_seed_and_epoch():
    from ignite.engine import Events

    from engine.config.schema import LoaderConfig, TrainConfig
    from engine.data.loaders import make_loader
    from engine.training.build import make_trainer

    dataset = [{"image": torch.full((1, 2), float(i)), "label": torch.zeros(1)} for i in range(8)]

    def orders(seed: int) -> list[list[int]]:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 1))
        loader = make_loader(dataset, LoaderConfig(batch_size=8), torch.device("cpu"), shuffle_seed=seed)
        trainer = make_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), loader,
                               torch.device("cpu"), None, TrainConfig(epochs=2))
        seen = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: seen.append([int(v) for v in e.state.batch["image"][:, 0, 0]]))
        trainer.run()
        return seen

    first = orders(0)
    assert first[0] != first[1] and sorted(first[0]) == list(range(8))  # MONAI sets the sampler's epoch
    assert orders(0) == first and orders(1) != first


def test_cudnn_autotunes_unless_deterministic_and_missing_kernels_only_warn(monkeypatch):
    from engine.config.schema import TrainConfig
    from engine.training.build import setup_torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        setup_torch(TrainConfig(deterministic=False))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        setup_torch(TrainConfig(deterministic=True))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False


def test_each_rank_draws_its_own_random_numbers():
    from engine.config.schema import TrainConfig
    from engine.training.build import setup_torch

    draws = []
    for rank in (0, 1, 0):
        setup_torch(TrainConfig(seed=3), rank)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_accumulation_micro_steps_run_under_no_sync():
    import contextlib

    from ignite.engine import Events

    from engine.config.schema import LoaderConfig, TrainConfig
    from engine.data.loaders import make_loader
    from engine.training.build import make_trainer

    class Counting(torch.nn.Sequential):  # as DDP: no_sync() skips the gradient all-reduce
        quiet: list = []

        @contextlib.contextmanager
        def no_sync(self):
            self.quiet.append(True)
            yield

    net = Counting(torch.nn.Flatten(), torch.nn.Linear(2, 1))
    dataset = [{"image": torch.full((1, 2), float(i)), "label": torch.zeros(1)} for i in range(5)]
    loader = make_loader(dataset, LoaderConfig(batch_size=1), torch.device("cpu"), shuffle_seed=0)
    trainer = make_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), loader,
                           torch.device("cpu"), None, TrainConfig(epochs=1, accumulation_steps=2))
    quiet_at = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: Counting.quiet.clear())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: quiet_at.append(bool(Counting.quiet)))
    trainer.run()
    assert quiet_at == [True, False, True, False, False]  # the epoch's last batch steps: never quiet


def test_sync_batchnorm_needs_cuda_under_torchrun(monkeypatch):
    import ignite.distributed as idist

    from engine.config.schema import TrainConfig
    from engine.training.build import make_optimization
    from engine.utils.errors import CT3DError

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    make_optimization(net, TrainConfig(sync_bn=True), 4)  # one process: plain BatchNorm, nothing to sync
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    with pytest.raises(CT3DError, match="train.sync_bn"):
        make_optimization(net, TrainConfig(sync_bn=True), 4)


@pytest.mark.parametrize("setting, cpu_layout", [("auto", True), ("on", True), ("off", False)])
def test_model_channels_last_sets_the_3d_weights_layout(setting, cpu_layout):
    import torch

    from engine.config.schema import ModelConfig
    from engine.training.build import make_network

    model = ModelConfig(variant="10", widen_factor=0.25, channels_last=setting)
    net = make_network(model, 2, [16, 16, 16], torch.device("cpu"))
    weight = net.layer1[0].conv1.weight  # more than one input channel: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) == cpu_layout


def test_train_compile_trains_through_torch_compile(tmp_path, tiny_demo, monkeypatch):
    """MONAI's trainer compiles the network; here with TorchDynamo's eager backend (the default, inductor, spends
    a minute compiling on a CPU): the step runs through torch.compile, and the checkpoint holds the plain network."""
    import torch

    from engine.config.loading import load_config
    from engine.training.workflow import train
    from helpers import tiny_overrides

    compiled = []
    real = torch.compile

    def eager(model, **kwargs):
        compiled.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager)
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.compile=true", "metrics.bootstrap=0")))
    assert compiled == ["ResNet"]
    state = torch.load(folder / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert "conv1.weight" in state and not any(k.startswith("_orig_mod") for k in state)
