#!/usr/bin/env bash
# One device call: the CUDA-graph tests, then kvstore-bench throughput through the engine (CUDA
# graph where the preset allows) and through generate(), Llama-3-8B shape, 32 layers, 32K x 8.
#   bash results/h200_engine/run.sh      (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/env.txt" 2>&1
timeout 150 python -m pytest -q tests/test_cuda_graph.py tests/test_decode_allocations.py > "$OUT/cuda_tests.log" 2>&1
tail -3 "$OUT/cuda_tests.log"
B=${B:-8}; L=${L:-32k}
timeout 280 python -m benchmarks.cli throughput --model llama3-8b --lengths $L --methods ${METHODS:-hf,quant,full} \
    --batch $B --new-tokens 32 --out "$OUT/engine" --quiet --path engine > "$OUT/engine.log" 2>&1
grep -iE "warn|error|captur" "$OUT/engine.log" | head -5
timeout 150 python -m benchmarks.cli throughput --model llama3-8b --lengths $L --methods ${GEN_METHODS:-quant} \
    --batch $B --new-tokens 32 --out "$OUT/generate" --quiet --path generate > "$OUT/generate.log" 2>&1
python - "$OUT" <<'PY'
import json, sys, pathlib
for d in ("engine", "generate"):
    p = pathlib.Path(sys.argv[1]) / d / "results.json"
    for r in json.loads(p.read_text()) if p.exists() else []:
        tp = r["tpot_s"] and round(r["tpot_s"] * 1e3, 2)
        print(d, r["method"], r["length"], r["batch"], r["path"], r.get("decode_path"), "TTFT", r["ttft_s"] and round(r["ttft_s"], 2),
              "TPOT ms", tp, "tok/s", r["decode_tokens_per_s"] and round(r["decode_tokens_per_s"], 1),
              "share", r["roofline_share"] and round(r["roofline_share"], 3), r["error"])
PY
