#!/usr/bin/env bash
# The README's "Sweeps and dashboards" example on the embedded subset: rejectors for sigma in
# {0.25, 0.5} x T in {1, 2}, each certified in its job (certify=quick) with its denoised baseline,
# on one W&B group (offline), then the report of the whole sweep. Uses the given networks shipped in
# the package for both sigmas (ROOT=<folder> for others). CPU, about 20 minutes.
set -euo pipefail
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-$("$PY" -c "from dsr_lightning.config import given; print(given())")}
SWEEP=${SWEEP:-outputs/sweep_demo}
start=$(date +%s)
"$PY" train.py -m experiment=demo sigma=0.25,0.5 T=1,2 optim=adam optim.epochs=4 \
    certify=quick logger=wandb "pretrained_root=$ROOT" "hydra.sweep.dir=$SWEEP" "$@"
"$PY" -m dsr_lightning.reports "$SWEEP" --radii 0 0.25 0.5 0.75
echo "sweep and report finished in $(( $(date +%s) - start )) s: $SWEEP/report/report.md"
