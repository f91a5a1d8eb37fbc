"""Command-line overrides that stand for more than one key=value: several `checkpoint=` and `checkpoints=GLOB`
become one `checkpoints=[...]` list before the config is merged (loading.load_config). Standard library only."""

from __future__ import annotations

from engine.utils.errors import CT3DError


def ensemble_overrides(overrides: list[str]) -> list[str]:
    """`checkpoint=a checkpoint=b` and `checkpoints=GLOB` (no brackets) -> one `checkpoints=[...]` list of the
    files, sorted per glob; one `checkpoint=` stays as it is."""
    import glob

    def is_glob(o: str) -> bool:
        return o.startswith("checkpoints=") and not o.split("=", 1)[1].startswith("[")

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    patterns = [o.split("=", 1)[1] for o in overrides if is_glob(o)]
    if len(given) < 2 and not patterns:
        return overrides
    files = list(given)
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if not found:
            raise CT3DError(f"config error: checkpoints: {pattern!r} matches no file")
        files += found
    rest = [o for o in overrides if not o.startswith("checkpoint=") and not is_glob(o)]
    return rest + ["checkpoints=[" + ",".join(repr(f) for f in files) + "]"]
