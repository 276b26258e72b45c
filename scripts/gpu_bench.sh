#!/usr/bin/env bash
# The oracle at real scale on one GPU (issue 26), in one command of under 10 minutes:
#
#   0. the services' wheels (.whl, carried) into /tmp/site;
#   1+2. scripts/gpu_check.py: the paged forward against HF, batch invariance alone vs
#        batched, graphs vs eager (fails loudly), then the verify timings (1 vs 5 tokens,
#        1 vs 16 sessions, HF caches / slots / paged) and a profile of one forward;
#   3. specdec bench --real-scale: HF generate, the oracle alone at 1/16/64 sessions,
#      speculation at acceptance 0.8 (then 0.6, 0.9) at 1 and 16 sessions.
#
# Each phase has its own time box; every phase writes its JSON and log under $OUT as it
# goes, so a phase cut short still leaves what it measured.
#
# Usage (the repository root, with .whl carried): bash scripts/gpu_bench.sh
# Env: MODEL (default llama-3.1-8b), CHECK_S (200), BENCH_S (330), ACCEPTANCES.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=${MODEL:-llama-3.1-8b}
CHECK_S=${CHECK_S:-200}
BENCH_S=${BENCH_S:-330}
ACCEPTANCES=${ACCEPTANCES:-0.8,0.6,0.9}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "phase 0: wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "FAILED: wheels"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import grpc, google.protobuf, opentelemetry.sdk, specdec.v1.oracle_pb2" \
  || { echo "FAILED: imports"; exit 1; }

stamp "phase 1+2: correctness, invariance, verify timings (${CHECK_S}s)"
timeout "$CHECK_S" python3 scripts/gpu_check.py --model "random:$MODEL" --dtype bfloat16 \
  --budget-s $((CHECK_S - 45)) --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}
ATTENTION=$(grep -o 'ATTENTION=[a-z]*' "$OUT/gpu_check.log" | tail -1 | cut -d= -f2)
ATTENTION=${ATTENTION:-sdpa}
stamp "phase 1+2 exit $check; the oracle's attention: $ATTENTION"
if [ "$check" = 1 ]; then echo "FAILED: the paged forward is far from HF's (see above)"; fi

stamp "phase 3: specdec bench --real-scale $MODEL (${BENCH_S}s)"
SPECDEC_ATTENTION=$ATTENTION timeout "$BENCH_S" python3 -m specdec.cli bench \
  --real-scale "$MODEL" --device cuda --dtype bfloat16 --prompts 8 --max-new-tokens 128 \
  --acceptances "$ACCEPTANCES" --alone-sessions 1,16,64 --spec-sessions 1,16 \
  --threads 4 --out "$OUT/real_scale.json" 2>&1 | tee "$OUT/real_scale.log"
stamp "phase 3 exit ${PIPESTATUS[0]}"
nvidia-smi --query-gpu=memory.used --format=csv
ls -la "$OUT"
