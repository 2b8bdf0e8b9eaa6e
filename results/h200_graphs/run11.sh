#!/usr/bin/env bash
# The call after run10.sh: every preset's graph replay still equals its eager step bit for bit with the new
# kernels, and where the step goes now (kernels a step, the plan's parts kvstore.plan.*, the costliest kernels).
#   bash results/h200_graphs/run11.sh     (on the GPU machine, .device-deps carried; ~6 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 150 python -m pytest -q tests/test_cuda_graph.py > "$OUT/test_cuda_graph.log" 2>&1; tail -n 1 "$OUT/test_cuda_graph.log"
timeout 160 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods quant,pqcache,tiered --steps 4 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n '/^# Decode/,$p' "$OUT/profile32k/summary.md" | head -60
