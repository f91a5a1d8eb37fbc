"""Many runs of `workflow.train`: cross-validation (`cv`) and hyper-parameter sweeps (`sweep`, Optuna) with
their summaries and report pages.
May import: engine.training and everything below it; not engine.serving."""
