#!/usr/bin/env bash
# make demo-full: the whole pipeline on the embedded CIFAR-10 subset, on CPU, at sigma = 0.25,
# training the classifiers and the denoiser too (make demo starts from the given ones):
#   1. a classifier f (ResNet-8), and a Gaussian-augmented one for the randomized-smoothing baseline
#   2. a denoiser D (small DnCNN, MSE objective)
#   3. the rejector heads (the main job)
#   4. certification of the three systems (rejection, denoised, plain) on the first IMAGES test
#      images with N draws, then the comparison table and the curves.
# Sizes are set for a 2-core machine (about 5 minutes); override with the variables below.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo_full}
SIGMA=${SIGMA:-0.25}
IMAGES=${IMAGES:-100}
N=${N:-1000}
CLF_EPOCHS=${CLF_EPOCHS:-15}
DEN_EPOCHS=${DEN_EPOCHS:-3}
REJ_EPOCHS=${REJ_EPOCHS:-4}
REJ_T=${REJ_T:-2}

common=(experiment=demo "sigma=$SIGMA" "pretrained_root=$OUT/pretrained_models" overwrite=true)
times=()
step() { local now; now=$(date +%s)
         [[ -n "${name:-}" ]] && times+=("$name: $(( now - last )) s")
         name=${1%% *}; last=$now; echo; echo "=== $* ==="; }
start=$(date +%s)

step "1/4 classifier f (clean) and f_noise (sigma=$SIGMA, for the randomized-smoothing baseline)"
"$PY" train.py stage=classifier "${common[@]}" "optim.epochs=$CLF_EPOCHS" \
    "hydra.run.dir=$OUT/runs/classifier"
"$PY" train.py stage=classifier "${common[@]}" "optim.epochs=$CLF_EPOCHS" \
    "classifier.noise_sd=$SIGMA" "hydra.run.dir=$OUT/runs/classifier_noise"

step "2/4 denoiser D (MSE)"
"$PY" train.py stage=denoiser "${common[@]}" "optim.epochs=$DEN_EPOCHS" \
    "hydra.run.dir=$OUT/runs/denoiser"

step "3/4 rejector heads (T=$REJ_T; the threshold chosen for certification at N=$N)"
"$PY" train.py "${common[@]}" optim=adam "optim.epochs=$REJ_EPOCHS" "T=$REJ_T" "certify.N=$N" \
    "hydra.run.dir=$OUT/runs/rejector"

step "4/4 certification: $IMAGES test images, N=$N"
cert=(experiment=demo "sigma=$SIGMA" "pretrained_root=$OUT/pretrained_models" "N=$N" N0=100
      "max=$IMAGES" "outdir=$OUT/results")  # batch 100, NHWC: experiment=demo's certify node
"$PY" certify.py system=rejection "rejector_ckpt=$OUT/runs/rejector/checkpoints/best.ckpt" \
    "${cert[@]}" "hydra.run.dir=$OUT/runs/certify_rejection"
"$PY" certify.py system=denoised "${cert[@]}" "hydra.run.dir=$OUT/runs/certify_denoised"
"$PY" certify.py system=plain "classifier.noise_sd=$SIGMA" "${cert[@]}" \
    "hydra.run.dir=$OUT/runs/certify_plain"

step "report: tables with 95 % intervals, the paired comparison, per-class views, the curves"
"$PY" -m dsr_lightning.reports "$OUT/results" --out "$OUT/report"
step "done"
echo "demo finished in $(( $(date +%s) - start )) s (${times[*]})"
echo "results:  $OUT/results/*.tsv (one row per image; settings in *.tsv.json)"
echo "report:   $OUT/report/report.md, $OUT/report/certified_accuracy.png, $OUT/report/counts_*.png"
echo "training: $OUT/runs/*/ (checkpoints, csv metrics, rejector ROC in runs/rejector/roc.png)"
