"""Runs every core test against both implementations of spr's core."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from spr import _core_py
from spr._impl import compiled_core

_compiled = compiled_core()

IMPLEMENTATIONS = [pytest.param(_core_py, id="python")]
if _compiled is not None:
    IMPLEMENTATIONS.append(pytest.param(_compiled, id="compiled"))


@pytest.fixture(params=IMPLEMENTATIONS)
def core(request: pytest.FixtureRequest) -> ModuleType:
    """``spr._core_py`` and ``spr._core``, one after the other."""
    module: ModuleType = request.param
    return module


@pytest.fixture(scope="session")
def compiled() -> ModuleType:
    """The compiled core; tests comparing it with the twin skip when it isn't built."""
    if _compiled is None:
        if os.environ.get("CI"):
            pytest.fail("spr._core is not built; CI must test the compiled core")
        pytest.skip("spr._core is not built")
    return _compiled
