"""The one module that chooses between the compiled core and its pure-Python twin.

``spr._core`` (Cython) and ``spr._core_py`` define the same names with the same
semantics; the twin is the reference. Setting ``SPR_NO_EXTENSIONS=1`` forces the twin,
as does a missing or unloadable extension. ``IMPL`` says which one is live:
``"compiled"`` or ``"python"``. Everything else in spr imports the core from here.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["IMPL", "compiled_core", "core"]


def compiled_core() -> ModuleType | None:
    """The built extension ``spr._core``, whatever ``SPR_NO_EXTENSIONS`` says; None
    when it is not built (the tests and benchmarks compare it with the twin)."""
    try:
        from spr import _core  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        return None
    # Without a built extension, the include folder src/spr/_core/ imports as an empty
    # namespace package: that is no core either.
    return _core if hasattr(_core, "Batch") else None


def _choose() -> tuple[ModuleType, str]:
    compiled = None if os.environ.get("SPR_NO_EXTENSIONS", "") not in ("", "0") else compiled_core()
    if compiled is None:
        from spr import _core_py

        return _core_py, "python"
    return compiled, "compiled"


core, IMPL = _choose()
