#!/usr/bin/env bash
# Usage: bash scripts/api_vs_cli.sh   (SLIDE=... to choose the slide; outputs under outputs/api_vs_cli/)
# CLI vs Python API on the same slide and options, interleaved: each run's slide patches/s from its report.json
cd "$(dirname "$0")/.."
SLIDE=${SLIDE:-../shared/slides/CMU-1-Small-Region.svs}
OPTS_CLI="model=demo trainer=cpu data.patch_size=256 data.num_workers=0 trainer.enable_progress_bar=false"
for i in 1 2 3; do
  rm -rf outputs/api_vs_cli/cli$i outputs/api_vs_cli/api$i
  s=$(date +%s.%N); .venv/bin/wsiseg-predict $OPTS_CLI data.slides=$SLIDE hydra.run.dir=outputs/api_vs_cli/cli$i > /dev/null 2>&1; e=$(date +%s.%N)
  echo "cli$i wall $(echo "$e - $s" | bc) $(python3 -c "import json,glob;r=json.load(open(glob.glob('outputs/api_vs_cli/cli$i/*/report.json')[0]));print(r['tiles_processed'],'tiles',r['patches_per_s'],'patches/s')")"
  s=$(date +%s.%N); .venv/bin/python -c "
import wsiseg
wsiseg.Segmenter('demo', device='cpu', overrides={'data.patch_size': 256, 'data.num_workers': 0, 'trainer.enable_progress_bar': False}).predict_slides('$SLIDE', 'outputs/api_vs_cli/api$i')" > /dev/null 2>&1; e=$(date +%s.%N)
  echo "api$i wall $(echo "$e - $s" | bc) $(python3 -c "import json,glob;r=json.load(open(glob.glob('outputs/api_vs_cli/api$i/*/report.json')[0]));print(r['tiles_processed'],'tiles',r['patches_per_s'],'patches/s')")"
done
