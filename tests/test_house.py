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


ENGINE_PACKAGES = ("config", "data", "training", "results", "serving", "experiments", "utils")


def test_engine_packages_export_names_that_resolve_without_importing_torch_first():
    """bench and k8s use the names engine's packages export (import-linter forbids their modules). Importing the
    packages stays torch-free (k8s, config checks and `--help` start in well under 2 s); each exported name resolves
    to what its module defines; and none is also a module's name (once that module is imported, `from package import
    name` would give the module)."""
    import importlib
    import subprocess
    import sys

    packages = ", ".join(f"engine.{name}" for name in ENGINE_PACKAGES)
    heavy = subprocess.run([sys.executable, "-c", f"import sys, {packages}; print(sorted({{'torch', 'monai', 'ignite'}}"
                            " & set(sys.modules)))"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert heavy.stdout.strip() == "[]", heavy.stdout + heavy.stderr[-2000:]
    for name in ENGINE_PACKAGES:
        package = importlib.import_module(f"engine.{name}")
        exported = set(getattr(package, "__all__", ()))
        modules = {p.stem for p in (ROOT / "engine" / name).glob("*.py")}
        assert not exported & modules, f"engine.{name} exports module names: {sorted(exported & modules)}"
        for attribute in exported:
            assert getattr(package, attribute) is not None, f"engine.{name}.{attribute}"


def engine_names_imported(path: Path) -> list[tuple[str, str]]:
    """(package, name) of each `from engine.<package> import name` in `path`."""
    packages = {f"engine.{name}" for name in ENGINE_PACKAGES}
    return [(node.module, a.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module in packages for a in node.names]


def test_k8s_and_bench_import_only_names_engines_packages_export(tmp_path):
    """The other half of import-linter's contract (no engine module imported directly): a name taken from a package
    is one it exports, not something its __init__ happens to hold."""
    import importlib

    users = [p for p in SOURCES if p.parts[len(ROOT.parts)] in ("k8s", "bench")]
    imported = {(str(p.relative_to(ROOT)), package, name) for p in users for package, name in engine_names_imported(p)}
    assert len(imported) > 20
    assert {(path, f"{package}.{name}") for path, package, name in imported
            if name not in getattr(importlib.import_module(package), "__all__", ())} == set()
    broken = tmp_path / "uses_unexported.py"
    broken.write_text("from engine.data import importlib\n")
    assert engine_names_imported(broken) == [("engine.data", "importlib")]  # the check itself can fail
    assert "importlib" not in importlib.import_module("engine.data").__all__


def test_the_public_names_contract_forbids_every_module_of_engine():
    """import-linter's contract names engine's top-level modules one by one (a wildcard would forbid its packages
    too): a new one joins the list, or bench and k8s could import it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    public = next(c for c in contracts if c["name"].startswith("k8s and bench use engine's public names"))
    modules = {f"engine.{p.stem}" for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__"}
    assert modules and "engine.*.*" in public["forbidden_modules"]
    assert modules - set(public["forbidden_modules"]) == set()


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


# The modules that may hold the whole config: the command line, the commands' entries, the config package itself,
# the training and serving wiring, and experiments (above the wiring: they derive each run's config).
WIRING = {"engine/run.py", "engine/commands.py", "engine/training/workflow.py", "engine/serving/commands.py"}
WIRING_PACKAGES = ("engine/config/", "engine/experiments/")


def whole_config_users(path: Path) -> list[str]:
    """Functions of `path` that take the whole Config (a parameter annotated Config or named cfg), and imports of
    the Config class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and any(a.name == "Config" for a in node.names):
            found.append(f"imports Config (line {node.lineno})")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg == "cfg" or annotation.split(".")[-1].strip("'\"") == "Config":
                    found.append(f"{getattr(node, 'name', 'lambda')}({arg.arg})")
    return found


def test_only_the_wiring_receives_the_whole_config(tmp_path):
    below = [p for p in SOURCES if p.parts[len(ROOT.parts)] == "engine"]
    offenders = {}
    for path in below:
        name = str(path.relative_to(ROOT))
        if name not in WIRING and not name.startswith(WIRING_PACKAGES) and whole_config_users(path):
            offenders[name] = whole_config_users(path)
    assert offenders == {}
    broken = tmp_path / "below.py"
    broken.write_text("from engine.config.schema import Config\ndef make(cfg: Config, x: int): ...\n")
    assert whole_config_users(broken) == ["imports Config (line 1)", "make(cfg)"]  # the check itself can fail


def test_the_training_wiring_reads_top_to_bottom_in_80_lines():
    tree = ast.parse((ROOT / "engine" / "training" / "workflow.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80


def function_level_engine_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of engine's own modules inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                module = inner.module if isinstance(inner, ast.ImportFrom) else (
                    inner.names[0].name if isinstance(inner, ast.Import) else None)
                if module and module.split(".")[0] == "engine":
                    found.append((inner.lineno, module))
    return found


def test_imports_sit_at_the_top_unless_a_comment_says_why():
    """A file's head says what it uses: fewer than 20 imports of engine's modules inside functions, each with a
    comment on its line or the line above saying why (a measured start-up cost, a child process's order)."""
    inside = {p: function_level_engine_imports(p) for p in SOURCES}
    assert sum(map(len, inside.values())) < 20, {str(p.relative_to(ROOT)): v for p, v in inside.items() if v}
    for path, found in inside.items():
        lines = path.read_text().splitlines()
        for line, module in found:
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            assert said, f"{path.relative_to(ROOT)}:{line}: import of {module} inside a function without a reason"
