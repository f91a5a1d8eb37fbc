"""A ct3d config as Kubernetes objects: settings.py (the config as the pods see it, checked), meta.py
(labels), pod.py (the pod template and its security), storage.py (claims, ConfigMap), workloads/ (one module
per kind), render.py (the YAML stream), values.py (the same run as Helm values for charts/ct3d).
May import: engine.config and engine.utils only (import-linter contract)."""
