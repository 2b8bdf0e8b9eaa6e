#!/usr/bin/env bash
# 2026-12-05, seventh session, call B: (1) the probe's accuracy table through generate() (attach), beside
# run22.sh's engine table; (2) quant beside pqcache at 128K x 2, budget 1/20 (call16's pqcache row was cut by
# --max-minutes; quant again so that the ratio is of one machine).
#   bash results/h200_graphs/run23.sh     (on the GPU machine, .device-deps carried; ~9 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 280 python -m benchmarks.cli run --model probe --device cuda \
    --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval --lengths 4096,8192 --budgets 0.2,0.05 \
    --samples 40 --methods full,quant,pqcache,tiered --path generate --max-minutes 4.4 \
    --out "$OUT/probe40_generate" --quiet --no-plots > "$OUT/probe40_generate.log" 2>&1
tail -n 2 "$OUT/probe40_generate.log"; sed -n '/## Accuracy/,/## Per method/p' "$OUT/probe40_generate/summary.md" | grep "^|"
timeout 280 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods quant,pqcache \
    --budget 0.05 --batch 2 --new-tokens 16 --max-minutes 4.4 --out "$OUT/tp128k_pq" --quiet --no-plots \
    > "$OUT/tp128k_pq.log" 2>&1
grep "^|" "$OUT/tp128k_pq/summary.md"
