"""From datalists to batches: datalists and patients, the stable patient-wise split and folds, per-volume
metadata, the demo phantoms, finding and reading volumes, preprocessing, the disk and RAM caches, the checks
before training, and each rank's share and loaders.
May import: engine.config, engine.utils."""

from engine.utils.exports import lazy_exports

# name -> the module that defines it, imported on first use (engine/utils/exports.py says why)
_EXPORTS = {
    "generate": "demo", "phantom": "demo", "Labelled": "cache", "SOURCE": "cache", "build_dataset": "cache",
    "cache_folder": "cache", "source_hash": "cache_keys", "label_frequencies": "datalist", "load_splits": "prepare",
    "loader_workers": "loaders", "make_loader": "loaders", "AntiAliasd": "preprocess",
    "preprocessing_transform": "preprocess",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
