#!/usr/bin/env bash
# Device call 3 of 2026-12-05 (after call 2's profile): where tiered's step goes.
#   bash results/h200_graphs/run7.sh     (on the GPU machine, .device-deps carried)
# 1. the profile again, the requests outliving the window (call 2's quant row held their release), with the
#    host's phases (plan, graph replay, sample); 2. one layer's hot-tier attention per preset at 32K x 4.
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 200 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods quant,pqcache,tiered --steps 6 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n '/^# Decode/,$p' "$OUT/profile32k/summary.md" | head -60
timeout 120 python -m benchmarks.perf.hot_attend --length 32k --batch 4 --presets quant,leankv,tiered \
    --out "$OUT/hot_attend.json" > "$OUT/hot_attend.log" 2>&1
tail -n 8 "$OUT/hot_attend.log"
