"""`export`: a trained network as an ONNX or TorchScript file that runs without ct3d, carrying its labels,
task, decision (thresholds; arg-max for multiclass) and preprocessing as metadata (ONNX `metadata_props` key
`ct3d`; TorchScript extra file `ct3d.json`). MONAI's converters do the work and check the file against PyTorch
on a volume."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from monai.networks.utils import convert_to_onnx, convert_to_torchscript

from engine.serving.inference import decision_settings
from engine.utils.io import atomic_write

METADATA_KEY = "ct3d"


ARG_MAX = "arg-max: the class of highest probability, no threshold"


def model_metadata(state: dict) -> dict:
    """What a program needs beside the weights: outputs in order, how to read them (the decision: per-label
    thresholds, or arg-max for multiclass, which has none; the calibration's scale and bias per label, or null),
    how to preprocess."""
    thresholds, calibration = decision_settings(state)
    decision = ({"decision": ARG_MAX} if state["task"] == "multiclass" else
                {"decision": "per label: probability >= its threshold", "threshold": state["threshold"],
                 "thresholds": thresholds})
    return {"labels": state["labels"], "task": state["task"], **decision, "calibration": calibration,
            "preprocessing": state["preprocessing"], "model": state["model_config"],
            "input": "float32 (batch, 1, *preprocessing.spatial_size) after the preprocessing; output: logits "
                     "(probability: sigmoid(logits * calibration.scale + calibration.bias) per label, "
                     "softmax(logits * scale) for multiclass; the logits as they are when calibration is null)"}


def export_model(model: torch.nn.Module, state: dict, path: Path, fmt: str) -> Path:
    """Writes `model` to `path` (atomically) as `fmt` and verifies it reproduces PyTorch within 1e-4."""
    example = torch.randn(2, 1, *state["preprocessing"]["spatial_size"])
    metadata = json.dumps(model_metadata(state))
    with atomic_write(path) as tmp:
        if fmt == "onnx":
            exported = convert_to_onnx(
                model.cpu().eval(), [example], input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, filename=str(tmp), verify=True,
                device=torch.device("cpu"), use_ort=True, rtol=1e-4, atol=1e-4, opset_version=17,
                dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, dynamic batch axis kept
            )
            exported.metadata_props.add(key=METADATA_KEY, value=metadata)
            onnx.save(exported, str(tmp))
        else:
            convert_to_torchscript(model.cpu().eval(), str(tmp), extra_files={f"{METADATA_KEY}.json": metadata},
                                   verify=True, inputs=[example], device=torch.device("cpu"), rtol=1e-4,
                                   atol=1e-4, use_trace=True)
    return path
