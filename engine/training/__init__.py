"""One training run: the builders of its parts (network, loss, optimizer, MONAI trainer and evaluator),
the Ignite handlers (augmentation on the device, metrics, checkpoints and exact resume, SIGTERM, W&B), the
wiring (`workflow.train`) and the closing outputs.
May import: engine.results, engine.data, engine.config, engine.utils."""

from engine.utils.exports import lazy_exports

# name -> the module that defines it, imported on first use (engine/utils/exports.py says why)
_EXPORTS = {
    "DeviceAugmentation": "augment", "make_loss": "build", "to_device": "build", "save_checkpoint": "checkpoint",
    "Embedded": "embeddings", "create_model": "models", "init_process_group": "ranks", "train": "workflow",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
