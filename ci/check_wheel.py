"""Check the release artefacts that ci/build_dist.sh leaves in ``dist/`` (or the
directory given as the only argument).

The wheel ships the compiled core, py.typed and the stub, but neither the generated C
nor the Cython sources (the .pyx, its include files and the .pxd), and not the include
folder ``spr/_core/`` as a package; it carries a manylinux tag; its dependencies do not
force psycopg's C implementation, which needs a compiler; its classifiers are ones a
package index accepts; its long description is README.md, which renders as PyPI
renders it (``twine check`` does not render Markdown). The sdist ships every Cython
source and the stub, and no generated C or built extension. Both are named with the
version that ``src/spr/_version.py`` writes, and the wheel's metadata says the same.
"""

from __future__ import annotations

import ast
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CYTHON_SOURCES = (".pyx", ".pxi", ".pxd")
# What a build leaves behind; the wheel ships the extension, the sdist nothing of this.
GENERATED = (".c", ".html", ".pyc")


def source_version() -> str:
    """The version as ``src/spr/_version.py`` writes it (read, not imported)."""
    for node in ast.parse((ROOT / "src/spr/_version.py").read_text()).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__version__":
            return str(ast.literal_eval(node.value))
    raise SystemExit("ci/check_wheel: src/spr/_version.py assigns no __version__")


def check_wheel(wheel: Path, version: str) -> list[str]:
    problems = []
    name, wheel_version, *_, platform = wheel.name[: -len(".whl")].split("-")
    if wheel_version != version:
        problems.append(f"named version {wheel_version}, the source says {version}")
    if not any(tag.startswith("manylinux_2_") for tag in platform.split(".")):
        problems.append(f"platform tag {platform} is not manylinux (ci/build_dist.sh repairs it)")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = Parser().parsestr(
            archive.read(f"{name}-{wheel_version}.dist-info/METADATA").decode()
        )
    if metadata["Version"] != version:
        problems.append(f"metadata says version {metadata['Version']}, the source says {version}")
    if not any(n.startswith("spr/_core.") and n.endswith(".so") for n in names):
        problems.append("the compiled spr._core is missing")
    for required in ("spr/py.typed", "spr/_core.pyi", "spr/_core_py/__init__.py"):
        if required not in names:
            problems.append(f"{required} is missing")
    for n in names:
        if n.endswith((*GENERATED, *CYTHON_SOURCES)) or n.startswith("spr/_core/"):
            problems.append(f"{n} should not ship")
    for requirement in metadata.get_all("Requires-Dist") or []:
        compact = requirement.replace(" ", "")
        if compact.startswith("psycopg[c]") and "extra==" not in compact:
            problems.append(f"a plain install requires {requirement}, which needs a compiler")
    try:
        from readme_renderer.markdown import render
        from trove_classifiers import classifiers as known
    except ImportError:
        problems.append("trove-classifiers or readme-renderer[md] is missing (dev extra)")
        return problems
    for classifier in metadata.get_all("Classifier") or []:
        if classifier not in known:
            problems.append(f"unknown classifier {classifier!r}")
    description = str(metadata.get_payload())
    if description != (ROOT / "README.md").read_text():
        problems.append("the long description is not README.md")
    if metadata["Description-Content-Type"] != "text/markdown" or not render(
        description, variant="GFM"
    ):
        problems.append("the long description does not render as Markdown")
    return problems


def check_sdist(sdist: Path, version: str) -> list[str]:
    problems = []
    if sdist.name != f"spr-{version}.tar.gz":
        problems.append(f"named {sdist.name}, the source says version {version}")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    sources = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "src/spr").rglob("*")
        if p.suffix in CYTHON_SOURCES or p.name in ("_core.pyi", "py.typed")
    )
    for required in (*sources, "setup.py", "pyproject.toml", "README.md", "CHANGELOG.md"):
        if required not in names:
            problems.append(f"{required} is missing")
    for n in sorted(names):
        if n.endswith((*GENERATED, ".so")):
            problems.append(f"{n} should not ship")
    return problems


def main() -> int:
    dist = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist")
    wheels, sdists = sorted(dist.glob("spr-*.whl")), sorted(dist.glob("spr-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"ci/check_wheel: want one wheel and one sdist in {dist} (bash ci/build_dist.sh)")
        return 1
    version = source_version()
    failed = False
    for artefact, problems in (
        (wheels[0], check_wheel(wheels[0], version)),
        (sdists[0], check_sdist(sdists[0], version)),
    ):
        if problems:
            print(f"ci/check_wheel: {artefact.name}: " + "; ".join(problems))
            failed = True
        else:
            print(f"ci/check_wheel: {artefact.name} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
