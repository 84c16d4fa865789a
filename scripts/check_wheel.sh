#!/usr/bin/env bash
# CI: build the wheel, install it WITH its declared dependencies into a fresh virtual environment
# (no dev extras, nothing of the checkout's environment), and run tiny stages from it in an empty
# folder: the configs, the embedded data, the entry points and every run-time import must all come
# from the wheel and what it declares. A run-time import declared only in an extra fails here.
# The pinned versions come from requirements/ci-constraints.txt; pip fetches from the registry, its
# cache shared with `make install` of the same CI run (so the large torch wheels download once).
set -euo pipefail
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, the venv link kept
REPO=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH PYTHONHOME  # nothing of the checkout or the dev environment on the path
export PYTHONNOUSERSITE=1
t0=$(date +%s)
"$PY" -m build --wheel --no-isolation --outdir "$TMP/dist" "$REPO" > "$TMP/build.log" 2>&1 \
    || { tail -20 "$TMP/build.log"; exit 1; }
WHL=$(ls "$TMP"/dist/*.whl)
"$PY" -c "import sys, zipfile; print('\n'.join(zipfile.ZipFile(sys.argv[1]).namelist()))" "$WHL" \
    > "$TMP/contents.txt"  # listed once: grep -q on a live pipe could break it
for f in dsr_lightning/conf/train.yaml dsr_lightning/conf/certify/paper.yaml \
         dsr_lightning/conf/hydra/launcher/slurm.yaml dsr_lightning/py.typed \
         dsr_lightning/data/cifar10_subset/cifar10_subset.npz; do
    grep -qx "$f" "$TMP/contents.txt" || { echo "wheel lacks $f"; exit 1; }
done

# A fresh environment from the same interpreter (a venv made from a venv's python is based on the
# base interpreter, without the dev packages); the wheel and its dependencies, no extras.
"$PY" -m venv "$TMP/venv"
V="$TMP/venv/bin"
"$V/python" -m pip install -q --upgrade pip > "$TMP/pip.log" 2>&1 || { tail -20 "$TMP/pip.log"; exit 1; }
"$V/python" -m pip install -q -c "$REPO/requirements/ci-constraints.txt" "$WHL" >> "$TMP/pip.log" 2>&1 \
    || { tail -20 "$TMP/pip.log"; exit 1; }
t1=$(date +%s)

cd "$TMP"  # an empty folder: no checkout, no conf/ beside it
mkdir work && cd work
export OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
"$V/python" -c "import dsr_lightning, sys; p = dsr_lightning.__file__; \
assert p.startswith('$TMP/venv/'), p; print('dsr_lightning from', p)"
# the proof that nothing comes from the dev environment: its test tools are not there
for m in pytest xdist ruff build; do  # (filelock is torch's own dependency)
    if "$V/python" -c "import $m" 2> /dev/null; then echo "the fresh environment has $m"; exit 1; fi
done
"$V/python" -m dsr_lightning train stage=classifier experiment=tiny hydra.run.dir=runs/c > c.log 2>&1 \
    || { tail -20 c.log; exit 1; }
"$V/dsr-train" stage=denoiser experiment=tiny hydra.run.dir=runs/d > d.log 2>&1 \
    || { tail -20 d.log; exit 1; }
"$V/dsr-train" experiment=tiny certify=quick hydra.run.dir=runs/r > r.log 2>&1 \
    || { tail -20 r.log; exit 1; }
"$V/dsr-certify" experiment=tiny rejector_ckpt=runs/r/checkpoints/last.ckpt outdir=runs/certify \
    hydra.run.dir=runs/cert > cert.log 2>&1 || { tail -20 cert.log; exit 1; }
"$V/dsr-report" runs > report.log 2>&1 || { tail -20 report.log; exit 1; }
grep -q "certified (rejection)" r.log && ls runs/certify/*.tsv > /dev/null && test -f runs/report/report.md
t2=$(date +%s)
echo "wheel $(basename "$WHL"): installed with its dependencies into a fresh environment" \
     "($((t1 - t0)) s: build and install); tiny stages trained, certified and reported from it" \
     "($((t2 - t1)) s)"
