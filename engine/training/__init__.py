"""One training run: the builders of its parts (network, loss, optimizer, MONAI trainer and evaluator),
the Ignite handlers (augmentation on the device, metrics, checkpoints and exact resume, SIGTERM, W&B), the
wiring (`workflow.train`) and the closing outputs.
May import: engine.results, engine.data, engine.config, engine.utils."""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): importing one module of this package, or
# `python -m engine.run --help`, does not import every sibling's torch and MONAI (`import monai` alone is ~6 s)
_EXPORTS = {
    "DeviceAugmentation": "augment", "make_loss": "build", "to_device": "build", "save_checkpoint": "checkpoint",
    "create_model": "models", "init_process_group": "ranks", "train": "workflow",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
