
import pytest

from engine.config.loading import load_config, to_yaml
from engine.utils.errors import CT3DError
from helpers import ROOT


def error_of(*overrides: str, path=None) -> str:
    with pytest.raises(CT3DError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_defaults_and_overrides_merge():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["train.epochs=3", "model.name=densenet3d"])
    assert cfg.train.epochs == 3
    assert cfg.data.demo.enabled is True
    assert cfg.model.name == "densenet3d" and cfg.model.variant == "121"


def test_family_default_variant_is_its_smallest():
    assert load_config(None, ["data.demo.enabled=true", "model.name=densenet3d"]).model.variant == "121"
    assert load_config(None, ["data.demo.enabled=true", "model.name=vit3d"]).model.variant == "tiny"


def test_unknown_key_names_full_key_and_what_is_accepted():
    message = error_of("data.demo.enabled=true", "train.epoch=3")
    assert "train.epoch" in message and "epochs" in message
    assert "unknown" in error_of("data.demo.enabled=true", "nosuchsection.key=1")


def test_wrong_type_names_key():
    message = error_of("data.demo.enabled=true", "train.epochs=three")
    assert message.startswith("config error: train.epochs") and "Integer" in message


def test_unknown_choice_lists_choices():
    message = error_of("data.demo.enabled=true", "model.name=nope")
    assert "model.name" in message and "resnet3d" in message and "vit3d" in message
    assert "model.variant" in error_of("data.demo.enabled=true", "model.name=resnet3d", "model.variant=121")
    assert "data.task" in error_of("data.demo.enabled=true", "data.task=regression")


@pytest.mark.parametrize("override,key", [
    ("train.epochs=0", "train.epochs"), ("cache.memory_rate=1.5", "cache.memory_rate"),
    ("preprocess.spatial_size=[64,64]", "preprocess.spatial_size"),
    ("preprocess.hu_window=[100,-100]", "preprocess.hu_window"),
    ("preprocess.spacing=[1,0,1]", "preprocess.spacing"), ("metrics.beta=0", "metrics.beta"),
])
def test_out_of_range_values_name_key(override, key):
    assert key in error_of("data.demo.enabled=true", override)


def test_no_datalist_is_an_error():
    assert "data.train" in error_of()


def test_malformed_override_and_missing_file():
    assert "key=value" in error_of("train.epochs")
    assert "no such file" in error_of(path="/nonexistent/config.yaml")


def test_yaml_unknown_key_is_caught(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  demo:\n    enabled: true\nmodel:\n  nmae: resnet3d\n")
    assert "model.nmae" in error_of(path=path)


def test_ct_rate_config_reads_paths_from_environment(monkeypatch):
    monkeypatch.setenv("CTRATE_DIR", "/mnt/ctrate")
    cfg = load_config(ROOT / "configs" / "ct-rate.yaml")
    assert cfg.data.train.startswith("/mnt/ctrate/")
    assert len(cfg.data.label_columns) == 18
    assert list(cfg.preprocess.spacing) == [1.4, 1.4, 2.8] and cfg.preprocess.orientation == "LPS"
    assert list(cfg.preprocess.spatial_size) == [256, 256, 128]


def test_saved_yaml_blanks_secrets():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"tracking": {"api_key": "sekrit-123", "project": "p"}})
    text = to_yaml(cfg)
    assert "sekrit-123" not in text and "project: p" in text










def test_resume_off_survives_yaml_boolean_parsing():
    assert load_config(None, ["data.demo.enabled=true", "train.resume=off"]).train.resume == "off"
    assert load_config(None, ["data.demo.enabled=true"]).train.resume == "auto"




@pytest.mark.parametrize("name", ["default.yaml", "ct-rate.yaml", None])
def test_plain_equals_omegaconfs_own_conversion(name):
    """`plain` walks the dataclasses itself (OmegaConf took 0.1 s a config); what it returns must be what OmegaConf's
    structured -> to_container gives, types included (an int in a float field is a float, enums their names):
    checkpoints, saved configs and cache keys are made of it."""
    import dataclasses

    from omegaconf import OmegaConf

    from engine.config.loading import plain
    from engine.config.schema import Config, ModelConfig, PreprocessConfig

    def omegaconfs(x):
        return OmegaConf.to_container(OmegaConf.structured(x), resolve=True, enum_to_str=True)

    overrides = ["data.demo.enabled=true", "k8s.nodes=2", "k8s.labels={team: ml}", "k8s.extra_resources={rdma/ib: 1}",
                 "k8s.tolerations=[{key: spot, operator: Exists}]", "preprocess.spacing=[1,1,2]", "train.lr=1",
                 "sweep.space={train.lr: {type: log, low: 1e-4, high: 1e-2}}", "metrics.key=auc_micro"]
    cfg = load_config(ROOT / "configs" / name if name else None, overrides)
    direct = [Config(), ModelConfig(widen_factor=1, dropout=0),
              PreprocessConfig(hu_window=[-1000, 1000], spacing=[1, 1, 2])]
    for x in [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg)), *direct]:
        if dataclasses.is_dataclass(x):
            assert repr(plain(x)) == repr(omegaconfs(x)), type(x).__name__  # repr: 1 and 1.0 differ


def test_a_load_leaves_nothing_behind_for_the_next():
    """load_config merges onto a copy of one cached schema node: one config's file and overrides never reach the
    next load (the schema's defaults as written in the dataclasses)."""
    from engine.config.schema import Config

    first = load_config(ROOT / "configs" / "ct-rate.yaml", ["train.epochs=77", "data.demo.enabled=true"])
    again = load_config(None, ["data.demo.enabled=true"])
    assert first.train.epochs == 77 and again.train.epochs == Config().train.epochs
    assert again.preprocess.spatial_size == Config().preprocess.spatial_size != first.preprocess.spatial_size
