#!/usr/bin/env bash
# Every GPU check and benchmark in one call, on the device machine (one GPU, 16 cores, python3 with torch/lightning,
# no network). First, here: bash scripts/gpu_wheels.sh (fills .whl/ and .devdata/, which the run carries).
# Usage there: bash scripts/gpu_check.sh            Here, without a GPU, it runs what needs none and skips the rest.
#
# Steps, each with a time limit; together they fit GPU_CHECK_BUDGET (default 540 s, the device allows 600 s a call):
#  1. environment: python version and platform, pip's compatible tags, GPU (env.txt); wheels from .whl/ if missing;
#  2. 16 generated JPEG-tiled slides (14,336² px each, ~23,000 tissue tiles of 512 px at overlap 256), made there;
#  3. main benchmark, steady state: every tile of those slides, data.reader=auto (JPEG tiles, nvJPEG), overlap 256,
#     output_downsample 1, compiled, the defaults for batch and workers, bench.host_bound=true; nvidia-smi dmon samples
#     the GPU meanwhile; fails under 20,000 tiles;
#  4. the GPU tests (sync debug mode: a CUDA synchronisation in the per-batch path fails them);
#  5. more benchmarks on 6,000 tiles: data.reader=openslide at the main settings; auto and openslide at overlap 0 with
#     output_downsample 4;
#  6. py-spy over a whole wsiseg-predict run of 3 slides (stopped with SIGINT at its limit, the profile kept).
# Every run counts torch.compile's recompilations (TORCH_LOGS=recompiles).
#
# $OUT (or /tmp/gpu_check/out) gets at most 8 files (the device returns no more), each updated as soon as its step ends, so a
# timeout keeps the earlier figures: env.txt, summary.txt (this output), tests.log, bench.jsonl (one bench.json per
# run), runs.log (the runs' logs), dmon.txt, profile.txt.gz (py-spy raw), profile_summary.txt.
# Each failed step prints a "FAILED: <step> (<why>)" line; the exit status is 1 if any step failed, else 0 (a step
# skipped for want of a GPU is not a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=/tmp/gpu_check        # run folders; kept on a warm machine between calls
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$SECONDS
GEN=/tmp/gpu_check_slides  # the generated slides (too large to carry)
mkdir -p "$WORK" "$GEN"
export PYTHONUNBUFFERED=1
export WSISEG_SHARED_SLIDES=${WSISEG_SHARED_SLIDES:-$PWD/.devdata}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
: >"$OUT/runs.log"
FAILED=()
SKIPPED=0
say() { echo "$*" | tee -a "$SUMMARY"; }
fail() {
  FAILED+=("$1")
  say "FAILED: $1${2:+ ($2)}"
}
skip() {
  SKIPPED=$((SKIPPED + 1))
  say "SKIPPED (no CUDA GPU): $1"
}
left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME LIMIT MIN LOG CMD...: run CMD with LIMIT seconds (less if the budget has less left, FAILED if under MIN);
# FAILED unless it exits 0. Its output goes to LOG.
step() {
  local name=$1 limit=$2 min=$3 log=$4 rc t0=$SECONDS budget
  shift 4
  budget=$(left)
  if ((budget < min)); then
    fail "$name" "not started: ${budget} s left of the ${BUDGET} s budget, it needs ${min}"
    return 1
  fi
  ((limit > budget)) && limit=$budget
  say "== $name (limit ${limit} s, at $((SECONDS - START)) s)"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    fail "$name" "timed out after ${limit} s; log in $(basename "$log")"
  elif ((rc != 0)); then
    fail "$name" "exit status $rc; log in $(basename "$log")"
  else
    say "ok: $name in $((SECONDS - t0)) s"
  fi
  return "$rc"
}

# -- 1. environment ----------------------------------------------------------------------------------------------
{
  "$PY" -c 'import sys,sysconfig;print(sys.version, sysconfig.get_platform())'
  "$PY" -m pip debug --verbose 2>/dev/null | grep -A3 'Compatible tags'
  echo "cores: $(nproc)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
} | tee "$OUT/env.txt"

MODULES="hydra, omegaconf, openslide, imagecodecs, tifffile, zarr, shapely, cv2, psutil, lightning, torchvision"
if "$PY" -c "import $MODULES" 2>/dev/null; then
  say "wheels: not needed ($PY imports every run-time dependency)"
elif [ -f .whl/requirements.txt ]; then
  step "install .whl/" 90 10 "$OUT/env.txt" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --find-links .whl --target /tmp/site -r .whl/requirements.txt
  export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH
else
  fail "run-time dependencies" "$PY cannot import them and .whl/ is missing: bash scripts/gpu_wheels.sh, then carry .whl"
fi
"$PY" -c "import wsiseg.predict, wsiseg.bench.command; import torch, lightning, torchvision, hydra, tifffile, imagecodecs
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__,
      'lightning', lightning.__version__, 'hydra', hydra.__version__, 'tifffile', tifffile.__version__,
      'imagecodecs', imagecodecs.__version__)" 2>&1 | tee -a "$OUT/env.txt" | tail -1 || fail "import wsiseg"

