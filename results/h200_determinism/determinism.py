"""Same inputs, same outputs on the GPU: N identical greedy generations per preset, half of them
while every host core is kept busy, compared token for token and logit for logit.

    python results/h200_determinism/determinism.py --out DIR [--runs 6] [--length 8192] [--batch 2]

Model: the Llama-3-8B shape with --layers layers, random bf16 weights (seeded), random prompts
(seeded). Writes DIR/determinism.json: per preset, the sha256 of each run's tokens and logits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch


def _busy(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--presets", default="full,quant,leankv,pqcache,tiered")
    p.add_argument("--model", default="llama3-8b", choices=["llama3-8b", "tiny"], help="tiny: a CPU smoke run")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("determinism.py: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from types import SimpleNamespace

    from benchmarks.perf.throughput import build_model, resolve_model
    from kvstore import KVStoreClient, KVStoreConfig

    src = resolve_model(SimpleNamespace(model=args.model, layers=args.layers, device=args.device, dtype="auto",
                                        lengths=[args.length], new_tokens=args.new_tokens))
    model = build_model(src, seed=0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, src.config.vocab_size, (args.batch, args.length), generator=gen).to(src.device)
    mask = torch.ones_like(ids)
    result = {"model": args.model, "layers": args.layers, "length": args.length, "batch": args.batch,
              "new_tokens": args.new_tokens, "runs": args.runs, "device": torch.cuda.get_device_name() if src.device.type == "cuda" else "cpu",
              "stressed_runs": list(range(args.runs // 2, args.runs)), "cores": os.cpu_count(), "presets": {}}
    for preset in args.presets.split(","):
        tok, lg, secs = [], [], []
        for r in range(args.runs):
            stop, procs = mp.Event(), []
            if r >= args.runs // 2:  # the second half under a fully loaded host
                procs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
                for pr in procs:
                    pr.start()
            t0 = time.perf_counter()
            with KVStoreClient(KVStoreConfig.preset(preset)).attach(model):
                out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                     min_new_tokens=args.new_tokens, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
            if src.device.type == "cuda":
                torch.cuda.synchronize()
            secs.append(round(time.perf_counter() - t0, 2))
            stop.set()
            for pr in procs:
                pr.join()
            tok.append(_sha(out.sequences[:, args.length:]))
            lg.append(_sha(torch.stack(out.logits, 1)))
        row = {"tokens_sha256": tok, "logits_sha256": lg, "seconds": secs,
               "distinct_tokens": len(set(tok)), "distinct_logits": len(set(lg))}
        result["presets"][preset] = row
        print(f"{preset:8s} distinct tokens {row['distinct_tokens']} logits {row['distinct_logits']} "
              f"of {args.runs} runs; s/run {secs}", flush=True)
        (args.out / "determinism.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
