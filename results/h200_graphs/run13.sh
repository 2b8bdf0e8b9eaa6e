#!/usr/bin/env bash
# The last call of 2026-12-05's fourth session (~650 s of device time left: the 128K batch-9 run of run12.sh does not
# fit; it stays for the next session). Checks the fix for what run10/run11 found (the K4V2 low tier's key dots at head
# dims below 32: the GPU graph tests of leankv and tiered) and the new PQ-coding kernel on CUDA, then the 32K x 4 step
# after the plan's batched host reads, the workspace's cached views and the PQ-coding kernel (call4: quant 10.07 ms,
# tiered 25.38 at 0a56734; pqcache left out: the budget).
#   bash results/h200_graphs/run13.sh     (on the GPU machine, .device-deps carried; ~4 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 100 python -m pytest -q tests/test_cuda_graph.py > "$OUT/test_cuda_graph.log" 2>&1; tail -n 1 "$OUT/test_cuda_graph.log"
timeout 80 python -m pytest -q tests/test_paged_attention.py tests/test_rms_norm.py tests/test_pq_encode.py \
    > "$OUT/test_kernels.log" 2>&1
tail -n 1 "$OUT/test_kernels.log"
timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,tiered \
    --batch 4 --new-tokens 32 --max-minutes 2 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep "^|" "$OUT/tp32k/summary.md"
