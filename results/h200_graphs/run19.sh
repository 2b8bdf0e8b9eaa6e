#!/usr/bin/env bash
# 2026-12-05, sixth session, after run18 (call10, H100): there hf fits 1 sequence at 128K and tiered[1/20] 8 of 9
# (the hot tier full at 9). This: tiered[1/20] at 8 (8x hf's max batch on this card), then quant at its max batch,
# 128K, for issue 17/18's tok/s ratios against call10's hf row (same card kind; hf reruns cheaply if time allows).
#   bash results/h200_graphs/run19.sh     (on the GPU machine, .device-deps carried; ~9 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 330 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered --budget 0.05 \
    --batch 8 --new-tokens 16 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
grep "^|" "$OUT/tp128k/summary.md"
timeout 240 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods quant,hf --batch max \
    --new-tokens 16 --max-minutes 3.5 --out "$OUT/tp128k_q" --quiet --no-plots > "$OUT/tp128k_q.log" 2>&1
grep "^|" "$OUT/tp128k_q/summary.md"
