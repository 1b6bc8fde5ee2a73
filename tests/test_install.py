"""The installable package: console scripts, declared dependencies, packaged stage configs, and no TFDS / pyarrow
(nor TensorFlow, torch) behind any import outside cnc_jax.data.tfds*.

The slow test builds the wheel, installs it into a fresh venv and runs the commands from another folder. It stays
offline and fast: the venv sees this environment's installed dependencies through a .pth file (nothing is
downloaded; pip installs the wheel alone), so what it proves about dependencies comes from the wheel's METADATA:
every module the package imports is a Requires-Dist of the core install or of the extra that owns it.
"""

import ast
import importlib
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from cnc_jax import configs
from cnc_jax.cli import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"cnc-sample": "sample.py", "cnc-train": "train.py", "cnc-convert": "convert_torch_weights.py",
           "cnc-demo": "demo.py", "cnc-evaluate": "evaluate.py", "cnc-prepare": None, "cnc-annotate": None}
NOT_IN_CORE = ("tensorflow_datasets", "pyarrow", "tensorflow", "torch")
# modules the package imports that the core install does not bring: the extra that declares each, or None for an
# optional one that is never required (W&B logging runs only where wandb is installed)
EXTRAS = {"tensorflow_datasets": "data", "pyarrow": "data", "gradio": "demo", "wandb": None}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_imports() -> set[str]:
    """The top-level names of every absolute import (at any depth) in the package's source, stdlib aside."""
    names = set()
    for path in (ROOT / "cnc_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "cnc_jax"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_console_scripts_name_the_commands_and_the_scripts_only_call_them():
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        wrapper = SCRIPTS[name]
        if wrapper is None:
            continue
        tree = ast.parse((ROOT / wrapper).read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [(module, [function])], wrapper
        assert len(tree.body) == 3, f"{wrapper}: a docstring, the import and the __main__ call, nothing else"


def test_stage_configs_by_name_and_by_file():
    for name in configs.NAMES:
        packaged = importlib.import_module(f"cnc_jax.configs.{name}").get_config()
        path = configs.config_file(name)
        assert os.path.isfile(path) and path.startswith(os.path.dirname(configs.__file__))
        top_level = importlib.import_module(f"configs.{name}").get_config()  # the repository's thin file
        assert top_level.to_dict() == packaged.to_dict()
    assert configs.config_file("configs/tiny.py") == "configs/tiny.py"
    assert train.packaged_config_args(["--config", "tiny", "--config.batch_size=8", "--workdir", "w"]) == [
        "--config", configs.config_file("tiny"), "--config.batch_size=8", "--workdir", "w"]
    assert train.packaged_config_args(["--config=cnc_v1", "--config.model=tiny"]) == [
        f"--config={configs.config_file('cnc_v1')}", "--config.model=tiny"]
    assert train.packaged_config_args(["--config", "my/own.py"]) == ["--config", "my/own.py"]


def test_no_module_outside_tfds_imports_tfds_pyarrow_tensorflow_or_torch():
    """Every cnc_jax module except cnc_jax.data.tfds*, imported in a fresh interpreter."""
    code = ("import importlib, pkgutil, sys, cnc_jax\n"
            "names = [m.name for m in pkgutil.walk_packages(cnc_jax.__path__, 'cnc_jax.')\n"
            "         if not m.name.startswith('cnc_jax.data.tfds')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            f"print(len(names), [m for m in {NOT_IN_CORE!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    count, loaded = result.stdout.split(" ", 1)
    assert int(count) > 50 and loaded.strip() == "[]", result.stdout


def _undeclared(core: set, extras: dict) -> list[str]:
    """The package's imports that no distribution of `core` (or of the extra EXTRAS names) provides, by this
    environment's installed distributions."""
    owners = importlib.metadata.packages_distributions()
    missing = []
    for module in sorted(_package_imports()):
        extra = EXTRAS.get(module, "core")
        if extra is None:
            continue
        declared = core if extra == "core" else extras.get(extra, set())
        dists = {_normalize(d) for d in owners.get(module, [])}
        if not dists & declared:
            missing.append(f"{module} ({extra}; provided by {sorted(dists) or 'no installed distribution'})")
    return missing


def _names(requirements) -> set[str]:
    return {_normalize(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requirements}


def test_every_imported_module_is_a_declared_dependency():
    project = _pyproject()["project"]
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert not _undeclared(_names(project["dependencies"]), extras)


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the project's package files (a build leaves build/ and *.egg-info beside its source:
    not in the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cnc_jax", src / "cnc_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cnc_jax-*.whl")
    return wheel


def _requires(metadata: str) -> tuple[set, dict]:
    """(core distributions, {extra: distributions}) of a wheel's METADATA Requires-Dist lines."""
    core, extras = [], {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = line.split(":", 1)[1].strip()
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
            (extras.setdefault(extra.group(1), []) if extra else core).append(requirement)
    return _names(core), {k: _names(v) for k, v in extras.items()}


def _run(argv, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_its_commands_run_from_another_folder(tmp_path):
    """~30-40 s: build the wheel, install it alone into a new venv, sample with the tiny random model, resolve
    the packaged stage configs by name."""
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        (metadata_name,) = [n for n in files if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    tracked = subprocess.run(["git", "ls-files", "cnc_jax"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [f for f in tracked if f not in files], "package files missing from the wheel (package-data?)"
    for name in SCRIPTS:
        assert f"{name} = " in entry_points
    core, extras = _requires(metadata)
    assert not _undeclared(core, extras), "imported, but no Requires-Dist of the wheel provides it"
    assert {"pytest", "pytest-xdist", "selenium"} <= extras["dev"] and {"gradio", "gradio-client"} <= extras["demo"]
    assert {"tensorflow-datasets", "array-record"} <= extras["data"] and "eval" in extras
    assert not ({"tensorflow-datasets", "pyarrow", "torch", "tensorflow"} & core)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this environment's installed packages (pip among them), after the venv's own
    Path(purelib, "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: an editable cnc_jax of this environment (pip install -e .) is visible through the .pth
    # file, and pip would otherwise keep it and skip the wheel
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = _run([str(python), "-c", "import cnc_jax; print(cnc_jax.__file__)"], elsewhere, env)
    assert where.stdout.startswith(purelib), where.stdout + where.stderr
    for name in SCRIPTS:
        assert (venv / "bin" / name).is_file(), name

    # -X importtime's log, through its environment variable: every module the command imports, on stderr
    sample = _run(["cnc-sample", "--random-init", "--size", "64", "--steps", "2", "--out", "out"], elsewhere,
                  dict(env, PYTHONPROFILEIMPORTTIME="1"))
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert list((elsewhere / "out").glob("*/image_000.png")) and list((elsewhere / "out").glob("*/job.json"))
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in sample.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "cnc_jax" in imported and "jax" in imported
    assert not imported & set(NOT_IN_CORE), imported & set(NOT_IN_CORE)

    no_data = _run(["cnc-train", "--config", "tiny", "--workdir", "run"], elsewhere, env)
    assert no_data.returncode == 2 and "error: no training data" in no_data.stderr, no_data.stderr[-3000:]
    override = _run(["cnc-train", "--config=cnc_v1", "--workdir", "run", "--config.learning_rate=nan"], elsewhere,
                    env)
    assert override.returncode == 2 and "error: config.learning_rate" in override.stderr, override.stderr[-3000:]
    assert not (elsewhere / "run").exists()
    usage = _run(["cnc-convert", "--help"], elsewhere, env)
    assert usage.returncode == 0 and "init-global" in usage.stdout
