"""Pretrained CT encoders (Merlin, CT-FM) from their published layouts, written here with random weights: the
upstream key names, Merlin's three-channel stem, CT-FM's config.json and safetensors; trained frozen and
unfrozen on the phantoms with the weights' SHA-256 recorded; refusals for wrong preprocessing and missing files."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.config.loading import load_config
from engine.serving.inference import load_trained_model
from engine.training.encoders import MERLIN_FILE, MERLIN_PREFIX, CtfmEncoder, MerlinEncoder, load_encoder
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides

SMALL_CTFM = {"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 2]}


# Merlin's published checkpoint's key names and shapes, taken from its upstream code (the file's "source" says how),
# not from our MerlinEncoder: a MONAI rename or reshaping of a layer then fails here instead of loading nothing
MERLIN_KEYS = json.loads((Path(__file__).parent / "merlin_keys.json").read_text())


def upstream_tensor(key: str, shape: list[int]) -> torch.Tensor:
    """Random values for one of Merlin's keys, each its own: convolutions at He scale by fan-out (torchvision's
    initialisation), BatchNorm weights and statistics near 1 and 0, so 152 layers' activations stay finite."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000)
    if key.endswith("running_var"):
        return 1 + 0.1 * torch.rand(shape)
    if len(shape) == 5:
        return torch.randn(shape) * math.sqrt(2 / (shape[0] * math.prod(shape[2:])))
    if len(shape) == 1 and key.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape)
    return 0.1 * torch.randn(shape) if len(shape) < 2 else 0.02 * torch.randn(shape)


def merlin_upstream(folder, seed: int = 0) -> dict:
    """A Merlin-layout file of random weights: every key merlin_keys.json lists (the image encoder with its
    three-channel stem, the heads, the text side's projection and logit_scale) and a stand-in for the text
    encoder's (Clinical-Longformer's) many tensors."""
    torch.manual_seed(seed)
    listed = {**MERLIN_KEYS["encoder"], **MERLIN_KEYS["heads"], **MERLIN_KEYS["text"]}
    state = {key: upstream_tensor(key, shape) for key, shape in listed.items()}
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    torch.save(state, folder / MERLIN_FILE)
    return state


def ctfm_upstream(folder, seed: int = 0) -> dict:
    """CT-FM's folder as save_pretrained writes it: config.json and model.safetensors (the encoder's own keys)."""
    torch.manual_seed(seed)
    state = CtfmEncoder(SMALL_CTFM).encoder.state_dict()
    (folder / "config.json").write_text(json.dumps(SMALL_CTFM))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return state


@pytest.fixture(scope="module")
def merlin_folder(tmp_path_factory):
    """One Merlin-layout file for the module (a ResNet-152: seconds to make and write)."""
    folder = tmp_path_factory.mktemp("merlin")
    return folder, merlin_upstream(folder)


def test_every_published_merlin_encoder_key_loads_into_ours_by_name_and_shape(merlin_folder):
    folder, upstream = merlin_folder
    encoder = MerlinEncoder()
    load_encoder(encoder, "merlin", folder / MERLIN_FILE)
    ours, listed = encoder.state_dict(), MERLIN_KEYS["encoder"]
    assert len(listed) == len(ours) == 930  # 155 convolutions (a weight each), 155 BatchNorms (5 tensors each)
    stem = MERLIN_PREFIX + "conv1.weight"
    for key, shape in listed.items():
        mine = ours["i3_resnet." + key.removeprefix(MERLIN_PREFIX)]
        if key == stem:  # the three grey channels in, summed into our one
            assert shape == [64, 3, 3, 7, 7] and torch.equal(mine, upstream[key].sum(1, keepdim=True))
        else:
            assert list(mine.shape) == shape and torch.equal(mine, upstream[key]), key


def test_merlins_stem_sums_its_three_grey_channels_and_gives_the_upstream_first_layer(merlin_folder):
    folder, upstream = merlin_folder
    encoder = MerlinEncoder()
    load_encoder(encoder, "merlin", folder / MERLIN_FILE)
    x = torch.randn(1, 1, 12, 10, 8)  # (B, 1, x, y, z)
    seen = x.permute(0, 1, 4, 2, 3)  # Merlin's I3ResNet: (B, 1, z, x, y), the grey channel three times
    three = torch.nn.functional.conv3d(torch.cat([seen] * 3, 1), upstream[MERLIN_PREFIX + "conv1.weight"],
                                       stride=(1, 2, 2), padding=(1, 3, 3))
    ours = encoder.i3_resnet.conv1(seen)
    assert torch.allclose(ours, three, atol=1e-5)
    assert torch.equal(encoder.state_dict()["i3_resnet.layer4.2.conv3.weight"],
                       upstream[MERLIN_PREFIX + "layer4.2.conv3.weight"])


def test_merlins_forward_is_i3resnets_on_the_permuted_volume_fed_three_times(merlin_folder):
    """The whole encoder against Merlin's I3ResNet order of work, written out here: the volume (B, 1, x, y, z)
    permuted to (B, 1, z, x, y), the grey channel stacked three times into the three-channel stem, then the
    blocks and the global average pool; on a volume whose three sides differ, so a wrong permutation shows."""
    folder, upstream = merlin_folder
    encoder = MerlinEncoder().eval()
    load_encoder(encoder, "merlin", folder / MERLIN_FILE)
    net = encoder.i3_resnet
    x = torch.randn(1, 1, 20, 16, 12)
    with torch.no_grad():
        seen = torch.cat([x.permute(0, 1, 4, 2, 3)] * 3, 1)
        h = torch.nn.functional.conv3d(seen, upstream[MERLIN_PREFIX + "conv1.weight"], stride=(1, 2, 2),
                                       padding=(1, 3, 3))
        h = net.maxpool(net.act(net.bn1(h)))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
        reference = h.mean(dim=(2, 3, 4))
        ours = encoder(x)
    assert ours.shape == (1, 2048) and ((ours - reference).abs().max() / reference.abs().max()) < 1e-5


