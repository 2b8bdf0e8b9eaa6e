#!/usr/bin/env bash
# Device call 4 of 2026-12-05: the plan's host time by part (kvstore.plan.* profiler ranges) for the
# retrieval presets, after call 3 found tiered's plan at 23.7 ms of host time a step.
#   bash results/h200_graphs/run9.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 130 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods tiered --steps 4 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n '/^# Decode/,$p' "$OUT/profile32k/summary.md" | head -40
timeout 30 python -m pytest -q tests/test_policy_scan.py > "$OUT/test_policy_scan.log" 2>&1; tail -n 1 "$OUT/test_policy_scan.log"
