#!/usr/bin/env bash
# The call after run10/run11 (2026-12-05, fourth session): the fix for what they found, then issue 18's 128K figure.
#   run10/run11 at 0a56734: the K4V2 low tier's two half-width key dots do not compile for head dims below 32
#   (a dot's K must be >= 16; the interpreter does not check): the GPU graph tests of leankv and tiered failed
#   on the tiny test models (d=16). Fixed: one dot over the joined halves there; the CI compile check now builds d=16/32.
#   test_paged_attention and the RMSNorm fuse test now run their kernels on the GPU where Triton compiles.
# Then tiered at 128K at 3x hf's max batch (hf: 3, 36.4 tok/s: results/h200_throughput), budget 1/20 (the probe's).
#   bash results/h200_graphs/run12.sh     (on the GPU machine, .device-deps carried; ~8 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 100 python -m pytest -q tests/test_cuda_graph.py > "$OUT/test_cuda_graph.log" 2>&1; tail -n 1 "$OUT/test_cuda_graph.log"
timeout 90 python -m pytest -q tests/test_paged_attention.py tests/test_rms_norm.py > "$OUT/test_paged_attention.log" 2>&1
tail -n 1 "$OUT/test_paged_attention.log"
timeout 330 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered@budget_fraction=0.05 \
    --batch 9 --new-tokens 16 --max-minutes 5.2 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
grep -i "fits\|TPOT\|capture\|error" "$OUT/tp128k.log" | head -12
grep "^|" "$OUT/tp128k/summary.md"
