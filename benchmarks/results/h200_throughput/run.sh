#!/usr/bin/env bash
# One device call: the CUDA prefill-attention tests, then kvstore-bench throughput on the
# Llama-3-8B shape (32 layers, random bf16 weights) at 128K, every preset at its max batch.
# Usage on the GPU machine (with .device-deps carried):  bash benchmarks/results/h200_throughput/run.sh
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export PYTHONPATH=$PWD:$PYTHONPATH
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
timeout 150 python -m pytest -q -x tests/test_prefill_attention.py > "$OUT/cuda_tests.log" 2>&1
python -m benchmarks.cli throughput --model llama3-8b --lengths ${LENGTHS:-128k} \
    --methods ${METHODS:-hf,quant,full,leankv,pqcache,tiered} --batch max --new-tokens ${NEW:-32} \
    --out "$OUT/tp" --max-minutes ${MINUTES:-7} --quiet ${RESUME:-} > "$OUT/tp.log" 2>&1
tail -5 "$OUT/tp.log"; cat "$OUT/tp/summary.md" 2>/dev/null | head -30
