#!/usr/bin/env bash
# 2026-12-05, seventh session, call A: (1) the overlap's GPU test again, now naming the Python line of any
# synchronizing call (call15: one launch ahead of quant synced, where unknown); (2) the step's profile at
# budget 1/20, quant beside tiered and pqcache at 32K x 4 (call16's run stopped: profile_step sized the
# model's positions for fewer tokens than it generates; fixed); (3) the probe's accuracy table through the
# engine (issue 17's accuracy row; run23.sh runs the generate() side).
#   bash results/h200_graphs/run22.sh     (on the GPU machine, .device-deps carried; ~8 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 100 python -m pytest -q tests/test_overlap.py tests/test_cuda_graph.py > "$OUT/test_gpu.log" 2>&1
grep -o "[a-z_/]*\.py:[0-9]*: called a synchronizing" "$OUT/test_gpu.log" | sort | uniq -c; tail -n 2 "$OUT/test_gpu.log"
timeout 200 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 --budget 0.05 \
    --methods quant,tiered,pqcache --steps 4 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n 1,30p "$OUT/profile32k/summary.md"
timeout 250 python -m benchmarks.cli run --model probe --device cuda \
    --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval --lengths 4096,8192 --budgets 0.2,0.05 \
    --samples 40 --methods full,quant,pqcache,tiered --path engine --max-minutes 3.9 \
    --out "$OUT/probe40_engine" --quiet --no-plots > "$OUT/probe40_engine.log" 2>&1
tail -n 2 "$OUT/probe40_engine.log"; sed -n '/## Accuracy/,/## Per method/p' "$OUT/probe40_engine/summary.md" | grep "^|"
