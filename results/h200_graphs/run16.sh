#!/usr/bin/env bash
# run15 cut to what ~4 device minutes allow (the session's last call): the PQ selectors' new kernels on the GPU,
# then 32K x 4 through the engine, quant beside tiered and pqcache at budget 1/20, one run.
#   bash results/h200_graphs/run16.sh     (on the GPU machine, .device-deps carried; ~4 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 70 python -m pytest -q tests/test_pq_score.py tests/test_paged_attention.py -k "table or exclu or cuda_kernel or d16 or full_hot_tier or always_off" \
    > "$OUT/test_kernels.log" 2>&1
tail -n 1 "$OUT/test_kernels.log"
timeout 200 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,tiered,pqcache \
    --budget 0.05 --batch 4 --new-tokens 24 --max-minutes 2.6 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep "^|" "$OUT/tp32k/summary.md"