def test_a_file_missing_encoder_tensors_is_refused_naming_them(tmp_path):
    upstream = ctfm_upstream(tmp_path)
    del upstream["layers.1.blocks.0.conv1.weight"]
    save_file({k: v.contiguous() for k, v in upstream.items()}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CT3DError, match="missing: encoder.layers.1.blocks.0.conv1.weight"):
        load_encoder(CtfmEncoder(SMALL_CTFM), "ctfm", tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name", ["ctfm", "merlin"])
def test_an_encoder_trains_frozen_and_unfrozen_from_its_published_layout(tmp_path, tiny_demo, name, request):
    if name == "ctfm":
        weights = tmp_path / "weights"
        weights.mkdir()
        upstream = ctfm_upstream(weights)
    else:
        weights, upstream = request.getfixturevalue("merlin_folder")
    file = weights / ("model.safetensors" if name == "ctfm" else MERLIN_FILE)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    finals = {}
    for freeze in (True, False):  # Merlin unfrozen: ~15 s and 1.4 GB of checkpoints (ResNet-152, AdamW's state)
        folder = train(load_config(None, tiny_overrides(
            tmp_path, tiny_demo, f"model.name={name}", f"model.weights={weights}", "model.preprocess_check=false",
            f"model.freeze={str(freeze).lower()}", "train.epochs=1", "loader.batch_size=6", "data.val_fraction=0.5",
            "preprocess.spatial_size=[16,16,16]", "metrics.bootstrap=0", f"output.name={name}-{freeze}")))
        final = torch.load(folder / "checkpoints" / "final.pt", weights_only=True)
        summary = json.loads((folder / "summary.json").read_text())
        assert final["encoder"]["sha256"] == summary["encoder"]["sha256"] == digest
        finals[freeze] = final["model"]
        if freeze:  # the checkpoint holds the head alone; serving loads the encoder again from its weights file
            assert not any(k.startswith("encoder.") for k in final["model"])
            model, _ = load_trained_model(str(folder / "checkpoints" / "final.pt"), torch.device("cpu"))
            finals[freeze] = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    if name == "ctfm":  # serving rebuilds the encoder from the checkpoint's record, without the weights folder
        for path in weights.iterdir():
            path.unlink()
        model, _ = load_trained_model(str(folder / "checkpoints" / "final.pt"), torch.device("cpu"))
        assert all(torch.equal(model.state_dict()[k], finals[False][k]) for k in finals[False])
    key = "encoder.encoder.conv_init.weight" if name == "ctfm" else "encoder.i3_resnet.layer1.0.bn1.running_mean"
    start = upstream["conv_init.weight"] if name == "ctfm" else upstream[MERLIN_PREFIX + "layer1.0.bn1.running_mean"]
    assert torch.equal(finals[True][key], start)  # frozen: weights and BatchNorm statistics as loaded
    assert not torch.equal(finals[False][key], start)  # unfrozen: the encoder trained too


def test_preprocessing_other_than_the_encoders_is_refused_naming_key_value_and_expected():
    with pytest.raises(CT3DError, match=r"preprocess.spacing: None differs from .*merlin.*\[1.5, 1.5, 3.0\]"):
        load_config(None, ["data.demo.enabled=true", "model.name=merlin"])
    cfg = load_config(None, ["data.demo.enabled=true", "model.name=merlin", "model.preprocess_check=false"])
    assert cfg.model.preprocess_check is False  # allowed, and config.yaml records it


def test_missing_weights_name_the_file_and_how_to_fetch_it(tmp_path):
    from engine.training.encoders import weights_file

    with pytest.raises(CT3DError, match="hf download stanfordmimi/Merlin"):
        weights_file("merlin", str(tmp_path))


@pytest.mark.parametrize("name, spacing, window, size", [
    ("merlin", [1.5, 1.5, 3.0], [-1000.0, 1000.0], [224, 224, 160]),  # Merlin's published transforms
    ("ctfm", [1.0, 1.0, 1.0], [-1024.0, 2048.0], [320, 320, 320]),  # CT-FM's linear probe
])
def test_the_shipped_ct_rate_configs_preprocess_as_their_encoders_were_trained(name, spacing, window, size):
    from helpers import ROOT

    cfg = load_config(ROOT / "configs" / f"ct-rate-{name}.yaml", [])  # preprocess_check on: a mismatch stops here
    assert cfg.model.name == name and cfg.model.preprocess_check and cfg.model.freeze
    assert (cfg.preprocess.spacing, cfg.preprocess.hu_window, cfg.preprocess.spatial_size) == (spacing, window, size)
    assert list(cfg.preprocess.scale_range) == [0.0, 1.0] and cfg.preprocess.resize == "crop_pad"


def test_freeze_is_for_an_encoder_and_not_with_freeze_epochs():
    with pytest.raises(CT3DError, match="train.freeze_epochs.*set one"):
        load_config(None, ["data.demo.enabled=true", "model.name=ctfm", "model.preprocess_check=false",
                           "model.freeze=true", "train.freeze_epochs=2"])
    with pytest.raises(CT3DError, match="model.freeze.*resnet3d"):
        load_config(None, ["data.demo.enabled=true", "model.freeze=true"])
