"""The probe table of two kvstore-bench run folders side by side (the engine's and generate()'s rows).

    python results/cpu_probe_engine_vs_generate/side_by_side.py ENGINE/results.jsonl GENERATE/results.jsonl
"""
import json, sys
def load(p):
    out = {}
    for l in open(p):
        r = json.loads(l)
        out[(r["task"], r["length"], r["method"], r["budget"])] = r
    return out
e, g = load(sys.argv[1]), load(sys.argv[2])
keys = [k for k in e if k in g]
print("| task | length | method | engine acc | generate acc | samples apart | engine comp. | generate comp. |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
worst = 0
for k in keys:
    a, b = e[k], g[k]
    apart = round(abs(a["accuracy"] - b["accuracy"]) * a["samples"], 2)
    worst = max(worst, apart)
    m = k[2] if k[3] == "all" else f"{k[2]}@{k[3]}"
    print(f"| {k[0]} | {k[1]} | {m} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {apart:g} | {a['compression']:.2f}x | {b['compression']:.2f}x |")
print(f"\ncells compared: {len(keys)}; largest difference: {worst:g} samples; engine only: {len(e) - len(keys)}, generate only: {len(g) - len(keys)}")
