#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one go (about 6 minutes on an H100): the CUDA tests,
# certification of the paper's system (engine vs the reference-style loop), the rejector's
# training throughput with DnCNN and MemNet, and the pipeline end to end on the GPU.
#   bash benchmarks/run_gpu.sh            # logs in $LOGS (default benchmarks/gpu_logs)
set -uo pipefail
PY=${PY:-python3}
OUT=${LOGS:-benchmarks/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONPATH="$PWD:${PYTHONPATH:-}"
# a machine without the package's pure-Python dependencies: carry their wheels in .whl/ (see
# benchmarks/README.md); they install into /tmp/site
if [[ -d .whl ]] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# ONLY="cert_same train_dncnn": run just those steps
run() { local name=$1 limit=$2; shift 2
        [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
        echo "=== $name: $*" | tee -a "$OUT/summary.log"
        timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" >> "$OUT/$name.log"
        grep -E "best:|speed-up|samples/s|s/epoch|^ours|^naive|passed|failed|exit|warm-up|^system|^separate|^one pass" \
             "$OUT/$name.log" | tail -12 | tee -a "$OUT/summary.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.log"

run cuda_tests 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_smoothing_engine.py
# certification, paper system (ResNet-110 + DnCNN 17x64 + the ResNet-34-like rejector), N = 10,000
E=(benchmarks/bench_engine.py --system paper --device cuda --images 40 --n 10000 --repeats 2)
run cert_same 150 $PY "${E[@]}" --batch 1000
run cert_fast 150 $PY "${E[@]}" --batch 1000 --engine-batch 4000 --bf16 --channels-last
run cert_stream 90 $PY "${E[@]}" --batch 4000 --bf16 --channels-last --no-reference --noise stream
run cert_compile 200 $PY "${E[@]}" --batch 4000 --bf16 --channels-last --no-reference --compile
# one pass for f_R and its denoised baseline against a pass each (DESIGN §8.2), N = 10,000;
# system-images/s counts a pass certifying two systems twice
S=(benchmarks/bench_shared.py --system paper --device cuda --images 30 --n 10000 --bf16 --no-fp32
   --channels-last --repeats 2)
run shared 240 $PY "${S[@]}" --batch 4000
run shared_compile 300 $PY "${S[@]}" --batch 4000 --paths one --compile
# rejector training, 64 images x T = 20 per step
T=(benchmarks/bench_train.py --config paper --device cuda --batch 64 --T 20 --steps 10 --warmup 3)
run train_dncnn 120 $PY "${T[@]}"
run train_dncnn_fast 90 $PY "${T[@]}" --bf16 --channels-last --no-naive
run train_memnet_fast 120 $PY "${T[@]}" --denoiser memnet --bf16 --channels-last --no-naive
# the pipeline on the GPU: tiny stages, then the rejector with certify=quick (CUDA noise, per image)
W="$OUT/e2e"; rm -rf "$W"; mkdir -p "$W"
G=(experiment=tiny trainer.accelerator=gpu "pretrained_root=$W/pretrained")
run e2e 240 bash -c "$PY train.py stage=classifier ${G[*]} hydra.run.dir=$W/c && \
  $PY train.py stage=denoiser ${G[*]} hydra.run.dir=$W/d && \
  $PY train.py ${G[*]} certify=quick rejector.threshold=auto certify.bf16=true hydra.run.dir=$W/r && \
  $PY certify.py system=denoised ${G[*]} N=1000 max=20 outdir=$W/res hydra.run.dir=$W/cd && \
  $PY certify.py system=denoised ${G[*]} N=1000 max=20 outdir=$W/res hydra.run.dir=$W/cd2 && \
  grep -c . $W/res/*.tsv"
echo "done" | tee -a "$OUT/summary.log"
