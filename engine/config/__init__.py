"""Settings: the typed schema (every setting declared once, with its limits), loading a config from YAML and
`key=value` overrides with every limit checked, and the sweep's search space checked the same way.
May import: engine.utils."""

from engine.utils.exports import lazy_exports

# name -> the module that defines it, imported on first use (PEP 562), as in engine.data: importing the schema
# alone (a data loader's worker, the benchmark's pipeline child) does not import omegaconf (~2.5 MB, ~0.2 s)
_EXPORTS = {
    "K8sConfig": "cluster", "VolumeClaimConfig": "cluster", "DEFAULT_CONFIG": "loading", "SECRET_KEYS": "loading",
    "load_config": "loading", "plain": "loading", "to_yaml": "loading", "AugmentConfig": "schema", "Config": "schema",
    "LoaderConfig": "schema", "ModelConfig": "schema", "PreprocessConfig": "schema", "check_space": "space",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