GPU=0
if command -v nvidia-smi >/dev/null && "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  GPU=1
fi

# -- 2. slides -----------------------------------------------------------------------------------------------------
SIDE=14336
COUNT=16
if ((GPU == 0)); then  # only the generator is checked: one small slide
  SIDE=2048
  COUNT=1
  GEN=$WORK/check_slides
fi
seq 0 $((COUNT - 1)) >"$WORK/seeds"
step "generate $COUNT slides of ${SIDE}x${SIDE} px" 100 30 "$OUT/runs.log" xargs -P "$(nproc)" -I{} -a "$WORK/seeds" \
  "$PY" -m wsiseg.data.synthetic "$GEN/slide{}.tif" --width $SIDE --height $SIDE --seed {} --tissue-scale 0.3 \
  --skip-existing
say "slides: $(ls "$GEN"/*.tif 2>/dev/null | wc -l) in $GEN, $(du -sh "$GEN" | cut -f1)"

# -- benchmark runs --------------------------------------------------------------------------------------------------
# bench NAME LIMIT MIN OVERRIDES...: one wsiseg-bench run; its bench.json is appended to bench.jsonl and its figures
# and recompilations to the summary as soon as it ends.
HOST_BOUND=bench.host_bound=true
grep -q "host_bound:" conf/bench.yaml || {
  fail "bench.host_bound" "not in conf/bench.yaml: the main run goes without the host-bound case"
  HOST_BOUND=
}
BENCH_COMMON=(model=unet_camelyon model.checkpoint=random trainer=gpu model.compile=true data.patch_size=512
  "bench.slide=$GEN/*.tif" bench.peers=false bench.model_batches=32)
bench() {
  local name=$1 limit=$2 min=$3 log=$WORK/$1.log
  shift 3
  rm -rf "${WORK:?}/bench_$name" "$log"
  step "bench $name" "$limit" "$min" "$log" env TORCH_LOGS=recompiles "$PY" -m wsiseg.bench "${BENCH_COMMON[@]}" "$@" \
    "hydra.run.dir=$WORK/bench_$name"
  local rc=$?
  { echo "===== bench $name: $*"; cat "$log"; } >>"$OUT/runs.log"
  say "recompiles ($name): $(grep -c "Recompiling function" "$log")"
  if [ -f "$WORK/bench_$name/bench.json" ]; then
    "$PY" - "$WORK/bench_$name/bench.json" "$name" >>"$OUT/bench.jsonl" 2>>"$SUMMARY" <<'EOF'
import json, sys
print(json.dumps({"run": sys.argv[2], **json.load(open(sys.argv[1]))}))
EOF
    "$PY" - "$WORK/bench_$name/bench.json" "$name" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import json, sys
report, name = json.load(open(sys.argv[1])), sys.argv[2]
s = report["settings"]
rates = {k: (v or {}).get("patches_per_s") for k, v in report["cases"].items()}
print(f"{name}: {s['tiles']} tiles, reader {s['reader']} -> {s['reader_used']}, batch {s['batch_size']}, "
      f"{s['num_workers']} workers; patches/s " + ", ".join(f"{k} {v}" for k, v in rates.items()))
EOF
  else
    grep -E "Error|error:" "$log" | tail -3 | tee -a "$SUMMARY"
  fi
  return "$rc"
}

if ((GPU == 0)); then
  for what in "main benchmark (steady state, ~23,000 tiles, data.reader=auto, overlap 256, output_downsample 1)" \
    "nvidia-smi dmon during the main benchmark" "GPU tests (pytest -m gpu, sync debug mode)" \
    "benchmarks on 6,000 tiles: openslide / auto+overlap 0+output_downsample 4 / openslide+overlap 0+downsample 4" \
    "py-spy profile of wsiseg-predict"; do
    skip "$what"
  done
else
  # -- 3. main benchmark, steady state, with the GPU sampled ------------------------------------------------------
  nvidia-smi dmon -s pucm -d 1 -o T >"$OUT/dmon.txt" 2>&1 &
  DMON=$!
  bench main 210 120 data.reader=auto data.overlap=256 writer.output_downsample=1 bench.max_tiles=1000000 \
    bench.naive_tiles=128 $HOST_BOUND
  kill "$DMON" 2>/dev/null
  wait "$DMON" 2>/dev/null
  "$PY" - "$OUT/dmon.txt" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import os, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()] if os.path.exists(sys.argv[1]) else []
header = next((r[1:] if r[0] == "#" else [r[0][1:], *r[1:]] for r in rows if r[0].startswith("#")), None)
data = [r for r in rows if not r[0].startswith("#")]
if not header or not data:
    print("dmon: no samples")
