#!/usr/bin/env bash
# 2026-12-05, sixth session: issue 18's 128K row (run14's, not yet run) with its hf baseline in the same call, so
# the tok/s ratio is taken on one card (the call may land on an H100, where hf's max batch differs from the H200's 3).
#   bash results/h200_graphs/run18.sh     (on the GPU machine, .device-deps carried; ~9 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 370 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered --budget 0.05 \
    --batch 9 --new-tokens 16 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
grep -i "fits\|capture\|error" "$OUT/tp128k.log" | head -12
grep "^|" "$OUT/tp128k/summary.md"
timeout 200 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods hf --batch max \
    --new-tokens 16 --max-minutes 3 --out "$OUT/tp128k_hf" --quiet --no-plots > "$OUT/tp128k_hf.log" 2>&1
grep "^|" "$OUT/tp128k_hf/summary.md"
