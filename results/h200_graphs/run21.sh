#!/usr/bin/env bash
# 2026-12-05, sixth session: the engine's overlap (step t+1 planned and launched before step t's tokens are read;
# full and quant), for the next session with a machine, before run20. (1) the GPU tests: the step launched ahead
# makes no synchronizing call and changes no token (tests/test_overlap.py), every preset's graph replay still equals
# its eager step; (2) quant and full at 32K x 4 with the overlap (--path engine) and without (--path engine-plain)
# on the same machine, then quant at 32K x 4 beside tiered at budget 1/20 (issue 17's ratio; tiered keeps the plain
# loop: its step cannot be taken back yet).
#   bash results/h200_graphs/run21.sh     (on the GPU machine, .device-deps carried; ~8 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 150 python -m pytest -q tests/test_overlap.py tests/test_cuda_graph.py -x > "$OUT/test_gpu.log" 2>&1
tail -n 3 "$OUT/test_gpu.log"
for path in engine engine-plain; do
    timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,full --batch 4 \
        --new-tokens 32 --path "$path" --out "$OUT/tp32k_$path" --quiet --no-plots > "$OUT/tp32k_$path.log" 2>&1
    grep "^| quant\|^| full" "$OUT/tp32k_$path/summary.md"
done
timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,tiered --budget 0.05 \
    --batch 4 --new-tokens 32 --out "$OUT/tp32k_ratio" --quiet --no-plots > "$OUT/tp32k_ratio.log" 2>&1
grep "^|" "$OUT/tp32k_ratio/summary.md"
