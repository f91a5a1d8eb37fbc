"""Loading a config: schema (engine/schema.py) <- YAML file <- `key=value` overrides, every limit
checked with the key's full name; and writing one back (YAML, checkpoint dicts) with secrets blanked.
Imports only the standard library and OmegaConf, so `--help` and config errors stay fast."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config import metric_registry
from engine.config.overrides import ensemble_overrides
from engine.config.schema import ENCODER_PREPROCESSING, MODEL_VARIANTS, Config
from engine.config.scoring import Mode
from engine.utils.errors import CT3DError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"  # the demo; configs/default.yaml links here
SECRET_KEYS = ("api_key", "password", "token")  # keys whose values never reach a saved config


def _error(key: str, message: str) -> CT3DError:
    return CT3DError(f"config error: {key}: {message}")


def _accepted_keys(full_key: str) -> str:
    """The keys valid beside `full_key`, for the error message."""
    node: Any = Config()
    for part in full_key.split(".")[:-1]:
        node = getattr(node, part, None)
    keys = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return ", ".join(keys) if keys else "no such section"


def _translate(exc: OmegaConfBaseException) -> CT3DError:
    full_key = getattr(exc, "full_key", "") or "?"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first_line or "Key '" in first_line and "not" in first_line:
        return _error(full_key, f"unknown key; accepted here: {_accepted_keys(full_key)}")
    return _error(full_key, first_line)


def _check_limits(node: Any, prefix: str = "") -> None:
    """Every field's limits (see `setting`), named by the field's full key."""
    for f in dataclasses.fields(node):
        key, value, limit = f"{prefix}{f.name}", getattr(node, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            _check_limits(value, f"{key}.")
            continue
        numbers = value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):  # NaN passes every comparison
            raise _error(key, f"must be a finite number, got {value}")
        if value is None or not limit:
            continue
        if "length" in limit and len(value) != limit["length"]:
            raise _error(key, f"needs {limit['length']} values, got {list(value)}")
        for v in value if isinstance(value, list) else [value]:
            low = "ge" in limit and v < limit["ge"] or "gt" in limit and v <= limit["gt"]
            if low or "le" in limit and v > limit["le"]:
                bounds = [f"{op} {limit[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if k in limit]
                raise _error(key, f"must be {' and '.join(bounds)}, got {value}")
            if "pattern" in limit and v and not re.fullmatch(limit["pattern"][0], str(v)):
                raise _error(key, f"{v!r} {limit['pattern'][1]}")


def _check_together(cfg: Config, command: str) -> None:
    """Limits that involve two settings, and settings normalised for the code that reads them."""
    name = str(cfg.model.name)
    cfg.model.variant = str(cfg.model.variant or MODEL_VARIANTS[name][0])
    if cfg.model.variant not in MODEL_VARIANTS[name]:
        raise _error("model.variant",
                     f"{cfg.model.variant!r} is not one of {name}'s: {', '.join(MODEL_VARIANTS[name])}")
    if cfg.model.train_stages and (cfg.model.freeze or name not in ENCODER_PREPROCESSING):
        raise _error("model.train_stages", "fine-tunes the last stages of a pretrained encoder (merlin, ctfm) that "
                                           "model.freeze does not freeze")
    if cfg.model.freeze and cfg.train.freeze_epochs:
        raise _error("train.freeze_epochs", "model.freeze keeps the encoder frozen for the whole run; "
                                            "train.freeze_epochs unfreezes it after N epochs: set one of them")
    if cfg.model.freeze and name not in ENCODER_PREPROCESSING:
        raise _error("model.freeze", f"freezes a pretrained encoder (merlin, ctfm); for {name}, "
                                     f"train.freeze_epochs trains the head alone for the first epochs")
    serving = command in ("evaluate", "predict", "export")  # the checkpoint names the model; weights: its encoder's
    if cfg.model.weights and name not in ENCODER_PREPROCESSING and not serving:
        raise _error("model.weights", f"a pretrained encoder's published weights (merlin, ctfm); for {name}, "
                                      f"model.pretrained")
    if cfg.model.weights and cfg.model.pretrained:
        raise _error("model.pretrained", "model.weights already starts the encoder: one source of weights, so the "
                                         "recorded SHA-256 is the one trained from")
    expected = ENCODER_PREPROCESSING.get(name)
    if expected and cfg.model.preprocess_check:
        for key, value in expected.items():
            have = getattr(cfg.preprocess, key)
            have = str(have) if not isinstance(value, list) else None if have is None else [float(v) for v in have]
            if have != (str(value) if not isinstance(value, list) else [float(v) for v in value]):
                raise _error(f"preprocess.{key}", f"{have} differs from what model.name={name} was trained on "
                                                  f"({value}); set it, or model.preprocess_check=false to train "
                                                  f"on other inputs anyway")
    if cfg.preprocess.hu_window[0] >= cfg.preprocess.hu_window[1]:
        raise _error("preprocess.hu_window", "needs [low, high] with low < high")
    if cfg.data.task == "multiclass" and cfg.data.num_classes < 2:
        raise _error("data.num_classes", "multiclass needs num_classes >= 2")
    if cfg.data.task == "multiclass" and str(cfg.metrics.threshold_rule) != "fixed":
        raise _error("metrics.threshold_rule", f"{cfg.metrics.threshold_rule} tunes thresholds that multiclass never "
                                               f"uses (it decides by arg-max): leave it fixed")
    if cfg.data.task == "binary" and len(cfg.data.label_columns) > 1:
        raise _error("data.label_columns", "binary takes one label column")
    resume = str(cfg.train.resume).lower()
    if resume in ("false", "off", "no", "none", ""):  # YAML reads `off` as false
        cfg.train.resume = "off"
    elif resume == "true":
        cfg.train.resume = "auto"
    if cfg.metrics.key not in metric_registry.selectable():
        raise _error("metrics.key", f"{cfg.metrics.key!r} is not a validation metric; one of "
                                    f"{', '.join(metric_registry.selectable())}")
    if cfg.metrics.mode == "auto":
        cfg.metrics.mode = Mode[metric_registry.direction(cfg.metrics.key)]
    try:
        re.compile(cfg.data.patient_pattern)
    except re.error as exc:
        raise _error("data.patient_pattern", f"not a regular expression ({exc})") from None
    outside = command == "evaluate" and cfg.data.val  # scoring another data set: the run recorded its training set
    if command not in ("predict", "export") and not (cfg.data.train or cfg.data.demo.enabled or outside):
        raise _error("data.train", "no datalist: set data.train=PATH or data.demo.enabled=true"
                     + (" (evaluate: or data.val=PATH, the volumes to score)" if command == "evaluate" else ""))
    if cfg.data.folds == 1:
        raise _error("data.folds", "needs 2 or more folds (0: one train/validation split)")
    if cfg.data.folds and cfg.data.fold >= cfg.data.folds:
        raise _error("data.fold", f"must be below data.folds={cfg.data.folds}, got {cfg.data.fold}")
    if cfg.checkpoints and not cfg.checkpoint:
        cfg.checkpoint = cfg.checkpoints[0]
    if len(cfg.checkpoints) > 1 and command != "predict" and not (command == "evaluate" and
                                                                   len(cfg.checkpoints) == 2):
        raise _error("checkpoints", f"an ensemble of {len(cfg.checkpoints)} checkpoints is for predict; "
                                    f"{command} takes one checkpoint (evaluate: two, compared on the same volumes)")
    if command in ("evaluate", "predict", "export") and not cfg.checkpoint:
        raise _error("checkpoint", f"{command} needs checkpoint=PATH (e.g. runs/<run>/checkpoints/best.pt)")
    if command == "predict" and not cfg.input:
        raise _error("input", "predict needs input=PATH: a datalist, one volume, or a folder of volumes")


@functools.cache
def _schema() -> DictConfig:
    """The schema as OmegaConf's node, built once: OmegaConf.merge copies it, never changes it."""
    return OmegaConf.structured(Config)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                command: str = "train") -> Config:
    """Schema <- YAML file <- `key=value` overrides, checked for `command`; raises CT3DError naming the key."""
    overrides = ensemble_overrides(list(overrides))
    try:
        layers = []
        if path is not None:
            if not Path(path).is_file():
                raise CT3DError(f"config error: --config {path}: no such file")
            layers.append((f"--config {path}", _one_as_list(_parsed(f"--config {path}", lambda: OmegaConf.load(path)))))
        for item in overrides:
            if "=" not in item:
                raise CT3DError(f"config error: {item!r}: overrides are key=value (e.g. train.epochs=3)")
        layers += [(f"override {i!r}", _one_as_list(_parsed(f"override {i!r}", functools.partial(
            OmegaConf.from_dotlist, [i])))) for i in overrides]
        merged = _merged(layers)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    _check_limits(cfg)
    _check_together(cfg, command)
    return cfg


