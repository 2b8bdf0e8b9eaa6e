#!/usr/bin/env bash
# Device call 4 of the graph issue (prepared 2026-12-05 without a GPU): issue 17's accuracy check, the
# probe table through the engine (CUDA graphs) and through generate() (attach), side by side: passkey,
# niah_single_1, niah_multikey_2, kv_retrieval at 4K and 8K, 40 samples; full, quant, pqcache and tiered at
# budgets 1/5 and 1/20. Each path stops cleanly before its time is up (--max-minutes); rerunning the
# same command into the same folders resumes where it stopped.
#   bash results/h200_graphs/run4.sh     (on the GPU machine, .device-deps carried)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
for path in engine generate; do
    timeout 285 python -m benchmarks.cli run --model probe --device cuda \
        --tasks passkey,niah_single_1,niah_multikey_2,kv_retrieval --lengths 4096,8192 --budgets 0.2,0.05 \
        --samples 40 --methods full,quant,pqcache,tiered --path "$path" --max-minutes 4.5 \
        --out "$OUT/probe40_$path" --quiet --no-plots > "$OUT/probe40_$path.log" 2>&1
    echo "== $path"; sed -n '/## Accuracy/,/## Per method/p' "$OUT/probe40_$path/summary.md" | grep "^|"
done
