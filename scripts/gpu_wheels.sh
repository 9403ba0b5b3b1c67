#!/usr/bin/env bash
# Fill .whl/ and .devdata/ on this machine (it reaches the package index) with what scripts/gpu_check.sh needs on the
# device machine, which reaches nothing: a wheel of every run-time dependency its python3 lacks, and the real slide the
# GPU tests read. Both folders are listed in .git/info/exclude and travel as the device run's `carry`.
#
# Usage: bash scripts/gpu_wheels.sh [PYTHON_VERSION ...]      (default 3.12; e.g. 3.11 3.12 for both)
#
# Which wheels. pyproject.toml's dependencies minus what the device image holds (its package list: torch, torchvision,
# lightning, numpy, pillow, opencv-python-headless, psutil, pyyaml, packaging, typing-extensions, onnx, onnxruntime,
# onnxscript): hydra-core, omegaconf and antlr4-python3-runtime (an sdist only: built here into a pure wheel),
# openslide-python + openslide-bin, imagecodecs, tifffile (the image has one, of unknown version), zarr with numcodecs,
# donfig and google-crc32c, shapely; and py-spy for gpu_check.sh's profile. Not openvino (~40 MiB): only
# model.runtime=openvino, a CPU runtime, imports it. Versions: those this checkout's .venv runs.
#
# Which tags. CPython X.Y (cp3Y, abi3, none) on manylinux_2_28 down to manylinux1, x86_64: the device is x86-64 Linux
# with a recent glibc, and its image's python3 is 3.12 by the device notes, which is why 3.12 is the default. That is
# read, not measured: gpu_check.sh first prints the device's sys.version and sysconfig.get_platform(), and pip's
# "Compatible tags" (pip debug --verbose) into env.txt; if those name another version, rerun this with it.
#
# Size. The device tool carries 64 MiB in all: working tree, .whl and .devdata together; this script checks it and
# fails when over. Wheels for 3.12 come to ~43 MiB (imagecodecs alone 26 MiB, one abi3 wheel for 3.11 and up); each
# further version adds its compiled wheels (numcodecs, shapely, google-crc32c: ~12 MiB), so 3.11 + 3.12 only just fit
# and 3.10 + 3.11 + 3.12 do not (nor has imagecodecs 2026.3.6 a wheel for 3.10 at all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSIONS=("${@:-3.12}")
LIMIT_BYTES=$((64 * 1024 * 1024))
PACKAGES=(hydra-core omegaconf openslide-python openslide-bin imagecodecs tifffile zarr numcodecs donfig google-crc32c
  shapely)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.devdata/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl .devdata
for version in "${VERSIONS[@]}"; do
  echo "== wheels for CPython $version"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$version" \
    "${PLATFORMS[@]}" -d .whl "${pins[@]}" py-spy
done
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
{
  printf '%s\n' "${pins[@]}" antlr4-python3-runtime==4.9.3
  ls .whl | sed -n 's/^py_spy-\([^-]*\)-.*/py-spy==\1/p' | head -1
} >.whl/requirements.txt

slides=${WSISEG_SHARED_SLIDES:-../shared/slides}
cp -f "$slides/CMU-1-Small-Region.svs" .devdata/  # the real Aperio slide of tests/test_gpu.py and the nvJPEG tests

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .devdata | tail -1 | cut -f1)
total=$((tree + carried))
ls -l .whl .devdata
echo "carried: working tree $((tree / 1024)) KiB + .whl and .devdata $((carried / 1024)) KiB = $((total / 1024)) KiB" \
  "of $((LIMIT_BYTES / 1024)) KiB"
if ((total > LIMIT_BYTES)); then
  echo "FAILED: more than the device tool's 64 MiB; download fewer Python versions than: ${VERSIONS[*]}"
  exit 1
fi
