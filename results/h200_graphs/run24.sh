#!/usr/bin/env bash
# 2026-12-05, seventh session, the last call: the overlap with the fix of call20 (no scalar assignment at index
# tensors in the plan: `kvstore.plan.fill_at`): (1) its GPU test (a step launched ahead makes no synchronizing call,
# tokens unchanged), (2) quant at 32K x 4 with the overlap and without, in one run.
#   bash results/h200_graphs/run24.sh     (on the GPU machine, .device-deps carried; ~2 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 60 python -m pytest -q tests/test_overlap.py -k cuda > "$OUT/test_gpu.log" 2>&1
grep -o "[a-z_/]*\.py:[0-9]*: called a synchronizing" "$OUT/test_gpu.log" | sort | uniq -c; tail -n 1 "$OUT/test_gpu.log"
for path in engine engine-plain; do
    timeout 100 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant --batch 4 \
        --new-tokens 32 --path "$path" --out "$OUT/tp32k_$path" --quiet --no-plots > "$OUT/tp32k_$path.log" 2>&1
    grep "^| quant" "$OUT/tp32k_$path/summary.md"
done
