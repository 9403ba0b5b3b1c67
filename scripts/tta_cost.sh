#!/usr/bin/env bash
# TTA cost: the same slide and settings, model.tta none / flips / dihedral, interleaved twice; report.json patches/s
cd "$(dirname "$0")/.."
SLIDE=${1:-outputs/tta/tta.tif}
mkdir -p outputs/tta
NAME=$(basename "$SLIDE"); NAME=${NAME%%.*}
[ -e "$SLIDE" ] || .venv/bin/wsiseg-synth "$SLIDE" --width 6144 --height 4096 --seed 21 >/dev/null
for rep in 1 2; do
  for tta in none flips dihedral; do
    out=outputs/tta/$tta.$rep; rm -rf $out
    .venv/bin/wsiseg-predict model=demo trainer=cpu data.slides="$SLIDE" data.patch_size=256 model.compile=false \
      model.runtime=torch model.tta=$tta hydra.run.dir=$out trainer.enable_progress_bar=false > $out.log 2>&1
    .venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['tiles_processed'], r['wall_time_s'], r['patches_per_s'])" "$out/$NAME/report.json" $tta
  done
done
