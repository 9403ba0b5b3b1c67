#!/usr/bin/env bash
# TTA cost: the same slide and settings, model.tta none / flips / dihedral, interleaved twice; report.json patches/s
exec bash "$(dirname "$0")/option_cost.sh" model.tta none flips dihedral
