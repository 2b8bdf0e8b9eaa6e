#!/usr/bin/env bash
# Device call 2 of the cold-path issue (after the quantized GPU cache slots and the decode slab sizing):
# GPU tests of the pinned/UVA paths, pqcache/tiered through the engine at 32K x 4 (host bytes reserved
# vs used, TT2T), the probe at 40 samples for tiered's retune at budget 1/20, and TT2T at 128K x 2.
#   bash results/h200_cold/run2.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
row() {  # the figures of a throughput results.json this issue is judged by
python - "$1" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1])
for r in json.loads(p.read_text()) if p.exists() else []:
    keys = ("method", "length", "batch", "decode_path", "ttft_s", "tt2t_s", "tpot_s", "host_bytes_per_seq",
            "host_reserved_bytes", "gpu_kv_bytes_per_seq", "dense_kv_bytes_per_seq", "error")
    print({k: r.get(k) for k in keys})
PY
}
timeout 60 python -m pytest -q tests/test_cold_tier.py tests/test_fetch.py -k "pinned or cuda" > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"
timeout 120 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods pqcache,tiered \
    --batch 4 --new-tokens 32 --out "$OUT/tp32k" --quiet --no-plots > "$OUT/tp32k.log" 2>&1
row "$OUT/tp32k/results.json"
timeout 330 python -m benchmarks.cli run --model probe --device cuda --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval \
    --lengths 4096,8192 --budgets 0.05 --samples 40 --out "$OUT/probe40" --quiet --no-plots \
    --methods full,quant,pqcache,tiered@alpha_p=1:alpha_q=4,tiered@alpha_p=2:alpha_q=8,tiered@alpha_p=4:alpha_q=16 \
    > "$OUT/probe40.log" 2>&1
sed -n '/## Accuracy/,/## Speed/p' "$OUT/probe40/summary.md" | grep "^|"
timeout 170 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods pqcache,tiered \
    --batch 2 --new-tokens 16 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
row "$OUT/tp128k/results.json"
