#!/usr/bin/env bash
# Device call 1 of the cold-path issue: GPU tests of the quantized cold tier's fetch, the probe sweep
# that retunes tiered at budget 1/20, and pqcache/tiered through the engine at 32K (host bytes,
# TT2T). On the GPU machine, .device-deps carried:  bash results/h200_cold/run1.sh
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/env.txt" 2>&1
timeout 120 python -m pytest -q tests/test_fetch.py tests/test_cold_tier.py tests/test_cuda_graph.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
# tiered retune: LeanKV's pruning made far more aggressive (a pruned token can be recalled)
timeout 300 python -m benchmarks.cli run --model probe --device cuda --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval \
    --lengths 4096,8192 --budgets 0.05 --samples 10 --out "$OUT/sweep" --quiet --no-plots \
    --methods ${SWEEP:-full,pqcache,tiered,tiered@alpha_p=0.25,tiered@alpha_p=1,tiered@alpha_p=1:alpha_q=4,tiered@alpha_p=4:alpha_q=16} \
    > "$OUT/sweep.log" 2>&1
sed -n '/## Per method/,/## Speed/p' "$OUT/sweep/summary.md" | grep "^|"
timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods pqcache,tiered \
    --batch 4 --new-tokens 32 --out "$OUT/tp32k" --quiet > "$OUT/tp32k.log" 2>&1
python - "$OUT/tp32k/results.json" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1])
for r in json.loads(p.read_text()) if p.exists() else []:
    keys = ("method", "length", "batch", "path", "decode_path", "ttft_s", "tt2t_s", "tpot_s", "host_bytes_per_seq",
            "host_reserved_bytes", "gpu_kv_bytes_per_seq", "error")
    print({k: r.get(k) for k in keys})
PY
tail -3 "$OUT/tp32k.log"
