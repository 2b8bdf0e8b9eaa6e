#!/usr/bin/env bash
# 2026-12-05, sixth session: issue 17's open rows, for the next session with a machine. (1) the profile of the step
# at budget 1/20 (quant beside tiered and pqcache, 32K x 4): where tiered's 2.05x quant (call8) goes, the plan's host
# time by part against the graph's kernels; (2) full at 32K at its max batch (>= 70% of the roofline; 128K: 0.721 in
# call14); (3) quant, tiered and pqcache at one batch at 128K (the 1.5x row at the long length).
#   bash results/h200_graphs/run20.sh     (on the GPU machine, .device-deps carried; ~9 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 200 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 --budget 0.05 \
    --methods quant,tiered,pqcache --steps 4 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n 1,12p "$OUT/profile32k/summary.md"
timeout 200 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods full --batch max \
    --new-tokens 16 --max-minutes 3 --out "$OUT/tp32k_full" --quiet --no-plots > "$OUT/tp32k_full.log" 2>&1
grep "^|" "$OUT/tp32k_full/summary.md"
timeout 170 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods quant,tiered,pqcache \
    --budget 0.05 --batch 2 --new-tokens 16 --max-minutes 2.5 --out "$OUT/tp128k_x2" --quiet --no-plots \
    > "$OUT/tp128k_x2.log" 2>&1
grep "^|" "$OUT/tp128k_x2/summary.md"
