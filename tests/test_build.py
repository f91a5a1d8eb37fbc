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
