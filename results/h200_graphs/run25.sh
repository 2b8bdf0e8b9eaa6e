#!/usr/bin/env bash
# 2026-12-05, seventh session, for the next session with a machine (not run yet): pqcache's plan now reads
# nothing back (the host's lengths and slots reach the window policy and the cold path, the host tier's writes
# land a step late) and its steps launched ahead ride (cannot be taken back); tiered's plan reads 4 times, not 7.
# (1) the overlap's GPU test with pqcache; (2) the step's profile at budget 1/20, the unprofiled plan split by part
# (quant, pqcache through the overlap, tiered plainly); (3) quant beside pqcache and tiered at 32K x 4, with the
# overlap (--path engine) and without (--path engine-plain), one run each, on one machine.
#   bash results/h200_graphs/run25.sh     (on the GPU machine, .device-deps carried; ~9 minutes; run26.sh after it)
set -u
bash .device-deps/install.sh > /dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 90 python -m pytest -q tests/test_overlap.py -k cuda > "$OUT/test_gpu.log" 2>&1
grep -o "[a-z_/]*\.py:[0-9]*: called a synchronizing" "$OUT/test_gpu.log" | sort | uniq -c; tail -n 1 "$OUT/test_gpu.log"
timeout 200 python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 --budget 0.05 \
    --methods quant,pqcache,tiered --steps 4 --out "$OUT/profile32k" > "$OUT/profile32k.log" 2>&1
sed -n '/without the profiler/,/^$/p' "$OUT/profile32k/summary.md"; grep -A5 "^| method | wall" "$OUT/profile32k/summary.md"
for path in engine engine-plain; do
    timeout 140 python -m benchmarks.cli throughput --model llama3-8b --lengths 32k --methods quant,pqcache,tiered \
        --budget 0.05 --batch 4 --new-tokens 24 --path "$path" --out "$OUT/tp32k_$path" --quiet --no-plots \
        > "$OUT/tp32k_$path.log" 2>&1
    grep "^| quant\|^| pqcache\|^| tiered" "$OUT/tp32k_$path/summary.md"
done