def _merged(layers: list[tuple[str, Any]]) -> DictConfig:
    """The (name, node) layers merged in order, in one merge onto a copy of the schema (each merge copies the whole
    config, ~20 ms a key here). A mapping where the schema has a list or a value (or the other way round) is one
    line naming the file or override: OmegaConf raises a bare TypeError for it."""
    try:
        return OmegaConf.merge(_schema(), *(node for _, node in layers))
    except TypeError:
        def fails(node: Any) -> bool:
            try:
                return OmegaConf.merge(_schema(), node) is None
            except TypeError:
                return True
        what = next((name for name, node in layers if fails(node)), "the config")
        raise CT3DError(f"config error: {what}: a mapping where the schema has a list or a single value, or the "
                        f"other way round") from None


def _parsed(what: str, parse: Callable[[], Any]) -> Any:
    """parse(), a YAML syntax error (line and column as PyYAML gives them) or text that is not UTF-8 as one line
    naming the file or override."""
    try:
        return parse()
    except yaml.YAMLError as exc:
        raise CT3DError(f"config error: {what}: not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start:exc.start + 1]
        raise CT3DError(f"config error: {what}: not UTF-8 (byte {exc.start}: {byte!r}); save it as UTF-8") from None


ONE_OR_MANY = ("data.metadata",)  # list settings that also take one value (as they did before they were lists)


def _one_as_list(node: Any) -> Any:
    """`data.metadata: a.csv` -> `[a.csv]` (an empty string -> []) in a loaded YAML or an override."""
    for key in ONE_OR_MANY:
        value = OmegaConf.select(node, key, default=None)
        if isinstance(value, str):
            OmegaConf.update(node, key, [value] if value else [], merge=False)
    return node


def with_overrides(cfg: Config, values: dict[str, Any], where: str = "override") -> Config:
    """A copy of `cfg` with dotted keys set to values, checked as load_config checks a config; an error
    names `where` and the key."""
    node = OmegaConf.structured(cfg)
    if "model.name" in values and "model.variant" not in values:
        values = {**values, "model.variant": ""}  # the new family's smallest, not the old one's variant
    try:
        for key, value in values.items():
            if OmegaConf.select(node, key, default=_MISSING) is _MISSING:
                raise _error(key, f"({where}) unknown key; accepted here: {_accepted_keys(key)}")
            OmegaConf.update(node, key, value, merge=False)
        updated = OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise CT3DError(f"{_translate(exc)} ({where})") from None
    _check_limits(updated)
    _check_together(updated, "train")
    return updated


_MISSING = object()


def plain(section: Any) -> dict:
    """A config section (or a whole config) as plain containers: what checkpoints and YAML hold. What
    `OmegaConf.to_container(OmegaConf.structured(section), resolve=True, enum_to_str=True)` gives (tested equal),
    walked here: OmegaConf took 0.1 s per whole config, and a run writes its config three times."""
    return _plain(section, None)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any, hint: Any) -> Any:
    """`value` as plain containers; `hint` (its field's type) makes an int a float where the schema says float,
    as OmegaConf does."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _hints(type(value))
        return {f.name: _plain(getattr(value, f.name), hints.get(f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, Enum):
        return value.name
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
        hint, args = args[0], list(typing.get_args(args[0]))
    if isinstance(value, dict):
        return {(k.name if isinstance(k, Enum) else k): _plain(v, args[1] if len(args) == 2 else None)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, args[0] if args else None) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def restore(cls: type, saved: dict) -> Any:
    """A config section back from `plain`'s dict (as saved in a checkpoint), checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), saved))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, with any secret-looking value blanked."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) and v else scrub(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(scrub(plain(cfg))))
