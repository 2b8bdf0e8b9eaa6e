#!/usr/bin/env bash
# Device call 2: issue 18's 128K figure, tiered's max batch and decode tokens/s against hf at hf's
# max batch (hf: 3 at 128K, 36.4 tok/s in results/h200_throughput), through the engine with its graph.
#   bash results/h200_graphs/run2.sh     (on the GPU machine, .device-deps carried; ~9.5 min)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 540 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered@budget_fraction=0.05 --batch max --max-batch 12 \
    --new-tokens 16 --out "$OUT/tp128k" --max-minutes 8.5 --quiet --no-plots > "$OUT/tp128k.log" 2>&1
grep -i "fits\|decode step\|eager\|capture" "$OUT/tp128k.log" | head -20
cat "$OUT/tp128k/summary.md" | grep "^|"
