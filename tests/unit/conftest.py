"""Runs every core test against both implementations of spr's core, and sets up
hypothesis for a slow, shared machine.

The compiled core is never optional here: an install builds it (``pip install -e .``),
so a missing one is a broken build and fails the tests that compare it with the twin,
instead of skipping them.

Hypothesis profiles: ``ci`` (``HYPOTHESIS_PROFILE=ci``, set by ``ci/test.sh``) is
derandomised and keeps no example database, so every run draws the same examples and a
cold checkout behaves like a warm one; ``dev`` (the default) draws at random and keeps
its database in ``.hypothesis/``. Both allow a generous deadline, since a 2-core machine
shared with a broker and a database stalls now and then. Hypothesis builds its Unicode
table the first time a test draws text (1-2 s here, cached in ``.hypothesis/``); it is
built once before the tests, so that no test's health check is charged for it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from types import ModuleType

import pytest
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st

from spr import _core_py
from spr._impl import compiled_core

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    print_blob=True,
)
settings.register_profile("dev", deadline=timedelta(seconds=2))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

_compiled = compiled_core()
_NOT_BUILT = (
    "spr._core is not built; `pip install -e .` (or `python setup.py build_ext --inplace`) "
    "builds it, and every core test runs against it and its twin"
)


@pytest.fixture(scope="session", autouse=True)
def _unicode_table_built() -> None:
    """Builds hypothesis's Unicode table before the first test, outside its timing."""
    find(
        st.text(min_size=1),
        lambda _: True,
        settings=settings(database=None, suppress_health_check=list(HealthCheck)),
    )


@pytest.fixture(params=["python", "compiled"])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """``spr._core_py`` and ``spr._core``, one after the other."""
    if request.param == "python":
        return _core_py
    if _compiled is None:
        pytest.fail(_NOT_BUILT)
    return _compiled


@pytest.fixture(scope="session")
def compiled() -> ModuleType:
    """The compiled core (a test comparing it with the twin fails when it isn't built)."""
    if _compiled is None:
        pytest.fail(_NOT_BUILT)
    return _compiled
