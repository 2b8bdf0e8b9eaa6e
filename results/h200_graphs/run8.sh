#!/usr/bin/env bash
# Device call 3 of 2026-12-05: run7's diagnostics with LeanKV's victim search as one kernel per tier
# (gpu_kernels/policy_scan.py), and the 32K x 4 step of quant and tiered through the engine in the same run.
#   bash results/h200_graphs/run8.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 40 python -m pytest -q tests/test_policy_scan.py > "$OUT/test_policy_scan.log" 2>&1; tail -n 1 "$OUT/test_policy_scan.log"
timeout 190 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods quant,pqcache,tiered --steps 6 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n '/^# Decode/,$p' "$OUT/profile32k/summary.md" | head -60
timeout 100 python -m benchmarks.perf.hot_attend --length 32k --batch 4 --presets quant,leankv,tiered \
    --out "$OUT/hot_attend.json" > "$OUT/hot_attend.log" 2>&1
tail -n 8 "$OUT/hot_attend.log"
timeout 120 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,tiered \
    --batch 4 --new-tokens 32 --max-minutes 1.8 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep "^|" "$OUT/tp32k/summary.md"
