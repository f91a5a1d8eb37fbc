"""What a trained model's outputs mean: metrics, calibration and thresholds, patient-level intervals, the
report and its Grad-CAM panels. Works on tensors and plain arguments, not on a running trainer.
May import: engine.config, engine.utils (never data, training or above)."""
