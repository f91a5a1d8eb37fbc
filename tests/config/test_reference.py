"""The configuration reference: every key of the schema has a meaning, docs/configuration.md is the page the
schema generates today, and `--help [PREFIX]` prints each key's meaning and default."""

import subprocess
import sys

from omegaconf import OmegaConf

from engine.config import reference
from engine.config.schema import Config
from helpers import ROOT


def flat_keys(node, prefix=""):
    """Every leaf key of a plain nested dict (OmegaConf's view of the schema: independent of reference.keys)."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and k not in ("labels", "annotations", "space", "env", "node_selector", "affinity",
                                             "extra_resources", "cache_node_selector"):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_key_of_the_schema_is_listed_with_its_default_and_a_meaning():
    listed = {k.path: k for k in reference.keys()}
    schema = flat_keys(OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True))
    assert set(listed) == set(schema)
    assert [k for k, entry in listed.items() if not entry.meaning] == []
    for path, value in schema.items():  # each default as OmegaConf holds it
        expected = '""' if value == "" else "null" if value is None else str(value).lower() if isinstance(
            value, bool) else str(value).replace("'", "")
        assert listed[path].default == expected, path
    assert listed["model.name"].accepted == "resnet3d, densenet3d, vit3d, merlin, ctfm"
    assert listed["train.lr"].accepted == "> 0"
    assert "auc_macro" in listed["metrics.key"].accepted


def test_the_configuration_page_is_the_one_the_schema_generates():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == reference.page(), "run: python -m engine.config.reference docs/configuration.md"
    assert reference.main(["--check", str(page)]) == 0


def test_a_field_without_a_comment_has_no_meaning_and_a_stale_page_fails_the_check(tmp_path):
    source = ("class A:\n"
              "    # above, first\n    # above, second\n    x: int = 1  # beside\n"
              "    y: int = 2\n"
              "    z: int = setting(\n        3)  # on its last line\n")
    assert reference.meanings_in(source) == {("A", "x"): "above, first above, second beside", ("A", "y"): "",
                                             ("A", "z"): "on its last line"}
    stale = tmp_path / "configuration.md"
    stale.write_text(reference.page().replace("MONAI network", "a network"))
    assert reference.main(["--check", str(stale)]) == 1
    assert reference.main(["--check", str(tmp_path / "absent.md")]) == 1


def test_help_prints_a_sections_keys_with_meaning_and_default():
    run = subprocess.run([sys.executable, "-m", "engine.run", "--help", "model"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    model = [k for k in reference.keys() if k.path.startswith("model.")]
    for key in model:
        assert f"{key.path} ({key.type}, default {key.default}" in run.stdout
        assert key.meaning in run.stdout
    assert "train.lr" not in run.stdout
    whole = subprocess.run([sys.executable, "-m", "engine.run", "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
    assert whole.returncode == 0 and all(f"  {k.path} (" in whole.stdout for k in reference.keys())
    unknown = subprocess.run([sys.executable, "-m", "engine.run", "--help", "nope"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
    assert unknown.returncode == 2 and "nope" in unknown.stderr
