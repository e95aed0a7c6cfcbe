"""Optional dependencies: every package protoclr imports optionally is named with the extra that installs it, and
that extra in pyproject.toml lists it; a missing one is a one-line user error naming the extra."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from protoclr import extras
from protoclr.errors import MissingExtra, UserError

REPO = Path(__file__).resolve().parents[1]


def _optional_dependencies() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("module", sorted(extras.EXTRAS))
def test_every_optional_package_is_in_the_extra_the_error_names(module):
    deps = _optional_dependencies()
    extra = extras.EXTRAS[module]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps[extra]}
    assert module in names, f"pyproject's [{extra}] extra does not list {module}"
    # the test extra pulls every optional extra in, so that no optional path is skipped in CI
    assert any(d.startswith("protoclr[") and extra in d for d in deps["test"]), extra


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra) as e:
        extras.require("onnxruntime", why="checking an ONNX export")
    assert isinstance(e.value, UserError) and isinstance(e.value, ImportError)
    assert str(e.value) == ("checking an ONNX export needs the onnxruntime package, which is not installed: "
                            "pip install 'protoclr[export]'")
    pytest.importorskip("safetensors")
    assert extras.require("safetensors", why="x").__name__ == "safetensors"  # installed: the module itself
