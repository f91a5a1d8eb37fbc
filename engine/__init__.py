"""ct3d: train 3D CT classifiers with MONAI and Ignite."""

__version__ = "0.1.0"
