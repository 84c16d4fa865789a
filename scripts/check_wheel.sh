#!/usr/bin/env bash
# CI: build the wheel, install it outside the checkout, and run tiny stages from it in an empty
# folder: the configs, the embedded data and the entry points must all come from the wheel.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, the venv link kept
REPO=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
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
"$PY" -m pip install -q --no-deps --target "$TMP/site" "$WHL"
cd "$TMP"  # an empty folder: no checkout, no conf/ beside it
export PYTHONPATH="$TMP/site" OMP_NUM_THREADS=1
"$PY" -c "import dsr_lightning, sys; p = dsr_lightning.__file__; \
assert p.startswith('$TMP/site'), p; print('dsr_lightning from', p)"
"$PY" -m dsr_lightning train stage=classifier experiment=tiny hydra.run.dir=runs/c > c.log 2>&1 \
    || { tail -20 c.log; exit 1; }
"$TMP/site/bin/dsr-train" stage=denoiser experiment=tiny hydra.run.dir=runs/d > d.log 2>&1 \
    || { tail -20 d.log; exit 1; }
"$TMP/site/bin/dsr-train" experiment=tiny certify=quick hydra.run.dir=runs/r > r.log 2>&1 \
    || { tail -20 r.log; exit 1; }
"$TMP/site/bin/dsr-report" runs > report.log 2>&1 || { tail -20 report.log; exit 1; }
grep -q "certified (rejection)" r.log && test -f runs/report/report.md
echo "wheel $(basename "$WHL"): installed outside the checkout, tiny stages trained, certified and reported"
