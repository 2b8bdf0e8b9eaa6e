"""GPU KV memory and logit drift of the hot-tier presets against dense KV (CPU is fine).

    python -m benchmarks.perf.memory_report                       # random bf16 Llama, 1024-token prompt
    python -m benchmarks.perf.memory_report --model probe --length 2048 --json $OUT/memory.json
    python -m benchmarks.perf.memory_report --presets quant,leankv,tiered --set tiered:alpha_prune=1.0

For each preset the model (one bf16 Llama, batch 1) prefills one benchmark prompt
(benchmarks/suite/tasks.py, niah_single_1 by default) and decodes `--steps` tokens *teacher-forced*
on the unattached model's greedy continuation, so every step's logits are comparable:

  max_rel_logit   max over decode steps of max|logits - ref| / max|ref|   (ref: the unattached model)
  rel_l2          mean over steps of ||logits - ref|| / ||ref||
  top1            share of steps whose argmax equals ref's
  gpu_kv_bytes    `stats()["gpu_kv_bytes"]` after the last step: hot-tier pages *with* their slot
                  metadata (position, LeanKV score) + retrieval state on the device (PQ codes and
                  codebooks, GPU cache of retrieved tokens, residency map) where the preset has it
  dense/gpu       dense_kv_bytes (every token at the model's dtype, all layers) / gpu_kv_bytes
  host_kv_bytes   cold-tier chunks in use (every token, at the cold tier's format: K8V4 rows in tiered) where the preset has one

A random-weight model attends diffusely (every token's mean attention is near 1/n), so LeanKV's
thresholds relative to 1/n prune little there; `--set preset:field=value` overrides preset fields
(repeatable) to show other operating points. Timings are not measured here (GPU scripts do that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import torch

from kvstore.adapters.hf import CACHE_ARG, model_cache

DEFAULT_PRESETS = "full,quant,leankv,tiered"


def _parse_sets(items: list[str], presets: list[str]) -> dict[str, dict]:
    from kvstore.config import KVStoreConfig

    fields = {f.name: f for f in dataclasses.fields(KVStoreConfig)}
    out: dict[str, dict] = {p: {} for p in presets}
    for item in items:
        try:
            name, rest = item.split(":", 1)
            field, value = rest.split("=", 1)
        except ValueError:
            raise SystemExit(f"--set {item!r}: want PRESET:FIELD=VALUE, e.g. tiered:alpha_prune=1.0") from None
        if name not in out:
            raise SystemExit(f"--set {item!r}: preset {name!r} is not among --presets {','.join(presets)}")
        if field not in fields or field == "name":
            raise SystemExit(f"--set {item!r}: KVStoreConfig has no field {field!r}")
        text = value.strip()
        if text.lower() in ("none", "null"):
            parsed = None
        elif text.lower() in ("true", "false"):
            parsed = text.lower() == "true"
        else:
            try:
                parsed = int(text)
            except ValueError:
                try:
                    parsed = float(text)
                except ValueError:
                    parsed = text
        out[name][field] = parsed
    return out


def _model(name: str, dtype: torch.dtype, head_dim: int):
    from benchmarks.suite.runner import load_model, random_model

    if name == "random":  # the probe model's shape (GQA 8/2, 4 layers), random weights
        model, tok = random_model(seed=0, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim)
        return model.to(dtype), tok, f"random Llama (4 layers, 8/2 heads, d={head_dim})"
    model, tok, label = load_model(name, device="cpu", dtype={torch.bfloat16: "bf16", torch.float32: "fp32",
                                                              torch.float16: "fp16"}[dtype])
    return model, tok, label


@torch.no_grad()
def _reference(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of the unattached model and its logits [steps + 1, V] (fp32)."""
    out = model(ids, use_cache=True)
    past, logits = model_cache(out), [out.logits[0, -1].float()]
    toks = []
    for _ in range(steps):
        nxt = logits[-1].argmax().view(1, 1)
        toks.append(nxt)
        out = model(nxt, **{CACHE_ARG: past}, use_cache=True)
        past = model_cache(out)
        logits.append(out.logits[0, -1].float())
    return torch.cat(toks, 1), torch.stack(logits)


