#!/usr/bin/env bash
# Device call 1 of the graph issue (prepared 2026-12-04 without a GPU; run it first next session):
# the GPU tests of what landed untested, the bf16 page kernel's timing, then the 32K step of every
# preset through the engine with its CUDA graph (issue 17: full/quant roofline share, pqcache and
# tiered within 1.5x quant; issue 18: the retrieval path in the graph).
#   bash results/h200_graphs/run1.sh     (on the GPU machine, .device-deps carried; timeouts sum to 540 s + the install, under the 600 s of a call)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
# 1. CUDA-only tests (the interpreter's CPU-tensor tests do not run with TRITON_INTERPRET=0)
timeout 150 python -m pytest -q tests/test_cuda_graph.py > "$OUT/test_cuda_graph.log" 2>&1
timeout 60 python -m pytest -q tests/test_paged_attention.py tests/test_fetch.py tests/test_cold_tier.py \
    -k "cuda or pinned" > "$OUT/test_cuda_kernels.log" 2>&1
tail -n 3 "$OUT/test_cuda_graph.log" "$OUT/test_cuda_kernels.log"
# 2. (the bf16 page kernel's timing ran in call 1, results/h200_graphs/call1/full_kernel.*)
# 3. the 32-layer step through the engine (CUDA graphs), 32K x 4, every preset; the log says which path ran
timeout 210 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,pqcache,tiered,tiered@retrieval_attention=kernel,tiered@retrieval_attention=kernel:prefetch_next_layer=true \
    --batch 4 --new-tokens 32 --max-minutes 3.2 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
grep -i "decode step\|eager\|capture" "$OUT/tp32k.log" | sort | uniq -c | head -20
cat "$OUT/tp32k/summary.md" | grep "^|"
# 4. issue 17's profile summary (run6's, in the same call): the 32-layer step at 32K x 4 under torch.profiler
timeout 170 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \
    --methods quant,pqcache,tiered --steps 8 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
tail -n 12 "$OUT/profile32k.log"
