"""From datalists to batches: datalists and patients, the stable patient-wise split and folds, per-volume
metadata, the demo phantoms, finding and reading volumes, preprocessing, the disk and RAM caches, the checks
before training, and each rank's share and loaders.
May import: engine.config, engine.utils."""
