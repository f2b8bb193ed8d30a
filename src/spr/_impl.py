"""The one module that chooses between the compiled core and its pure-Python twin.

``spr._core`` (Cython) and ``spr._core_py`` define the same names with the same
semantics; the twin is the reference. Setting ``SPR_NO_EXTENSIONS=1`` forces the twin,
as does a missing or unloadable extension. ``IMPL`` says which one is live:
``"compiled"`` or ``"python"``. Everything else in spr imports the core from here.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["IMPL", "core"]


def _choose() -> tuple[ModuleType, str]:
    if os.environ.get("SPR_NO_EXTENSIONS", "") not in ("", "0"):
        from spr import _core_py

        return _core_py, "python"
    try:
        from spr import _core  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        from spr import _core_py

        return _core_py, "python"
    return _core, "compiled"


core, IMPL = _choose()
