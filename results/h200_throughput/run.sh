#!/usr/bin/env bash
# One device call: optionally the CUDA tests of what the run relies on, then kvstore-bench
# throughput on the Llama-3-8B shape (32 layers, random bf16 weights).
# Usage on the GPU machine (with .device-deps carried):
#   LENGTHS=32k METHODS=hf,full,quant,leankv,pqcache,tiered TESTS=1 bash results/h200_throughput/run.sh
#   MAXB=6 caps the batch --batch max runs (the fit it found stays in the row)
#   FROM=results/h200_throughput/results.json LENGTHS=128k ... bash ...   (resumes FROM's rows)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export PYTHONPATH=$PWD:$PYTHONPATH
mkdir -p "$OUT/tp"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; free -g | head -2;
  python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
if [ -n "${TESTS:-}" ]; then
  TRITON_INTERPRET=0 timeout 150 python -m pytest -q tests/test_prefill_attention.py tests/test_cold_tier.py \
      tests/test_kmeans.py > "$OUT/cuda_tests.log" 2>&1
  timeout 120 python -m pytest -q tests/test_fetch.py >> "$OUT/cuda_tests.log" 2>&1
  tail -3 "$OUT/cuda_tests.log"
fi
RESUME=""
if [ -n "${FROM:-}" ]; then cp "$FROM" "$OUT/tp/results.json"; RESUME=--resume; fi
python -m benchmarks.cli throughput --model llama3-8b --lengths ${LENGTHS:-32k,128k} \
    --methods ${METHODS:-hf,full,quant,leankv,pqcache,tiered} --batch max --new-tokens ${NEW:-32} \
    --out "$OUT/tp" --max-minutes ${MINUTES:-7} --quiet $RESUME ${MAXB:+--max-batch $MAXB} > "$OUT/tp.log" 2>&1
grep -v "^\s*$" "$OUT/tp.log" | tail -12; cat "$OUT/tp/summary.md" 2>/dev/null | head -30
