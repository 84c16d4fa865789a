#!/usr/bin/env bash
# make demo: the main job on the embedded CIFAR-10 subset, on CPU, from the given networks shipped
# in the package (the ResNet-8 f, its noise-trained copy, the small DnCNN; make given makes them):
#   1. the rejector heads for f and D (4 epochs, T = 2, the threshold chosen on validation draws),
#      then, in the same job, f_R and its denoised baseline certified in one pass (the same
#      draws) and the noise-trained f (randomized smoothing) on the first IMAGES test images
#   2. the report: tables with 95 % intervals, the paired comparison, per-class views, curves
# SIGMA=0.5 for the other given noise level; make demo-full trains f and D too.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
SIGMA=${SIGMA:-0.25}
IMAGES=${IMAGES:-100}
N=${N:-1000}
REJ_EPOCHS=${REJ_EPOCHS:-4}
REJ_T=${REJ_T:-2}

times=()
step() { local now; now=$(date +%s)
         [[ -n "${name:-}" ]] && times+=("$name: $(( now - last )) s")
         name=${1%% *}; last=$now; echo; echo "=== $* ==="; }
start=$(date +%s)
rm -rf "$OUT/runs/rejector"  # a fresh run: its certification then starts from its own files

step "1/2 rejector heads for the given f and D (sigma=$SIGMA, T=$REJ_T), then certification of" \
     "f_R, its denoised baseline (one pass) and randomized smoothing: $IMAGES test images, N=$N"
"$PY" train.py experiment=demo "sigma=$SIGMA" optim=adam "optim.epochs=$REJ_EPOCHS" "T=$REJ_T" \
    certify=quick "certify.systems=[rejection,denoised,plain]" "certify.N=$N" \
    "certify.max=$IMAGES" "hydra.run.dir=$OUT/runs/rejector"

step "2/2 report: tables with 95 % intervals, the paired comparison, per-class views, the curves"
"$PY" -m dsr_lightning.reports "$OUT/runs" --out "$OUT/report"
step "done"
echo "demo finished in $(( $(date +%s) - start )) s (${times[*]})"
echo "results:  $OUT/runs/rejector/results/*.tsv (one row per image; settings in *.tsv.json)"
echo "report:   $OUT/report/report.md, $OUT/report/certified_accuracy.png, $OUT/report/counts_*.png"
echo "training: $OUT/runs/rejector/ (checkpoints, csv metrics, the rejector's ROC in roc.png)"
echo "next (the commands are in $(dirname "$PY"): source $(dirname "$PY")/activate):"
echo "  dsr-certify rejector_ckpt=$OUT/runs/rejector/checkpoints/best.ckpt max=100 N=10000"
echo "  dsr-report $OUT/runs"
