"""Integer range checks of the twin.

The compiled core gets them from its C types: an argument declared ``int64_t`` or
``int32_t`` raises OverflowError when the Python int does not fit. The twin checks
explicitly, with the same exception, so that both reject the same input.
"""

from __future__ import annotations

_INT32_MAX = 2**31 - 1
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _check_int64(value: int, name: str) -> None:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise OverflowError(f"{name} must fit in a signed 64-bit int, got {value}")
