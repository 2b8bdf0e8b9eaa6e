#!/usr/bin/env bash
# Device call for the session after 2026-12-05 (prepared 2026-12-05, third session: no machine was lent).
# Checks and measures the kernels that replaced the retrieval path's small ops:
#   gpu_kernels/retrieved_attention.py (the retrieved tokens' attention + the LSE merge: 2 launches, were 31 ops),
#   gpu_kernels/fetch.py fetch_positions (the cold tier's fetch: 1 launch for every slab),
#   gpu_kernels/gpu_cache.py (the GPU cache's lookup and admission: 1 launch each, were 11 and ~49 ops),
#   gpu_kernels/policy_scan.py observe_scores (LeanKV's score update at plan time: 1 pass over the logits),
# the paged kernel's K4V2 low tier (each code byte loaded once, values copied asynchronously: its loop
# 3,641 -> 1,821 sm_90 instructions; the H200 read it at 355 GB/s against 1,627 for K8V4), and the models'
# RMSNorm as one kernel (gpu_kernels/rms_norm.py, installed by attach where the store runs Triton on a GPU:
# 8 launches each before, 2 a layer; every preset's step, quant's included).
# decode_ops on the CPU: tiered 155 -> 44.5 kernels a layer, pqcache 149 -> 39. Baselines in the same run:
# quant (whose step these kernels do not touch) and call3/'s figures (quant 10.82 ms, tiered 45.04 ms at 32K x 4;
# hot_attend 32K x 4: quant 0.132 ms, leankv 0.309, tiered 0.377 a layer).
#   bash results/h200_graphs/run10.sh     (on the GPU machine, .device-deps carried; ~8 minutes). Then run11.sh.
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
# 1. the new kernels on CUDA tensors against their references (the compiled PTX paths the interpreter skips)
timeout 60 python -m pytest -q tests/test_retrieved_attention.py tests/test_policy_scan.py tests/test_gpu_cache_kernels.py \
    tests/test_rms_norm.py \
    > "$OUT/test_kernels.log" 2>&1
tail -n 1 "$OUT/test_kernels.log"
timeout 40 python -m pytest -q tests/test_cold_tier.py -k "fused or pinned or cuda" > "$OUT/test_cold_tier.log" 2>&1
tail -n 1 "$OUT/test_cold_tier.log"
timeout 60 python -m pytest -q tests/test_paged_attention.py > "$OUT/test_paged_attention.log" 2>&1
tail -n 1 "$OUT/test_paged_attention.log"
# 2. one layer's hot-tier attention: the K4V2 low tier against K8V4 (GB/s)
timeout 100 python -m benchmarks.perf.hot_attend --length 32k --batch 4 --presets quant,leankv,tiered \
    --out "$OUT/hot_attend.json" > "$OUT/hot_attend.log" 2>&1
tail -n 8 "$OUT/hot_attend.log"
# 3. the 32-layer step at 32K x 4 through the engine, all three in one run (issue 17: <= 1.5x quant)
timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,pqcache,tiered \
    --batch 4 --new-tokens 32 --max-minutes 2.2 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep "^|" "$OUT/tp32k/summary.md"
