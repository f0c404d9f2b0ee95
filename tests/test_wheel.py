"""The wheel (a regular, non-editable install): it holds every module under ``fastrec/`` and
``kernels/`` and every data file beside them, and ``fastrec info`` runs from it in a fresh
virtual environment outside the checkout.

The wheel is built without the C++ extension (``FASTREC_NO_EXTENSION=1``) from a copy of the
checkout, so that the build leaves no ``build/`` or ``*.egg-info`` behind here (and no stale
``build/lib`` file from an earlier build can stand in for a missing one). The source tree is
walked, so a new module or table is covered without changing this file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Where each source directory lands in the wheel (setup.py installs kernels/ as fastrec.kernels).
SOURCES = {"fastrec": "fastrec", "kernels": "fastrec/kernels"}
# Build products of the checkout itself, not part of the source.
NOT_SOURCE = {".venv", ".git", "build", "dist", ".whl", ".data", ".pytest_cache", ".ruff_cache", ".benchmarks"}
COMPILED = (".so", ".pyd", ".pyc")
TABLES = ("conv_dispatch.json", "attention_configs.json")  # read through importlib.resources / __file__
DEPENDENCIES = ("torch", "triton", "numpy", "tqdm")


def _source_files() -> dict[str, Path]:
    """Every file under fastrec/ and kernels/ except compiled artefacts, by its path in the wheel."""
    files = {}
    for directory, prefix in SOURCES.items():
        for path in sorted((ROOT / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in COMPILED:
                files[f"{prefix}/{path.relative_to(ROOT / directory).as_posix()}"] = path
    return files


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = NOT_SOURCE if Path(directory) == ROOT else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith((".egg-info", *COMPILED))}


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that could put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env={**_clean_env(), **env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "fastrec"
    shutil.copytree(ROOT, source, ignore=_ignore)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out)], out, FASTREC_NO_EXTENSION="1"
    )
    (built,) = out.glob("fastrec-*.whl")
    return built


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = _source_files()
    modules = [name for name in source if name.endswith(".py")]
    assert "fastrec/data/__init__.py" in modules and "fastrec/kernels/__init__.py" in modules
    missing = sorted(set(source) - names)
    assert not missing, f"in the source tree but not in the wheel (setup.py packages / package_data): {missing}"
    for table in TABLES:
        assert any(name.endswith("/" + table) for name in names), f"{table} is not in the wheel"
    assert not [name for name in names if name.endswith(COMPILED)], "the extension was skipped: no compiled file"


def test_info_runs_from_the_wheel_in_a_fresh_venv(wheel, tmp_path_factory):
    """A fresh venv sees this environment's dependencies through a .pth file that lists their
    directories: a path line of a .pth joins sys.path, but the .pth files inside that directory
    (the editable install's finder among them) are not processed, so the checkout stays unseen."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], elsewhere)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], elsewhere)
    dirs = sorted({str(Path(importlib.util.find_spec(name).origin).parent.parent) for name in DEPENDENCIES})
    Path(purelib.stdout.strip(), "dependencies.pth").write_text("\n".join(dirs) + "\n")

    seen = _run(
        [
            str(python),
            "-c",
            "import importlib.util, torch, triton, numpy, tqdm; print(importlib.util.find_spec('fastrec'))",
        ],
        elsewhere,
    )
    assert seen.stdout.strip() == "None", f"the fresh venv sees a fastrec before the wheel is installed: {seen.stdout}"

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", str(python)]
    _run([*pip, "install", "--no-deps", "--no-index", str(wheel)], elsewhere)
    info = _run([str(venv / "bin" / "fastrec"), "info"], elsewhere)
    assert info.stdout.startswith("fastrec ")
    modules = [
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in _source_files()
        if name.endswith(".py")
        and not name.endswith("/__main__.py")
        # fastrec.integrations.<library> imports that library (optional, not in this venv)
        and not (name.startswith("fastrec/integrations/") and not name.endswith("/__init__.py"))
    ]
    imports = "; ".join(f"import {module}" for module in modules)  # each module imports from the wheel
    where = _run([str(python), "-c", f"{imports}; print(fastrec.__file__)"], elsewhere)
    installed = Path(where.stdout.strip())
    assert venv in installed.parents and ROOT not in installed.parents, installed
