"""Build the wheel and check what it ships: the compiled core, py.typed and the stub,
but neither the generated C nor the Cython sources (the .pyx, its include files and the
.pxd), and not the include folder ``spr/_core/`` as a package."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, "."],
            check=True,
        )
        (wheel,) = Path(out).glob("spr-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
    problems = []
    if not any(n.startswith("spr/_core.") and n.endswith(".so") for n in names):
        problems.append("the compiled spr._core is missing")
    for required in ("spr/py.typed", "spr/_core.pyi", "spr/_core_py/__init__.py"):
        if required not in names:
            problems.append(f"{required} is missing")
    for name in names:
        if name.endswith((".c", ".pyx", ".pxi", ".pxd", ".html")) or name.startswith("spr/_core/"):
            problems.append(f"{name} should not ship")
    if problems:
        print(f"ci/check_wheel: {wheel.name}: " + "; ".join(problems))
        return 1
    print(f"ci/check_wheel: {wheel.name} ok ({len(names)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
