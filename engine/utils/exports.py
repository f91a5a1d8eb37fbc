"""A package's public names imported on first use (PEP 562): importing one module of a package, or
`python -m engine.run --help`, does not import every sibling's torch and MONAI (`import monai` alone is ~6 s)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The module `__getattr__` and `__dir__` of `package` for `exports` (name -> the submodule defining it);
    a name once looked up is kept in the package's `namespace`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
