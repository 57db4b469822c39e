#!/bin/sh
# Build pglogrepl_bridge's wheel, with the C accelerator, from a source tree that may be
# read-only (a bind mount, a CI checkout): the Dockerfile's builder stage runs exactly this,
# and tests/test_docker.py runs it on a read-only copy of the repository.
#
#   sh container/build-wheel.sh SOURCE_DIR WHEEL_DIR
set -eu
src=$1
out=$2
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# setuptools writes egg-info and build/ into the tree it builds: build from a copy
(cd "$src" && tar --exclude=./.venv --exclude=./.git --exclude=./build \
    --exclude='*.egg-info' --exclude='__pycache__' -cf - .) | (cd "$work" && tar -xf -)
chmod -R u+w "$work"  # the copy keeps the source's modes: make it ours to write
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$work"
# the extension is optional for pip; for the image it is not
"$python" - "$out" <<'PY'
import glob, sys, zipfile
wheels = glob.glob(f"{sys.argv[1]}/pglogrepl_bridge-*.whl")
assert len(wheels) == 1, wheels
names = zipfile.ZipFile(wheels[0]).namelist()
if not any(n.startswith("pglogrepl_bridge/pgoutput/_fastrow") and n.endswith(".so") for n in names):
    sys.exit(f"{wheels[0]}: the C accelerator was not built (a compiler and Python headers?)")
print(wheels[0])
PY
