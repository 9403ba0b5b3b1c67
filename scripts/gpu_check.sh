#!/usr/bin/env bash
# Every GPU check and benchmark in one call (the device machine: no network, its own python3 with torch/lightning).
# The timeouts inside add up to ~540 s: run it with the device's 600 s per-call limit.
# Usage there: bash scripts/gpu_check.sh   (wheels for the missing packages in .whl/, a real slide in .devdata/)
# Figures land in $OUT (or ./gpu_out): gpu_tests.log, bench_*.json, bench.log, predict_profile.txt + profile_summary.txt.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  tar -xzf .whl/antlr4-python3-runtime-4.9.3.tar.gz -C /tmp && export PYTHONPATH=/tmp/antlr4-python3-runtime-4.9.3/src
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD:$PYTHONPATH
fi
export WSISEG_SHARED_SLIDES=${WSISEG_SHARED_SLIDES:-$PWD/.devdata}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, lightning, onnxruntime, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'lightning', lightning.__version__, 'hydra', hydra.__version__, 'ort', onnxruntime.__version__)"; nproc; } | tee "$OUT/env.txt"

date
# 1. GPU tests (fp16+compile vs fp32, a real CUDA OOM, GPU predict vs CPU fp32, batch_size=auto)
timeout 110 python3 -m pytest -q -s -rA -m gpu tests/test_gpu.py tests/data/test_jpeg_tiles.py -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1
grep -E "fp16 compiled|chunk after|GPU 16-mixed|batch_size=auto|nvjpeg|mean|passed|failed|^E " "$OUT/gpu_tests.log" | head -40

date
# 2. Benchmark: the users' 31M-parameter U-Net (random weights), 512 px tiles, 16-mixed, channels_last
bench() {
  timeout "$1" python3 -m wsiseg.bench model=unet_camelyon model.checkpoint=random trainer=gpu \
    data.patch_size=512 data.overlap=256 data.batch_size=32 data.num_workers=15 bench.generated_size=12288 \
    bench.max_tiles=2048 bench.naive_tiles=128 bench.model_batches=32 hydra.run.dir=/tmp/bench_$2 "${@:3}" > "$OUT/bench_$2.log" 2>&1
  grep -E -A9 "^case" "$OUT/bench_$2.log" || tail -5 "$OUT/bench_$2.log"
  cp /tmp/bench_$2/bench.json "$OUT/bench_$2.json" 2>/dev/null
}
# 24576² generated slide, overlap 256: ~3,600 tissue tiles, so fixed costs (workers, writing the mask) weigh little
bench 180 compiled model.compile=true bench.generated_size=24576 bench.max_tiles=6000 | tee "$OUT/bench.log"
slide=/tmp/bench_compiled/bench_slide.tif; [ -f $slide ] || slide=null
bench 100 gpu_jpeg model.compile=true data.reader=gpu_jpeg bench.slide=$slide | tee -a "$OUT/bench.log"
bench 45 eager model.compile=false bench.slide=$slide bench.max_tiles=512 bench.naive_tiles=32 | tee -a "$OUT/bench.log"
date
# 3. Where the end-to-end time goes: py-spy over a whole compiled wsiseg-predict run of the same slide
if [ -x /tmp/site/bin/py-spy ] && [ -f "$slide" ]; then
  # main process only (workers are timed by the read bound); --idle shows where the loop waits (data, blend queue)
  timeout 100 /tmp/site/bin/py-spy record --threads --idle --format raw -r 100 -o "$OUT/predict_profile.txt" -- \
    python3 -m wsiseg.predict model=unet_camelyon model.checkpoint=random trainer=gpu model.compile=true \
    data.slides="[$slide]" data.patch_size=512 data.overlap=256 data.batch_size=32 data.num_workers=15 \
    trainer.enable_progress_bar=false hydra.run.dir=/tmp/profile_run > "$OUT/profile_run.log" 2>&1
  grep -E "tiles in" "$OUT/profile_run.log"
  python3 scripts/profile_summary.py "$OUT/predict_profile.txt" | tee "$OUT/profile_summary.txt" | head -40
fi
date
