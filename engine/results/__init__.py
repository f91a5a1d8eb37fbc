"""What a trained model's outputs mean: metrics, calibration and thresholds, patient-level intervals, the
report and its Grad-CAM panels. Works on tensors and plain arguments, not on a running trainer.
May import: engine.config, engine.utils (never data, training or above)."""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): importing one module of this package, or
# `python -m engine.run --help`, does not import every sibling's torch and MONAI (`import monai` alone is ~6 s)
_EXPORTS = {
    "classification_metrics": "metrics", "grad_cams": "saliency",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
