#!/usr/bin/env bash
# Device call 3 of the cold-path issue: tiered's retune at budget 1/20 with 16-token pages (less
# page fragmentation in LeanKV's sparse heads) on the probe at 40 samples, and tiered's TT2T at 128K x 2.
#   bash results/h200_cold/run3.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
timeout 300 python -m benchmarks.cli run --model probe --device cuda --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval \
    --lengths 4096,8192 --budgets 0.05 --samples 40 --out "$OUT/probe40" --quiet --no-plots \
    --methods tiered@alpha_p=1:alpha_q=4:page_size=16,tiered@alpha_p=1:alpha_q=8:page_size=16,tiered@alpha_p=1.5:alpha_q=6:page_size=16,tiered@alpha_p=2:alpha_q=8:page_size=16 \
    > "$OUT/probe40.log" 2>&1
sed -n '/## Accuracy/,/## Speed/p' "$OUT/probe40/summary.md" | grep "^|"
timeout 240 python -m benchmarks.cli throughput --model llama3-8b --lengths 128k --methods tiered \
    --batch 2 --new-tokens 16 --out "$OUT/tp128k" --quiet --no-plots > "$OUT/tp128k.log" 2>&1
python - "$OUT/tp128k/results.json" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1])
for r in json.loads(p.read_text()) if p.exists() else []:
    keys = ("method", "length", "batch", "decode_path", "ttft_s", "tt2t_s", "tpot_s", "host_bytes_per_seq",
            "host_reserved_bytes", "gpu_kv_bytes_per_seq", "dense_kv_bytes_per_seq", "error")
    print({k: r.get(k) for k in keys})
PY
