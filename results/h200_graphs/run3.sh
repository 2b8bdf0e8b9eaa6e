#!/usr/bin/env bash
# Device call 3: issue 17's roofline rows, full and quant at their max batch through the engine's graph
# (32K, then 128K as time allows; --resume continues the same results).
#   bash results/h200_graphs/run3.sh     (on the GPU machine, .device-deps carried; ~9.5 min)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 540 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k,128k --methods quant,full --batch max --max-batch 24 \
    --new-tokens 32 --out "$OUT/tp_max" --max-minutes 8.2 --quiet --no-plots > "$OUT/tp_max.log" 2>&1
cat "$OUT/tp_max/summary.md" | grep "^|"
