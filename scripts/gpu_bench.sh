#!/usr/bin/env bash
# The oracle at real scale on one GPU (issue 26), in one command of under 6 minutes:
#
#   0. the services' wheels (.whl, carried) into /tmp/site;
#   1. scripts/gpu_check.py: the paged forward against HF (float32 reference), batch
#      invariance alone vs batched, graphs vs eager (fails loudly); the verify timings
#      of both modes (paged batch-invariant, paged not invariant: 1 vs 5 tokens, 1 vs 16
#      sessions) and a profile of one forward;
#   2. specdec bench --real-scale, batch-invariant (the default): HF generate, the oracle
#      alone at 1 and 16 sessions, speculation at acceptance 0.8 at 1 and 16 sessions;
#   3. the same without batch invariance (SPECDEC_BATCH_INVARIANT=false), HF skipped.
#
# Run 1 measured the rest (HF caches and slots, 64 sessions, acceptance 0.6 and 0.9):
# docs/bench/h100_*_run1.json. Each phase has its own time box and writes its JSON and
# log under $OUT as it goes, so a phase cut short still leaves what it measured.
#
# Usage (the repository root, with .whl carried): bash scripts/gpu_bench.sh
# Env: MODEL (default llama-3.1-8b), CHECK_S (90), BENCH_S (135), FAST_S (120),
# ACCEPTANCES (0.8), ALONE (1,16), SPEC (1,16).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=${MODEL:-llama-3.1-8b}
CHECK_S=${CHECK_S:-90}
BENCH_S=${BENCH_S:-135}
FAST_S=${FAST_S:-120}
ACCEPTANCES=${ACCEPTANCES:-0.8}
ALONE=${ALONE:-1,16}
SPEC=${SPEC:-1,16}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "phase 0: wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "FAILED: wheels"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import grpc, google.protobuf, opentelemetry.sdk, specdec.v1.oracle_pb2" \
  || { echo "FAILED: imports"; exit 1; }

stamp "phase 1: correctness, invariance, verify timings of both modes (${CHECK_S}s)"
timeout "$CHECK_S" python3 scripts/gpu_check.py --model "random:$MODEL" --dtype bfloat16 \
  --attentions sdpa --paths paged,paged_fast --rounds 20 --budget-s $((CHECK_S - 25)) \
  --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}
stamp "phase 1 exit $check"
if [ "$check" = 1 ]; then echo "FAILED: the paged forward is far from HF's (see above)"; fi

bench() {  # $1: name, $2: time box, then extra flags
  local name=$1 box=$2
  shift 2
  timeout "$box" python3 -m specdec.cli bench --real-scale "$MODEL" --device cuda \
    --dtype bfloat16 --prompts 8 --max-new-tokens 128 --acceptances "$ACCEPTANCES" \
    --alone-sessions "$ALONE" --spec-sessions "$SPEC" --threads 4 \
    --out "$OUT/real_scale_$name.json" "$@" 2>&1 | tee "$OUT/real_scale_$name.log"
  stamp "bench $name exit ${PIPESTATUS[0]}"
}

stamp "phase 2: specdec bench --real-scale $MODEL, batch-invariant (${BENCH_S}s)"
SPECDEC_ATTENTION=sdpa bench invariant "$BENCH_S" --hf-prompts 2

stamp "phase 3: the same without batch invariance (${FAST_S}s)"
SPECDEC_ATTENTION=sdpa SPECDEC_BATCH_INVARIANT=false bench fast "$FAST_S" --hf-prompts 0

nvidia-smi --query-gpu=memory.used --format=csv
ls -la "$OUT"
