#!/usr/bin/env bash
# Device call 6 (prepared 2026-12-05 without a GPU): issue 17's profile summary. A 32-layer Llama-3-8B-shaped
# decode step through the engine (CUDA graph) under torch.profiler, 32K x 4: kernels per step, their time, their
# share of the step, the costliest kernels; then the CPU count's prediction (results/cpu_decode_ops: quant 4,
# pqcache 149, tiered 90 kernels a layer) can be checked against the GPU's.
#   bash results/h200_graphs/run6.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 400 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods quant,pqcache,tiered,tiered@retrieval_attention=kernel --steps 8 --out "$OUT/profile32k" \
    > "$OUT/profile32k.log" 2>&1
tail -12 "$OUT/profile32k.log"
