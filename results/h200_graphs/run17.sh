#!/usr/bin/env bash
# The GPU checks of 2026-12-05's fifth session's kernels not yet run on a GPU (call8 ran 18 of them before the folds
# of d0c5073 and the table kernel's fix of 6b5c692): every preset's graph replay against its eager step (the folded
# lookup, decode write and PQ tables inside captured steps, at the test models' d=16: 8 dims a PQ sub-space), the
# PQ kernels against their references, the GPU cache's kernels against the torch path, the d=16 paged kernel.
#   bash results/h200_graphs/run17.sh     (on the GPU machine, .device-deps carried; ~3 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 170 python -m pytest -q tests/test_cuda_graph.py tests/test_gpu_cache_kernels.py tests/test_pq_encode.py \
    tests/test_pq_score.py tests/test_paged_attention.py \
    -k "not test_triton_matches and not test_empty and not faiss and not retrieval_service and (graph or cuda or kernel or encode or table or exclu or d16 or full_hot_tier or always_off)" \
    > "$OUT/test_gpu.log" 2>&1
tail -n 3 "$OUT/test_gpu.log"
