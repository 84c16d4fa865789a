#!/usr/bin/env bash
# make demo-full: the whole pipeline on the embedded CIFAR-10 subset, on CPU, training the given
# networks too (make demo starts from the shipped ones):
#   1. a classifier f (ResNet-8), and a Gaussian-augmented one for the randomized-smoothing baseline
#   2. a denoiser D (small DnCNN, MSE objective)
#   3. the rejector heads (the main job), then f_R and its denoised baseline certified in one pass
#      and the noise-trained f by randomized smoothing, on the first IMAGES test images
#   4. the report
# The networks go to $OUT/pretrained_models (never over the shipped ones); override the sizes below.
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
rm -rf "$OUT/runs/rejector"

step "1/4 classifier f (clean) and f_noise (sigma=$SIGMA, for the randomized-smoothing baseline)"
"$PY" train.py stage=classifier "${common[@]}" "optim.epochs=$CLF_EPOCHS" \
    "hydra.run.dir=$OUT/runs/classifier"
"$PY" train.py stage=classifier "${common[@]}" "optim.epochs=$CLF_EPOCHS" \
    "classifier.noise_sd=$SIGMA" "hydra.run.dir=$OUT/runs/classifier_noise"

step "2/4 denoiser D (MSE)"
"$PY" train.py stage=denoiser "${common[@]}" "optim.epochs=$DEN_EPOCHS" \
    "hydra.run.dir=$OUT/runs/denoiser"

step "3/4 rejector heads (T=$REJ_T), then f_R, its baseline and randomized smoothing certified" \
     "($IMAGES test images, N=$N)"
"$PY" train.py "${common[@]}" optim=adam "optim.epochs=$REJ_EPOCHS" "T=$REJ_T" certify=quick \
    "certify.systems=[rejection,denoised,plain]" "certify.N=$N" "certify.max=$IMAGES" \
    "hydra.run.dir=$OUT/runs/rejector"

step "4/4 report: tables with 95 % intervals, the paired comparison, per-class views, the curves"
"$PY" -m dsr_lightning.reports "$OUT/runs" --out "$OUT/report"
step "done"
echo "demo-full finished in $(( $(date +%s) - start )) s (${times[*]})"
echo "results:  $OUT/runs/rejector/results/*.tsv (one row per image; settings in *.tsv.json)"
echo "report:   $OUT/report/report.md and its figures"
echo "training: $OUT/runs/*/ (checkpoints, csv metrics, the rejector's ROC in runs/rejector/roc.png)"
