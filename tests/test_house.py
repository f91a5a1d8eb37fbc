"""The shape of the house, checked: modules small enough to read whole, packages and modules that say why
they exist, and k8s/bench using engine's public names only (import-linter checks the layers themselves)."""

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SOURCES = sorted(p for folder in ("engine", "k8s", "bench") for p in (ROOT / folder).rglob("*.py"))
MAX_LINES = 300


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_short_and_says_why_it_exists(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)}: split it by what it does"
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)}: no opening docstring"


def test_every_engine_package_says_what_it_may_import():
    packages = [p for p in (ROOT / "engine").iterdir() if (p / "__init__.py").is_file()]
    assert {p.name for p in packages} >= {"config", "data", "training", "results", "serving", "experiments", "utils"}
    for package in packages:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"engine/{package.name}/__init__.py: say its job and what it may import"


def private_engine_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "engine":
            parts = node.module.split(".")
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and a.name != "__version__" or any(p.startswith("_") for p in parts)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and node.value.id in {"engine"}:
            found.append(f"engine.{node.attr}")
    return found


def test_k8s_and_bench_use_only_engines_public_names(tmp_path):
    users = [p for p in SOURCES if p.parts[len(ROOT.parts)] in ("k8s", "bench")]
    assert users
    assert {str(p.relative_to(ROOT)): private_engine_imports(p) for p in users if private_engine_imports(p)} == {}
    broken = tmp_path / "uses_private.py"
    broken.write_text("from engine.data.cache import _disk_cache\n")
    assert private_engine_imports(broken) == ["engine.data.cache._disk_cache"]  # the check itself can fail


def test_pip_install_gets_every_package_the_demo_config_and_the_ct3d_command(tmp_path):
    """`pip install .` must give a working `ct3d`: every subpackage, the packaged demo config, the script."""
    import shutil
    import subprocess
    import sys
    import zipfile

    for name in ("engine", "pyproject.toml", "README.md"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("ct3d-*.whl")))
    names = set(wheel.namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "engine/config/default.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ct3d = engine.run:console" in wheel.read(entry_points).decode()
    metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for needed in ("psutil", "pyjpegls", "onnx", "onnxruntime", "optuna"):  # imported by engine, in the lock
        assert f"Requires-Dist: {needed}\n" in metadata, needed
