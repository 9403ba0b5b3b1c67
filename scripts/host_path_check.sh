#!/usr/bin/env bash
# The host path's figures (issue 27) on this machine, CPU only: what a GPU host spends around the network.
#   bash scripts/host_path_check.sh [OUT]        (default OUT=outputs/host_path; inputs are generated once in OUT)
# 1. wsiseg-bench's host_bound case (zero-cost network over the real reader, writer and stitcher) at 512 px tiles,
#    output_downsample 1, overlap 0 and overlap 256 (gaussian); workers read with OpenSlide as on a GPU host, so the
#    main thread's figure is the loop and the hand-over, not decoding. The geometry probe (a 1x1 convolution) stands in
#    for the bench's own model: its optimised case is host-bound too.
# 2. A 98,000 x 4,096 strip at output_downsample 1, overlap 256, gaussian: report.json's store figures (0 reloads)
#    and the process tree's peak RSS (/usr/bin/time -v).
# 3. Four slides in one run with the writer's threads (blend + finalise, as on GPUs): summary.json's blocked_s
#    against the run's wall time.
set -euo pipefail
OUT=${1:-outputs/host_path}
BIN=$(dirname "${PY:-.venv/bin/python}")
mkdir -p "$OUT"
HOST=(model=probe trainer=cpu data.patch_size=512 data.num_workers=1 data.reader=openslide trainer.enable_progress_bar=false)

for overlap in 0 256; do
  run="$OUT/bench_overlap$overlap"
  rm -rf "$run"
  "$BIN/wsiseg-bench" "${HOST[@]}" data.overlap=$overlap writer.blend=gaussian bench.generated_size=16384 \
    bench.max_tiles=1024 bench.naive_tiles=16 bench.peers=false "hydra.run.dir=$run" > "$run.log" 2>&1
  grep -E "^host_bound|^optimised" "$run.log"
  "$BIN/python" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['cases']['host_bound']))" \
    "$run/bench.json"
done

strip="$OUT/strip_98000x4096.tif"
[ -e "$strip" ] || "$BIN/wsiseg-synth" "$strip" --width 98000 --height 4096 --seed 5 --tissue-blobs 24 --tissue-scale 0.9
run="$OUT/strip"
rm -rf "$run"
/usr/bin/time -v "$BIN/wsiseg-predict" "${HOST[@]}" data.overlap=256 writer.blend=gaussian writer.blend_thread=true \
  "data.slides=$strip" "hydra.run.dir=$run" > "$run.log" 2>&1
grep -E "Maximum resident set size|Elapsed" "$run.log"
"$BIN/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print('strip', r['status'], r['tiles_processed'], \
'tiles, store', r['store'])" "$run/strip_98000x4096/report.json"

slides=()
for i in 1 2 3 4; do
  s="$OUT/cohort_$i.tif"
  [ -e "$s" ] || "$BIN/wsiseg-synth" "$s" --width 8192 --height 8192 --seed $((40 + i)) --tissue-scale 0.4
  slides+=("$s")
done
run="$OUT/cohort"
rm -rf "$run"
list=$(IFS=,; echo "${slides[*]}")
start=$(date +%s.%N)
"$BIN/wsiseg-predict" "${HOST[@]}" data.overlap=0 writer.blend_thread=true "data.slides=[$list]" "hydra.run.dir=$run" \
  > "$run.log" 2>&1
end=$(date +%s.%N)
"$BIN/python" -c "
import json, sys
s = json.load(open(sys.argv[1]))
rank = s['ranks'][0]
run = rank['done_at'] - rank['start_at']
print(f\"4 slides: {rank['tiles']} tiles, blocked {rank['blocked_s']} s of {run:.1f} s ({rank['blocked_s'] / run:.1%}), \"
      f\"finalise {rank['finalise_s']} s, stitch CPU {rank['stitch_cpu_s']} s; process wall {float(sys.argv[3]) - float(sys.argv[2]):.1f} s\")
" "$run/summary.json" "$start" "$end"
