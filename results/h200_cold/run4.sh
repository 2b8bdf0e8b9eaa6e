#!/usr/bin/env bash
# Device call 4 of the cold-path issue, after the retrieval buffers stopped doubling: the two tiered
# candidates and pqcache on the probe at budget 1/20, 40 samples.
#   bash results/h200_cold/run4.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 280 python -m benchmarks.cli run --model probe --device cuda --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval \
    --lengths 4096,8192 --budgets 0.05 --samples 40 --out "$OUT/probe40" --quiet --no-plots \
    --methods pqcache,tiered@alpha_p=1:alpha_q=8,tiered@alpha_p=2:alpha_q=8 > "$OUT/probe40.log" 2>&1
sed -n '/## Accuracy/,/## Speed/p' "$OUT/probe40/summary.md" | grep "^|"
