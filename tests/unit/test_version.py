"""The version is written once, in ``spr._version``, and everything that shows it
agrees: the installed distribution's metadata (and so the wheel's name), ``spr.__version__``
and ``spr --version``. An editable install whose metadata lags a changed ``_version.py``
fails here until it is reinstalled (``bash ci/setup.sh``)."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import tomllib

import spr

ROOT = Path(__file__).resolve().parents[2]


def test_version_agrees_everywhere() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spr", "--version"], capture_output=True, text=True, check=True
    )
    assert importlib.metadata.version("spr") == spr.__version__
    assert out.stdout.split()[:2] == ["spr", spr.__version__]


def test_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "spr._version.__version__"}
    # A plain literal, so that setuptools reads it without importing spr while it builds.
    module = ast.parse((ROOT / "src/spr/_version.py").read_text())
    (assignment,) = [node for node in module.body if isinstance(node, ast.Assign)]
    assert isinstance(assignment.value, ast.Constant)
    assert assignment.value.value == spr.__version__
