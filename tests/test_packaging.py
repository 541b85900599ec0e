"""What a user installs is the package: the wheel holds every module, the version and Python claims hold.

`.ci/wheel` goes further: it installs the wheel into a fresh environment and runs train, generate, export and
eval from it.
"""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import qlora_ft
from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_files() -> set[str]:
    files = (ROOT / "qlora_ft").rglob("*")
    return {p.relative_to(ROOT).as_posix() for p in files if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "qlora_ft", src / "qlora_ft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("qlora_ft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _package_files() - names
    assert not missing, f"the wheel leaves out {sorted(missing)}"
    assert "qlora_ft/data/demo/northanger_abbey.txt" in names  # --data demo:austen
    assert wheel.stat().st_size < 1_000_000  # the demo book is compressed in the wheel
    assert wheel.name.startswith(f"qlora_ft-{qlora_ft.__version__}-")
    assert any(n.endswith("licenses/LICENSE") for n in names), "the wheel carries no LICENSE"


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qlora_ft.__version__"}
    out = subprocess.run([sys.executable, "-m", "qlora_ft", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"qlora-ft {qlora_ft.__version__}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {qlora_ft.__version__}" in changelog, "CHANGELOG.md has no entry for the current version"


def test_the_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_minimum_python_is_claimed_consistently_and_holds():
    """requires-python, ruff's target and the README say the same version, and no module needs a newer one
    (vermin reads the code statically: CI has one interpreter, so running the code cannot show it)."""
    minimum = re.fullmatch(r">=3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{minimum}"
    assert f"Python ≥ 3.{minimum}" in (ROOT / "README.md").read_text()
    pytest.importorskip("vermin", reason="vermin is not installed (pip install -e '.[dev]')")
    paths = ["qlora_ft", "train.py", "inference.py", "bench"]
    run_vermin = "import sys, vermin; sys.exit(vermin.main())"
    flags = [f"-t=3.{minimum}-", "--violations", "--no-tips", "--eval-annotations"]
    cmd = [sys.executable, "-c", run_vermin, *flags, *paths]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"code needs a newer Python than 3.{minimum}:\n{out.stdout}"
