#!/usr/bin/env bash
# The rejector ablation of the README on the demo's networks at one sigma: denoised smoothing
# against the rejection system with the threshold at 0 and chosen for certification (auto), for
# each rejector training variant; then the report. Uses the given networks shipped in the package
# (ROOT=<folder> for others: the classifier and denoiser for SIGMA are trained there first where
# they are missing). CPU, about 12 minutes per sigma.
#   SIGMA=0.5 bash scripts/ablation.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
SIGMA=${SIGMA:-0.25}
REJ_EPOCHS=${REJ_EPOCHS:-4}
REJ_T=${REJ_T:-2}
# name:overrides (comma-separated) of the rejector's loss; each is certified at threshold 0 and auto
VARIANTS=${VARIANTS:-"bce:rejector.pos_weight=1 pos0.5:rejector.pos_weight=0.5 \
correct3:rejector.pos_weight=1,rejector.correct_weight=3 focal2:rejector.pos_weight=1,rejector.focal_gamma=2"}

s=$("$PY" -c "print(f'{float($SIGMA):.2f}')")
ROOT=${ROOT:-$("$PY" -c "from dsr_lightning.config import given; print(given())")}
AB="$OUT/ablation_s$s"
common=(experiment=demo "sigma=$SIGMA" "pretrained_root=$ROOT")
step() { echo; echo "=== $* ==="; }
start=$(date +%s)

if [ ! -f "$ROOT/cifar10_classifiers/ResNet8/noise_0.00/checkpoint.pth.tar" ]; then
  step "classifier f"
  "$PY" train.py stage=classifier "${common[@]}" optim.epochs=15 "hydra.run.dir=$OUT/runs/classifier"
fi
if [ ! -f "$ROOT/trained_denoisers/cifar10/mse_obj/dncnn_tiny/noise_$s/checkpoint.pth.tar" ]; then
  step "denoiser D (sigma=$SIGMA)"
  "$PY" train.py stage=denoiser "${common[@]}" optim.epochs=3 "hydra.run.dir=$OUT/runs/denoiser_s$s"
fi

cert=("${common[@]}" "outdir=$AB/results")
step "denoised smoothing (sigma=$SIGMA)"
"$PY" certify.py system=denoised "${cert[@]}" "hydra.run.dir=$AB/runs/certify_denoised"

for v in $VARIANTS; do
  name=${v%%:*}; opts=${v#*:}; opts=${opts//,/ }
  step "rejector $name ($opts), threshold=auto"
  "$PY" train.py "${common[@]}" optim=adam "optim.epochs=$REJ_EPOCHS" "T=$REJ_T" \
      rejector.threshold=auto $opts "hydra.run.dir=$AB/runs/rejector_$name"
  ckpt="$AB/runs/rejector_$name/checkpoints/best.ckpt"
  for t in 0 auto; do
    extra=(); [ "$t" = 0 ] && extra=(threshold=0)
    "$PY" certify.py system=rejection "rejector_ckpt=$ckpt" "${cert[@]}" "${extra[@]}" \
        "outfile=$AB/results/rejection_${name}_t${t}.tsv" "hydra.run.dir=$AB/runs/certify_${name}_t$t"
  done
  "$PY" -m dsr_lightning.threshold "$ckpt" > "$AB/threshold_$name.txt"
done

"$PY" -m dsr_lightning.reports "$AB/results" --out "$AB/report"
echo
echo "ablation (sigma=$SIGMA) finished in $(( $(date +%s) - start )) s: $AB/report/report.md"
