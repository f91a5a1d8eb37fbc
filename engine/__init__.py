"""ct3d: train 3D CT classifiers with MONAI and Ignite.

The subpackages follow one run's data flow, each importing only the ones below it (import-linter checks
this: pyproject.toml's contracts): utils <- config <- data | results (independent of each other) <- training <-
serving | experiments <- run (the CLI)."""

__version__ = "0.1.0"
