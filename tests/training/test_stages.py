"""Partial fine-tuning of a pretrained encoder: only its last model.train_stages stages learn (the earlier ones as
loaded, BatchNorm statistics included), at model.encoder_lr while the head learns at train.lr."""

import pytest
import torch

from engine.config.loading import load_config
from engine.config.schema import TrainConfig
from engine.training.build import make_optimization
from engine.training.encoders import EncoderClassifier, MerlinEncoder
from engine.utils.errors import CT3DError


def step(net: EncoderClassifier, optimizer) -> None:
    net.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(torch.randn(2, 1, 24, 20, 16)),
                                                                torch.ones(2, 3))
    loss.backward()
    optimizer.step()


def test_only_the_last_stages_learn_and_the_rest_keep_their_weights_and_statistics():
    torch.manual_seed(0)
    net = EncoderClassifier(MerlinEncoder(), 3, "linear", 0.0, freeze=False, train_stages=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, optimizer, _ = make_optimization(net, TrainConfig(lr=1e-2, warmup_epochs=0), 10, encoder_lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in net.encoder.parameters()}
    step(net, optimizer)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing learned"
    assert all(k.startswith(("encoder.i3_resnet.layer4.", "head.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("encoder.i3_resnet.layer4.") and k.endswith("running_mean") for k in changed)
    assert not net.encoder.i3_resnet.layer3.training and net.encoder.i3_resnet.layer4.training
    assert not net.encoder.i3_resnet.bn1.training  # the stem stays as loaded


def test_train_stages_is_for_an_unfrozen_encoder_with_that_many_stages():
    with pytest.raises(CT3DError, match="model.train_stages"):
        load_config(None, ["data.demo.enabled=true", "model.name=ctfm", "model.preprocess_check=false",
                           "model.freeze=true", "model.train_stages=1"])
    with pytest.raises(CT3DError, match="model.train_stages"):
        load_config(None, ["data.demo.enabled=true", "model.train_stages=1"])
    with pytest.raises(CT3DError, match="4 stages"):
        EncoderClassifier(MerlinEncoder(), 3, "linear", 0.0, freeze=False, train_stages=5)


def test_freeze_epochs_then_gives_back_the_stages_train_stages_chose():
    from ignite.engine import Engine, Events

    from engine.config.schema import ModelConfig
    from engine.training.models import FreezeBackbone

    net = EncoderClassifier(MerlinEncoder(), 3, "linear", 0.0, freeze=False, train_stages=1)
    freeze = FreezeBackbone(net, ModelConfig(name="merlin"), epochs=1)
    trainer = Engine(lambda e, b: None)
    freeze.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(
        (any(p.requires_grad for p in net.encoder.parameters()),
         all(p.requires_grad for p in net.encoder.i3_resnet.layer4.parameters()),
         any(p.requires_grad for p in net.encoder.i3_resnet.layer3.parameters()))))
    trainer.run([0], max_epochs=2)
    assert seen == [(False, False, False), (True, True, False)]  # epoch 2: layer4 learns, layer3 stays as loaded


def test_a_frozen_encoder_keeps_its_batchnorm_statistics_in_training_mode():
    torch.manual_seed(0)
    net = EncoderClassifier(MerlinEncoder(), 3, "linear", 0.0, freeze=True)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    _, optimizer, _ = make_optimization(net, TrainConfig(lr=1e-2, warmup_epochs=0), 10)
    step(net, optimizer)
    assert net.training and net.head.training and not net.encoder.training
    assert all(torch.equal(before[k], v) for k, v in net.encoder.state_dict().items())
