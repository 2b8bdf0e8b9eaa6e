#!/usr/bin/env bash
# Device call 5 (prepared 2026-12-05 without a GPU): the cluster worker now runs kvstore.Engine (CUDA graphs,
# the recorder into the cold-tier segment, Engine.restore on takeover). One GPU worker, the probe model, a clean
# run and a kill-worker run per preset: the outputs' sha256 must match, with resumed > 0 and re_prefills 0.
#   bash results/h200_graphs/run5.sh     (on the GPU machine, .device-deps carried: it brings ray)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
for preset in quant tiered; do
    for chaos in none kill-worker@6; do
        extra=(); [ "$chaos" != none ] && extra=(--chaos "$chaos")
        timeout 130 python -m cluster.launch --model probe --workers 1 --preset "$preset" --requests 16 \
            --prompt-tokens 512,2048 --max-new-tokens 16 --max-seqs 8 "${extra[@]}" \
            --summary-json "$OUT/cluster_${preset}_${chaos%@*}.json" > "$OUT/cluster_${preset}_${chaos%@*}.log" 2>&1
        python - "$OUT/cluster_${preset}_${chaos%@*}.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[-1], {k: s.get(k) for k in ("completed", "failed", "worker_restarts", "resumed", "re_prefills", "outputs_sha256")}, s.get("timings", {}).get("tokens_per_s"))
PY
    done
done
grep -h "decode step" "$OUT"/cluster_*.log | sort | uniq -c | head
