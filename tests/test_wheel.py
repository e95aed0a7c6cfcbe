"""The package as a user installs it: `python -m build` makes an sdist and a wheel (the wheel built from the sdist,
so the sdist is complete); the wheel installs into a clean virtual environment, where `protoclr --help` and the
README's three-line loss run from the installed files, not from this checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import protoclr
from protoclr.losses import BalancedContrastiveLoss, contrastive_loss

REPO = Path(__file__).resolve().parents[1]


def _readme_loss_lines() -> str:
    """The code block of README's section "The loss family in three lines"."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The loss family in three lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _clean_venv(where: Path) -> Path:
    """A new virtual environment (no pip, no packages) whose Python also sees this environment's installed packages
    (torch, lightning, ...) *after* its own, through a .pth file that lists their folders. Installing torch afresh
    would take minutes and gigabytes; and `--system-site-packages` would not help, because it exposes the base
    interpreter's packages, not this virtual environment's, where torch lives. A folder named in a .pth file joins
    sys.path as it is: the .pth files inside it are not run, so this environment's editable install of protoclr
    (a .pth pointing at src/) stays out, and `import protoclr` can only find the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=300)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "outer_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1"}


@pytest.mark.slow
def test_the_wheel_installs_into_a_clean_venv_and_runs(tmp_path):
    pytest.importorskip("build")
    # a copy of the checkout, so that the build's by-products (egg-info) stay out of it
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache"))
    # --no-isolation: the test environment's setuptools (the `test` extra), no download of a build environment
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = protoclr.__version__
    (sdist,) = (tmp_path / "dist").glob("protoclr-*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("protoclr-*.whl")
    assert sdist.name == f"protoclr-{version}.tar.gz" and wheel.name.startswith(f"protoclr-{version}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    assert "protoclr/losses.py" in names and "protoclr/export.py" in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"protoclr-{version}.dist-info/entry_points.txt").decode()
    assert "protoclr = protoclr.cli:main" in entry_points

    venv = tmp_path / "venv"
    python = _clean_venv(venv)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    help_ = subprocess.run([str(python.parent / "protoclr"), "--help"], capture_output=True, text=True, env=_env(),
                           cwd=tmp_path, timeout=300)
    assert help_.returncode == 0 and "usage: protoclr COMMAND" in help_.stdout and "export" in help_.stdout

    snippet = ("import torch, protoclr\n"
               "z1, z2 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).chunk(2, dim=1)\n"
               f"{_readme_loss_lines()}"
               "print(protoclr.__file__, protoclr.__version__, repr(float(loss)))\n")
    ran = subprocess.run([str(python), "-c", snippet], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    where, installed_version, value = ran.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed wheel"
    assert installed_version == version
    # the same two lines here give the same number: the wheel holds this checkout's loss
    z1, z2 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).chunk(2, dim=1)
    BalancedContrastiveLoss(alpha=4.0, lam=2.0)(z1, z2)
    expected = contrastive_loss(torch.stack([z1, z2]), alpha=2.0, lam=2.0)
    assert float(value) == float(expected)


def test_the_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "protoclr.__version__"}
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{protoclr.__version__}]" in changelog  # the released version has its entry
