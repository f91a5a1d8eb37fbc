"""No silent partial load: weights for another network through model.pretrained stop the run with the counts
(exit 2), instead of a run that trains from scratch after one INFO line."""

import torch
from monai.networks import nets

from helpers import cli, tiny_overrides

MERLIN_PREFIX = "encode_image.i3_resnet."  # Merlin's image encoder keys (its text side and heads beside them)


def small_resnet(depth: str, outputs: int = 4) -> torch.nn.Module:
    """MONAI's 3D ResNet as the tiny runs build it (widen 0.25, 7^3 stem), straight from MONAI."""
    return getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, num_classes=outputs,
                                           conv1_t_size=7, conv1_t_stride=2, widen_factor=0.25)


def test_a_merlin_layout_file_into_a_plain_resnet_is_refused_naming_the_counts(tmp_path, tiny_demo):
    encoder = small_resnet("10").state_dict()
    upstream = {MERLIN_PREFIX + k: v for k, v in encoder.items()}
    upstream.update({"encode_text.embeddings.weight": torch.zeros(8, 4), "logit_scale": torch.tensor(1.0),
                     "classifier.weight": torch.zeros(2, 4), "contrastive_head.weight": torch.zeros(4, 4)})
    path = tmp_path / "merlin.pt"
    torch.save(upstream, path)
    backbone = [k for k in encoder if not k.startswith("fc.") and "num_batches_tracked" not in k]  # what counts
    proc = cli(*tiny_overrides(tmp_path, tiny_demo, "model.variant=10", f"model.pretrained={path}"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"filled 0 of the {len(backbone)} backbone tensors" in proc.stderr
    assert MERLIN_PREFIX + "conv1.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing trained


def test_a_partial_match_needs_the_threshold_lowered_and_a_full_backbone_loads(tmp_path, tiny_demo):
    """A ResNet-10 file into a ResNet-18 fills its stem and the first block of each stage (same names and shapes),
    short of 90%; at pretrained_min_loaded=0 it loads what matches. A file of the same network with another head
    fills the whole backbone."""
    from engine.config.schema import ModelConfig
    from engine.training.models import HEADS, create_model, load_pretrained
    from engine.utils.errors import CT3DError

    ten, eighteen = small_resnet("10").state_dict(), small_resnet("18").state_dict()
    torch.save(ten, tmp_path / "r10.pt")
    counted = [k for k in eighteen if not k.startswith("fc.") and "num_batches_tracked" not in k]
    matching = [k for k in counted if k in ten and ten[k].shape == eighteen[k].shape]
    backbone = counted
    assert 0 < len(matching) < 0.9 * len(backbone)  # the case this test is about
    net = create_model(ModelConfig(variant="18", widen_factor=0.25), 4, [32, 32, 32])
    try:
        load_pretrained(net, str(tmp_path / "r10.pt"), HEADS["resnet3d"], 0.9)
        raise AssertionError("a partial load passed")
    except CT3DError as exc:
        assert f"filled {len(matching)} of the {len(backbone)} backbone tensors" in str(exc)
    report = load_pretrained(net, str(tmp_path / "r10.pt"), HEADS["resnet3d"], 0.0)
    assert sorted(k for k in report["loaded"] if k in counted) == sorted(matching)
    torch.save(small_resnet("18", outputs=7).state_dict(), tmp_path / "r18.pt")  # another head: fc cannot load
    report = load_pretrained(net, str(tmp_path / "r18.pt"), HEADS["resnet3d"], 1.0)
    assert sorted(report["new"]) == ["fc.bias", "fc.weight"]
