"""Exported models run without ct3d and give PyTorch's outputs; their metadata says how to use them."""

import json

import numpy as np
import pytest
import torch

from engine.config.loading import load_config
from engine.data.demo import LABELS, phantom
from engine.data.preprocess import preprocessing_transform
from engine.serving.commands import export
from engine.serving.inference import checkpoint_preprocessing, load_trained_model
from engine.training.workflow import train
from helpers import tiny_overrides
from volumes import write_nifti


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    tmp = tmp_path_factory.mktemp("export")
    return train(load_config(None, tiny_overrides(tmp, tiny_demo))) / "checkpoints" / "best.pt", tmp


def a_volume(tmp_path, state) -> torch.Tensor:
    """One phantom as the model sees it (after the checkpoint's preprocessing), batch of one."""
    path = write_nifti(tmp_path / "v.nii.gz", phantom(np.random.default_rng(5), (32, 32, 32), (1, 0, 1, 0)))
    item = preprocessing_transform(checkpoint_preprocessing(state))({"image": str(path), "name": "v"})
    return item["image"].float()[None]


def exported(trained, tmp_path, fmt: str):
    """The export command's file for the trained checkpoint, the PyTorch model, and a volume to compare on."""
    checkpoint, _ = trained
    path = export(load_config(None, [f"checkpoint={checkpoint}", f"format={fmt}", f"output.dir={tmp_path}",
                                     f"output.name={fmt}"], command="export"))
    model, state = load_trained_model(str(checkpoint), torch.device("cpu"))
    return path, model, a_volume(tmp_path, state)


def test_onnx_file_matches_pytorch_in_onnxruntime(trained, tmp_path):
    import onnx
    import onnxruntime

    path, model, image = exported(trained, tmp_path, "onnx")
    with torch.no_grad():
        expected = model(image).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})[0]
    assert got.shape == (1, len(LABELS)) and np.abs(got - expected).max() < 1e-4
    twice = session.run(None, {"image": np.concatenate([image.numpy()] * 2)})[0]  # the batch axis is free
    assert twice.shape == (2, len(LABELS))
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["ct3d"])
    assert meta["labels"] == list(LABELS) and meta["task"] == "multilabel"
    assert meta["preprocessing"]["spatial_size"] == [32, 32, 32] and meta["threshold"] == 0.5
    assert meta["thresholds"] == [0.5] * len(LABELS) and meta["calibration"] is None
    assert meta["decision"] == "per label: probability >= its threshold"


def test_multiclass_export_names_arg_max_and_claims_no_threshold(tmp_path):
    """A multiclass checkpoint whose state still holds thresholds (tuned before metrics.threshold_rule was
    refused for multiclass): its ONNX file's metadata says arg-max and carries no threshold."""
    import onnx

    from engine.config.schema import ModelConfig, PreprocessConfig
    from engine.serving.export import ARG_MAX, export_model
    from engine.training.models import create_model

    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.25)
    state = {"labels": ["grade0", "grade1", "grade2"], "task": "multiclass", "threshold": 0.5,
             "calibration": {"thresholds": [0.2, 0.7, 0.4], "temperature": [2.0]}, "model_config": {"name": "resnet3d"},
             "preprocessing": {"spatial_size": [32, 32, 32], "hu_window": PreprocessConfig().hu_window}}
    path = export_model(create_model(config, 3, [32, 32, 32]), state, tmp_path / "model.onnx", "onnx")
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["ct3d"])
    assert meta["task"] == "multiclass" and meta["decision"] == ARG_MAX and "arg-max" in ARG_MAX
    assert "threshold" not in meta and "thresholds" not in meta
    assert meta["calibration"] == {"scale": [0.5], "bias": None}  # the temperature 2 as a scale: still applied


def test_torchscript_file_matches_pytorch(trained, tmp_path):
    path, model, image = exported(trained, tmp_path, "torchscript")
    extra = {"ct3d.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        assert (scripted(image) - model(image)).abs().max() < 1e-4
    assert json.loads(extra["ct3d.json"])["labels"] == list(LABELS)


def test_pretrained_weights_load_by_name_and_shape_and_report_counts(tmp_path, caplog):
    import logging

    from engine.config.schema import ModelConfig
    from engine.training.models import create_model, load_pretrained

    caplog.set_level(logging.INFO, logger="ct3d")  # whatever ran before in this process

    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.25)
    source = create_model(config, 4, [32, 32, 32])
    weights = {f"module.{k}": v for k, v in source.state_dict().items()}  # as MedicalNet saves them
    weights["module.extra.weight"] = torch.ones(3)
    torch.save({"state_dict": weights}, tmp_path / "medicalnet.pth")
    target = create_model(config, 2, [32, 32, 32])  # another head: fc cannot load
    report = load_pretrained(target, str(tmp_path / "medicalnet.pth"))
    total = len(source.state_dict())
    assert len(report["loaded"]) == total - 2 and sorted(report["new"]) == ["fc.bias", "fc.weight"]
    assert sorted(report["skipped"]) == ["extra.weight", "fc.bias", "fc.weight"]
    assert torch.equal(target.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert f"{total - 2} tensors loaded, 3 skipped" in caplog.text


def test_head_only_epochs_leave_the_backbone_unchanged(trained, tmp_path, tiny_demo):
    checkpoint, _ = trained
    start = torch.load(checkpoint, weights_only=True)["model"]
    runs = {}
    for epochs in (1, 2):
        folder = train(load_config(None, tiny_overrides(
            tmp_path, tiny_demo, f"model.pretrained={checkpoint}", "train.freeze_epochs=1", f"train.epochs={epochs}",
            f"output.name=freeze{epochs}", "train.lr=0.01")))
        runs[epochs] = torch.load(folder / "checkpoints" / "final.pt", weights_only=True)["model"]
    backbone = [k for k in start if not k.startswith("fc.") and "num_batches_tracked" not in k]
    assert all(torch.equal(runs[1][k], start[k]) for k in backbone)  # weights and BatchNorm statistics
    assert not torch.equal(runs[1]["fc.weight"], start["fc.weight"])  # the head learned
    assert not all(torch.equal(runs[2][k], start[k]) for k in backbone)  # epoch 2 trains everything