@torch.no_grad()
def _run(model, ids: torch.Tensor, forced: torch.Tensor, config) -> tuple[torch.Tensor, dict, float]:
    """Teacher-forced decode with the store attached: logits [steps + 1, V] fp32, final stats, seconds."""
    from kvstore import KVStoreClient

    client = KVStoreClient(config)
    t0 = time.perf_counter()
    with client.attach(model):
        out = model(ids, use_cache=True)
        past, logits = model_cache(out), [out.logits[0, -1].float()]
        try:
            for i in range(forced.shape[1]):
                out = model(forced[:, i: i + 1], **{CACHE_ARG: past}, use_cache=True)
                past = model_cache(out)
                logits.append(out.logits[0, -1].float())
            stats = client.stats()
        finally:
            past.release()
    return torch.stack(logits), stats, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random", help="'random' (default), 'probe', or a local HF model folder")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dim", type=int, default=64, help="head dim of the random model (64: the probe's, 128: Llama-3's)")
    p.add_argument("--task", default="niah_single_1")
    p.add_argument("--length", type=int, default=1024, help="prompt tokens")
    p.add_argument("--steps", type=int, default=16, help="teacher-forced decode steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presets", default=DEFAULT_PRESETS)
    p.add_argument("--set", action="append", default=[], metavar="PRESET:FIELD=VALUE")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    from benchmarks.suite.tasks import make_sample
    from kvstore.config import KVStoreConfig

    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    overrides = _parse_sets(args.set, presets)
    configs = {}
    for name in presets:
        try:
            configs[name] = KVStoreConfig.preset(name, **overrides[name])
        except (ValueError, NotImplementedError) as exc:
            raise SystemExit(f"preset {name!r}: {exc}") from None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    model, tok, label = _model(args.model, dtype, args.head_dim)
    sample = make_sample(args.task, args.length, args.seed, tok)
    ids = torch.tensor([sample.input_ids])
    forced, ref = _reference(model, ids, args.steps)

    rows = []
    for name, config in configs.items():
        logits, s, secs = _run(model, ids, forced, config)
        d = logits - ref
        dec = slice(1, None)  # decode steps (step 0 is the dense prefill's logits)
        ref_max = ref[dec].abs().amax(-1)
        row = {
            "preset": name,
            "overrides": overrides[name],
            "max_rel_logit": float((d[dec].abs().amax(-1) / ref_max).max()),
            "rel_l2": float((d[dec].norm(dim=-1) / ref[dec].norm(dim=-1)).mean()),
            "top1": float((logits[dec].argmax(-1) == ref[dec].argmax(-1)).float().mean()),
            "prefill_exact": bool(torch.equal(logits[0], ref[0])),
            "tokens": s["tokens"],
            "gpu_kv_bytes": s["gpu_kv_bytes"],
            "dense_kv_bytes": s["dense_kv_bytes"],
            "dense_over_gpu": s["dense_kv_bytes"] / max(1, s["gpu_kv_bytes"]),
            "hot_tier_bytes": s["gpu_kv_bytes"] - s.get("retrieval_gpu_bytes", 0),
            "retrieval_gpu_bytes": s.get("retrieval_gpu_bytes", 0),
            "host_kv_bytes": s["host_kv_bytes"],
            "hot_high_tokens": s["hot_high_tokens"],
            "hot_low_tokens": s["hot_low_tokens"],
            "gpu_cache_hit_rate": s.get("gpu_cache_hit_rate"),
            "seconds": round(secs, 2),
        }
        rows.append(row)

    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    print(f"model: {label}, {args.dtype}; prompt: {args.task} {ids.shape[1]} tokens; {args.steps} teacher-forced "
          f"decode steps; slots = tokens x {L} layers x {H} KV heads")
    head = (f"{'preset':<10}{'dense/gpu':>10}{'gpu_kv_B':>11}{'hot_B':>10}{'retr_B':>10}{'dense_B':>11}"
            f"{'host_B':>11}{'high%':>7}{'low%':>6}{'pruned%':>8}{'max_rel':>9}{'rel_l2':>8}{'top1':>6}{'hit':>6}")
    print(head)
    for r in rows:
        slots = r["tokens"] * L * H
        high, low = 100 * r["hot_high_tokens"] / slots, 100 * r["hot_low_tokens"] / slots
        pruned = max(0.0, 100 - high - low)
        hit = r["gpu_cache_hit_rate"]
        hit_s = "-" if hit is None or hit != hit else f"{hit:.2f}"
        print(f"{r['preset']:<10}{r['dense_over_gpu']:>9.2f}x{r['gpu_kv_bytes']:>11}{r['hot_tier_bytes']:>10}"
              f"{r['retrieval_gpu_bytes']:>10}{r['dense_kv_bytes']:>11}{r['host_kv_bytes']:>11}{high:>7.1f}{low:>6.1f}"
              f"{pruned:>8.1f}{r['max_rel_logit']:>9.4f}{r['rel_l2']:>8.4f}{r['top1']:>6.2f}{hit_s:>6}")
        if r["overrides"]:
            print(f"{'':<10}overrides: {r['overrides']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": label, "dtype": args.dtype, "task": args.task, "length": int(ids.shape[1]),
                       "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
