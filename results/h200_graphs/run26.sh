#!/usr/bin/env bash
# 2026-12-05, seventh session, for the next session with a machine, after run25.sh (not run yet):
#   bash results/h200_graphs/run26.sh     (on the GPU machine, .device-deps carried; ~3 minutes)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
# the probe's pqcache cells through the engine again (its steps now run ahead and ride), against call18's
# generate() table (that path is unchanged): issue 17's accuracy row, within one sample per cell
timeout 150 python -m benchmarks.cli run --model probe --device cuda \
    --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval --lengths 4096,8192 --budgets 0.2,0.05 \
    --samples 40 --methods pqcache --path engine --max-minutes 2.3 --out "$OUT/probe40_pqcache_engine" --quiet \
    --no-plots > "$OUT/probe40_pqcache_engine.log" 2>&1
python results/cpu_probe_engine_vs_generate/side_by_side.py "$OUT/probe40_pqcache_engine/results.jsonl" \
    results/h200_graphs/call18/probe40_generate/results.jsonl | tail -n 1
