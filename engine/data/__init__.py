"""From datalists to batches: datalists and patients, the stable patient-wise split and folds, per-volume
metadata, the demo phantoms, finding and reading volumes, preprocessing, the disk and RAM caches, the checks
before training, and each rank's share and loaders.
May import: engine.config, engine.utils."""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): importing one module of this package, or
# `python -m engine.run --help`, does not import every sibling's torch and MONAI (`import monai` alone is ~6 s)
_EXPORTS = {
    "generate": "demo", "phantom": "demo", "Labelled": "cache", "SOURCE": "cache", "build_dataset": "cache",
    "cache_folder": "cache", "source_hash": "cache_keys", "label_frequencies": "datalist", "load_splits": "prepare",
    "loader_workers": "loaders", "make_loader": "loaders", "AntiAliasd": "preprocess",
    "preprocessing_transform": "preprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