else:
    for col in ("sm", "mem", "jpg", "pwr"):
        if col in header:
            values = [float(r[header.index(col)]) for r in data if r[header.index(col)].replace(".", "").isdigit()]
            if values:
                busy = [v for v in values if v > 0]
                print(f"dmon {col}: mean {sum(values) / len(values):.1f}, mean while > 0 "
                      f"{sum(busy) / max(1, len(busy)):.1f}, max {max(values):.0f} ({len(values)} samples)")
EOF
  tiles=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['settings']['tiles'])" \
    "$WORK/bench_main/bench.json" 2>/dev/null || echo 0)
  ((tiles >= 20000)) || fail "steady state" "the main benchmark ran ${tiles} tiles, fewer than 20,000"

  # -- 4. GPU tests ------------------------------------------------------------------------------------------------
  step "GPU tests" 130 60 "$OUT/tests.log" "$PY" -m pytest -q -rA -m gpu tests/test_gpu.py tests/data/readers/test_jpeg_decode.py \
    -p no:cacheprovider
  grep -E "fp16 compiled|chunk after|GPU 16-mixed|batch_size=auto|nvJPEG|synchronising|passed|failed|^E |^ERROR" \
    "$OUT/tests.log" | head -40 | tee -a "$SUMMARY"

  # -- 5. the other readers and geometries ---------------------------------------------------------------------------
  SMALL=(bench.max_tiles=6000 bench.naive_tiles=64 bench.host_bound=false)
  [ -n "$HOST_BOUND" ] || SMALL=("${SMALL[@]:0:2}")
  bench openslide 75 40 data.reader=openslide data.overlap=256 writer.output_downsample=1 "${SMALL[@]}"
  bench auto_ov0_ds4 75 40 data.reader=auto data.overlap=0 writer.output_downsample=4 "${SMALL[@]}"
  bench openslide_ov0_ds4 75 40 data.reader=openslide data.overlap=0 writer.output_downsample=4 "${SMALL[@]}"

  # -- 6. where the end-to-end time goes ----------------------------------------------------------------------------
  PYSPY=$(command -v py-spy || true)
  if [ -z "$PYSPY" ]; then
    fail "py-spy profile" "py-spy not found (it comes in .whl/)"
  elif (($(left) < 40)); then
    fail "py-spy profile" "not started: $(left) s left of the ${BUDGET} s budget, it needs 40"
  else
    limit=$(($(left) < 70 ? $(left) : 70))
    say "== py-spy profile (limit ${limit} s, at $((SECONDS - START)) s)"
    # SIGINT at the limit reaches py-spy and the run (timeout signals its process group): py-spy writes the profile.
    # Main process only (workers are timed by the read bound); --idle shows where the loop waits.
    rm -rf "$WORK/profile_run" "$WORK/profile.txt"
    timeout -s INT -k 15 "$limit" env TORCH_LOGS=recompiles "$PYSPY" record --threads --idle --format raw -r 100 \
      -o "$WORK/profile.txt" -- "$PY" -m wsiseg.predict model=unet_camelyon model.checkpoint=random trainer=gpu \
      model.compile=true "data.slides=[$GEN/slide0.tif,$GEN/slide1.tif,$GEN/slide2.tif]" data.patch_size=512 \
      data.overlap=256 trainer.enable_progress_bar=false "hydra.run.dir=$WORK/profile_run" >"$WORK/profile.log" 2>&1
    rc=$?
    { echo "===== py-spy profile run (exit $rc)"; cat "$WORK/profile.log"; } >>"$OUT/runs.log"
    grep -E "tiles in" "$WORK/profile.log" | tail -3 | tee -a "$SUMMARY"
    say "recompiles (profile run): $(grep -c "Recompiling function" "$WORK/profile.log")"
    # py-spy exits 0 whatever the run's status: the run finished only if it reported its slides
    if ((rc == 124)); then
      say "py-spy profile: run stopped at ${limit} s; the profile covers it up to there"
    elif ((rc != 0)) || ! grep -q "tiles in" "$WORK/profile.log"; then
      fail "profiled wsiseg-predict run" "exit $rc, no slide reported; log in runs.log"
    fi
    if [ -s "$WORK/profile.txt" ]; then
      "$PY" scripts/profile_summary.py "$WORK/profile.txt" >"$OUT/profile_summary.txt" 2>&1 ||
        fail "profile summary" "scripts/profile_summary.py failed"
      gzip -c "$WORK/profile.txt" >"$OUT/profile.txt.gz"  # raw stacks: megabytes; the device returns 16 MiB a file
      head -25 "$OUT/profile_summary.txt"
    else
      fail "py-spy profile" "no profile written (exit $rc); log in runs.log"
    fi
  fi
fi

say "== done in $((SECONDS - START)) s"
if ((${#FAILED[@]})); then
  say "FAILED steps (${#FAILED[@]}): ${FAILED[*]}"
  exit 1
fi
say "every step passed$( ((SKIPPED)) && echo " (${SKIPPED} skipped: no CUDA GPU)")"
exit 0
