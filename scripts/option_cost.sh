#!/usr/bin/env bash
# What one option costs: the same generated slide and settings run with each value of KEY, interleaved twice; prints
# report.json's tiles, seconds and patches/s per run.
#   bash scripts/option_cost.sh model.tta none flips dihedral
#   SLIDE=bench_slide.tif PATCH=512 EXTRA= bash scripts/option_cost.sh data.stain none macenko reinhard
cd "$(dirname "$0")/.."
KEY=$1; shift
SLIDE=${SLIDE:-outputs/option_cost/slide.tif}
MODEL=${MODEL:-model=demo}
PATCH=${PATCH:-256}
EXTRA=${EXTRA-model.compile=false model.runtime=torch}  # other overrides (EXTRA= : the defaults)
mkdir -p outputs/option_cost
NAME=$(basename "$SLIDE"); NAME=${NAME%%.*}
[ -e "$SLIDE" ] || .venv/bin/wsiseg-synth "$SLIDE" --width 6144 --height 4096 --seed 21 >/dev/null
for rep in 1 2; do
  for value in "$@"; do
    out=outputs/option_cost/${KEY}_$value.$rep; rm -rf "$out"
    # shellcheck disable=SC2086
    .venv/bin/wsiseg-predict $MODEL trainer=cpu data.slides="$SLIDE" data.patch_size=$PATCH $EXTRA \
      "$KEY=$value" hydra.run.dir="$out" trainer.enable_progress_bar=false > "$out.log" 2>&1
    .venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['tiles_processed'], r['wall_time_s'], r['patches_per_s'])" "$out/$NAME/report.json" "$KEY=$value"
  done
done
