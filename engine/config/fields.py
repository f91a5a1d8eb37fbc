"""How a setting is declared: `setting(default, ge=, le=, length=, pattern=)` puts its limits beside it (the
loader checks them), and `choice` makes a setting's accepted words an Enum that OmegaConf validates.
Standard library only."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """A setting's accepted words; compares equal to (and prints as) its word."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choice(name: str, *words: str) -> Any:
    return Choice(name, [(w, w) for w in words])


DNS_LABEL = (r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", "is not a DNS-1123 label (lower case letters, digits and '-', "
             "starting and ending with a letter or digit, at most 63 characters)")
QUANTITY = (r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?", "is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            length: int | None = None, pattern: tuple[str, str] | None = None) -> Any:
    """A field with its limits: `ge`/`gt`/`le` bound a number (or every number of a list), `length` a
    list's size, `pattern` (regex, what a mismatch is) a non-empty string. `load_config` checks them all."""
    limits = {k: v for k, v in dict(ge=ge, gt=gt, le=le, length=length, pattern=pattern).items() if v is not None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=limits)
    return field(default=default, metadata=limits)


PROBABILITY = dict(ge=0.0, le=1.0)
