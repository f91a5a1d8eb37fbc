"""Kubernetes manifests for ct3d training jobs, rendered from a ct3d config."""
