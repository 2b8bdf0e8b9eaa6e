#!/usr/bin/env bash
# 2026-12-05, fifth session, after run14: (1) 32K x 4 through the engine with the PQ presets at budget 1/20 (the
# budget the probe validated: tiered 0.988 against full 0.997 at 10.2x less GPU KV), beside quant in the same run
# (issue 17: pqcache and tiered <= 1.5x quant's time a token); (2) quant at its max batch at 32K (issue 17: >= 70% of
# the roofline; call6 at batch 4: 0.492).
#   bash results/h200_graphs/run15.sh     (on the GPU machine, .device-deps carried; ~10 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
# the PQ selectors' new kernels (ADC tables in one launch, the scoring pass's exclusion) on the GPU, and every
# preset's graph replay against its eager step with them
timeout 100 python -m pytest -q tests/test_pq_score.py tests/test_cuda_graph.py > "$OUT/test_gpu.log" 2>&1
tail -n 1 "$OUT/test_gpu.log"
timeout 230 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,tiered,pqcache \
    --budget 0.05 --batch 4 --new-tokens 32 --max-minutes 3 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep "^|" "$OUT/tp32k/summary.md"
timeout 320 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant --batch max \
    --max-batch 24 --new-tokens 32 --max-minutes 5 --out "$OUT/tp_max" --quiet --no-plots > "$OUT/tp_max.log" 2>&1
grep "^|" "$OUT/tp_max/summary.md"
