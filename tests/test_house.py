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
