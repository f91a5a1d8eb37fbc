"""What a trained model's outputs mean: metrics, calibration and thresholds, patient-level intervals, the
report and its Grad-CAM panels. Works on tensors and plain arguments, not on a running trainer.
May import: engine.config, engine.utils (never data, training or above)."""

from engine.utils.exports import lazy_exports

# name -> the module that defines it, imported on first use (engine/utils/exports.py says why)
_EXPORTS = {
    "classification_metrics": "metrics", "grad_cams": "saliency",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
