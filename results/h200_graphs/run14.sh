#!/usr/bin/env bash
# 2026-12-05, fifth session. run13 (call6) passed every graph test; run12 (call7) found the paged kernel wrong at
# d=16 in bf16 (fixed: fp32 dots below a head dim of 32) and its 128K row did not start (`throughput` took no
# budget: `--budget` now). This: the d=16 cases on the GPU, then issue 18's 128K row: tiered at 3x hf's max
# batch (hf: 3 sequences, 36.4 tok/s: results/h200_throughput) at budget 1/20 (the probe's).
#   bash results/h200_graphs/run14.sh     (on the GPU machine, .device-deps carried; ~8 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
# (the d=16 cases moved to run16.sh: this call is the 128K row alone, within the session's device time)
timeout 480 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered --budget 0.05 \
    --batch 9 --new-tokens 16 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
grep -i "fits\|capture\|error" "$OUT/tp128k.log" | head -12
grep "^|" "$OUT/tp128k/summary.md"
