"""Builders: precision, inferer, loaders, validation schedule."""

import torch

from engine.build import make_inferer, resolve_amp


def test_mixed_precision_only_on_cuda():
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) is None and resolve_amp("auto", cpu) is None
    net = torch.nn.Linear(2, 1)
    out = make_inferer(cpu, None)(torch.ones(1, 2), net)
    assert out.dtype == torch.float32


def test_bf16_inferer_autocasts_the_forward_pass():
    net = torch.nn.Linear(2, 1)
    assert make_inferer(torch.device("cpu"), torch.bfloat16)(torch.ones(1, 2), net).dtype == torch.bfloat16


def test_validation_loader_gives_every_sample_to_exactly_one_rank_unpadded(monkeypatch):
    import ignite.distributed as idist

    from engine.build import make_loader
    from engine.schema import LoaderConfig

    dataset = [{"image": torch.tensor([float(i)]), "label": torch.tensor([0.0])} for i in range(7)]
    seen = []
    for rank in range(3):
        monkeypatch.setattr(idist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(idist, "get_world_size", lambda: 3)
        loader = make_loader(dataset, LoaderConfig(batch_size=2), torch.device("cpu"))
        seen.append([int(v) for batch in loader for v in batch["image"].flatten()])
    assert sorted(sum(seen, [])) == list(range(7))  # each once: no padding repeats a sample
    assert [len(s) for s in seen] == [3, 2, 2]


def test_trainer_reshuffles_each_epoch_through_monai_and_the_order_depends_on_seed_and_epoch():
    from ignite.engine import Events

    from engine.build import make_loader, make_trainer
    from engine.schema import LoaderConfig, TrainConfig

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
