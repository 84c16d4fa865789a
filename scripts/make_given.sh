#!/usr/bin/env bash
# The demo's given networks, made again by the project's own stages on the embedded CIFAR-10
# subset, into dsr_lightning/pretrained_models/ (the published layout; `${given:}` in the configs),
# each with its provenance record (the command, the version, the data's fingerprint, its accuracy
# or PSNR on the first 200 test images, its sha256): the ResNet-8 f (15 epochs), its
# Gaussian-augmented copies for sigma = 0.25 and 0.5, and the 5-layer DnCNN for sigma = 0.25 and 0.5
# (MSE, 3 epochs). About 6 minutes on a 2-core CPU. `make given` runs it.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${DEST:-dsr_lightning/pretrained_models}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
common=(experiment=demo "pretrained_root=$WORK/out" data.num_workers=0 trainer.precision=32-true)
made=()
train() { local name=$1; shift
          echo "=== $name: dsr-train $*"
          "$PY" train.py "$@" "hydra.run.dir=$WORK/runs/$name" > "$WORK/$name.log" 2>&1 \
              || { tail -20 "$WORK/$name.log"; exit 1; }
          made+=("$(grep -o "exported the best network to .*" "$WORK/$name.log" | cut -d' ' -f6)|$*"); }
for sd in 0 0.25 0.5; do
    train "classifier_noise$sd" stage=classifier "${common[@]}" optim.epochs=15 \
        "classifier.noise_sd=$sd"
done
for s in 0.25 0.5; do
    train "denoiser_s$s" stage=denoiser "${common[@]}" optim.epochs=3 "sigma=$s"
done
rm -rf "$DEST"
for entry in "${made[@]}"; do
    src=${entry%%|*} args=${entry#*|}
    dst="$DEST/${src#"$WORK/out/"}"
    mkdir -p "$(dirname "$dst")"
    cp "$src" "$dst"
    "$PY" -m dsr_lightning.jobs.given record "$dst" \
        --command "python train.py ${args//$WORK\/out/<pretrained_root>}"
done
du -sh "$DEST"
