"""One training run: the builders of its parts (network, loss, optimizer, MONAI trainer and evaluator),
the Ignite handlers (augmentation on the device, metrics, checkpoints and exact resume, SIGTERM, W&B), the
wiring (`workflow.train`) and the closing outputs.
May import: engine.results, engine.data, engine.config, engine.utils."""
