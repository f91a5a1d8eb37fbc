"""Using a trained model: `evaluate` and `predict` (thresholds, calibration, TTA, ensembles, saliency maps)
and `export` (ONNX, TorchScript) from a checkpoint alone.
May import: engine.training and everything below it; not engine.experiments."""
