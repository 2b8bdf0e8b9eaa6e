"""A decode step through `kvstore.Engine` under torch.profiler: its kernels, their time, the gaps.

    python -m benchmarks.perf.profile_step --model llama3-8b --length 32k --batch 4 \\
        --methods quant,pqcache,tiered --steps 8 --out DIR

Per method: the engine admits `--batch` random prompts of `--length` tokens, decodes `--warmup`
steps (the CUDA graph is captured there), then `--steps` steps run under torch.profiler, as the
engine runs them (no device sync between steps: with `Engine(overlap=...)` step t+1 is launched
before step t's tokens are read). Reported per step: the wall time (from one step's tokens on the
host to the next's), the device kernels launched and their summed time
(on a GPU: CUDA kernels, inside a graph's replay too; on a CPU: the aten ops that ran), their share
of the wall time (the rest is launch gaps and host work), the kernels that took the most time, and
the host's phases of the step (the engine's `kvstore.*` profiler ranges): `plan` (the store's plan,
with its host syncs and the kernels they wait for), `graph_replay` (the launch of the captured step)
and `sample` (which waits for the step's kernels, then samples); and, from as many steps run just
before without the profiler (which slows the host's Python about 2x), the host's real time a step in
the plan, the graph's launch, the wait for the tokens and the rest. The requests outlive the profiled
steps, so no release (the pages' zeroing) falls inside them.
Written: DIR/profile.json and DIR/summary.md (what issue 17's note quotes as the profile summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.args import check_out_dir, csv as _csv, lengths as _lengths


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b", help="llama3-8b or tiny (random weights), or a local folder")
    p.add_argument("--layers", type=_positive, default=None, help="keep only the first N decoder layers")
    p.add_argument("--length", type=_lengths, default=[32768], help="prompt tokens, e.g. 32k")
    p.add_argument("--batch", type=_positive, default=4)
    p.add_argument("--methods", type=_csv, default=["quant", "pqcache", "tiered"],
                   help="kvstore presets or suite methods, with options as in kvstore-bench throughput")
    p.add_argument("--budget", default=None,
                   help="token budget of the methods that select (pqcache, tiered, ...), as in kvstore-bench "
                        "throughput: a fraction of the prompt (0.05) or a token count; default the suite's 0.2")
    p.add_argument("--steps", type=_positive, default=8, help="decode steps profiled")
    p.add_argument("--warmup", type=_positive, default=3, help="decode steps before profiling (captures)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: profile.json, summary.md")
    args = p.parse_args(argv)
    from benchmarks.perf import throughput

    try:
        args.method_specs = throughput.parse_methods(args.methods, args.budget)
        if any(m.is_hf for m in args.method_specs):
            raise ValueError("hf has no engine to profile; use kvstore-bench throughput")
        ns = argparse.Namespace(model=args.model, layers=args.layers, lengths=args.length,
                                new_tokens=_new_tokens(args.warmup, args.steps), device=args.device, dtype=args.dtype)
        args.source = throughput.resolve_model(ns)
        args.out = check_out_dir(args.out)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _new_tokens(warmup: int, steps: int) -> int:
    """Tokens each request generates: none finishes in the windows (the warmup, the unprofiled
    steps, then the profiled ones), and the model's positions are sized for as many."""
    return warmup + 2 * steps + 2


def _kernels(prof, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every device kernel the profile saw. On a CPU: every aten op that no
    other aten op called (the ones a GPU would launch), with the time of it and what it called."""
    out = []
    for e in prof.events():
        if device.type == "cuda":  # (the engine's kvstore.* ranges show on the GPU's timeline too: not kernels)
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("kvstore."):
                out.append((e.name, e.device_time))
        elif e.name.startswith("aten::"):
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:
                out.append((e.name, e.cpu_time))
    return out


def _step_walls(engine, steps: int) -> list[float]:
    """`steps` decode steps as the engine runs them; each one's wall time, from one step's tokens on the
    host to the next's (decode_step returns them). No device sync between steps: the engine launches
    step t+1 before it reads step t's tokens."""
    walls = []
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.decode_step()
        t1 = time.perf_counter()
        walls.append(t1 - t0)
        t0 = t1
    return walls


def _host_timing(engine, steps: int) -> dict:
    """`steps` decode steps timed without the profiler (which slows the host's Python ~2x), ms per step:
    the median step's wall time ("wall"), the host's time in the store's plan ("plan"; its parts "plan.*",
    each with the host syncs it makes), in the graph's launch with its signature check ("launch", CUDA
    graphs only) and in waiting for the step's tokens and finishing them ("wait"); "other" is the rest
    of the host's step (sampling's launch, the inputs)."""
    spent = {"plan": 0.0, "launch": 0.0, "wait": 0.0}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    store, graphs = engine.store, engine.graphs
    # instance attributes over the methods, removed below; the plan's parts too (as the profiler's
    # kvstore.plan.* ranges split it, but at the host's unprofiled speed)
    wrapped = [("plan", store, "plan"), ("wait", engine, "_accept"), ("launch", graphs, "run"),
               ("plan.policy", store.policy, "plan"), ("plan.apply", store.hot, "apply"),
               ("plan.workspace", store.hot, "plan_workspace"), ("plan.cold.host_writes", store.cold, "plan_step"),
               ("plan.cold.selection", store.cold_path, "_plan_retrieval")]
    wrapped = [(name, obj, attr) for name, obj, attr in wrapped if obj is not None and hasattr(obj, attr)]
    for name, obj, attr in wrapped:
        spent.setdefault(name, 0.0)
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    try:
        walls = _step_walls(engine, steps)
    finally:
        for _, obj, attr in wrapped:
            delattr(obj, attr)
    out = {k: v / steps * 1e3 for k, v in spent.items()}
    out["wall"] = statistics.median(walls) * 1e3
    out["other"] = max(0.0, sum(walls) / steps * 1e3 - out["plan"] - out["launch"] - out["wait"])
    return out


def profile_method(model, method, length: int, batch: int, steps: int, warmup: int, seed: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from kvstore.engine import Engine
    from kvstore.sampling import SamplingParams

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)
    config = dataclasses.replace(method.config, max_batch_size=batch)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with Engine(model, config, max_batch=batch) as engine:
        # none finishes in the windows (the unprofiled one, then the profiled one)
        params = SamplingParams(max_new_tokens=_new_tokens(warmup, steps), ignore_eos=True)
        for row in prompts:
            engine.add_request(row.to(device), params)
        engine.admit()
        for _ in range(warmup):
            engine.decode_step()
        sync()
        unprofiled = _host_timing(engine, steps)
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            walls = _step_walls(engine, steps)
            sync()
        path, captures = engine.decode_path, engine.graphs.captures if engine.graphs is not None else 0
    kernels = _kernels(prof, device)
    phases: dict[str, float] = {}
    plan_ranges = []
    for e in prof.events():
        if e.name.startswith("kvstore.") and e.device_type == torch.autograd.DeviceType.CPU:
            key = e.name.removeprefix("kvstore.")
            phases[key] = phases.get(key, 0.0) + e.cpu_time_total / steps / 1e3
            if key == "plan":
                plan_ranges.append((e.time_range.start, e.time_range.end))
    plan_top: dict[str, list[float]] = {}
    if device.type == "cuda" and plan_ranges:  # the plan's own kernels: those that start inside its ranges
        for e in prof.events():
            if (e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("kvstore.")
                    and any(a <= e.time_range.start <= b for a, b in plan_ranges)):
                plan_top.setdefault(e.name, []).append(e.device_time)
        phases["plan kernels"] = sum(sum(v) for v in plan_top.values()) / steps / 1e3
    totals: dict[str, list[float]] = {}
    for name, us in kernels:
        totals.setdefault(name, []).append(us)
    top = sorted(((n, sum(v) / steps, len(v) / steps) for n, v in totals.items()), key=lambda x: -x[1])[:40]
    busy_ms = sum(us for _, us in kernels) / steps / 1e3
    wall_ms = statistics.median(walls) * 1e3
    return {
        "method": method.label, "length": length, "batch": batch, "decode_path": path, "captures_in_profile": captures,
        "wall_ms_per_step": wall_ms, "kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": busy_ms,
        "kernel_share": busy_ms / wall_ms if wall_ms else None,
        "host_phases_ms_per_step": phases,
        "unprofiled_ms_per_step": unprofiled,
        "top_kernels": [{"name": n, "ms_per_step": us / 1e3, "launches_per_step": c} for n, us, c in top],
        "plan_top_kernels": [{"name": n, "ms_per_step": sum(v) / steps / 1e3, "launches_per_step": len(v) / steps}
                             for n, v in sorted(plan_top.items(), key=lambda kv: -sum(kv[1]))[:20]],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.perf.throughput import build_model

    model = build_model(args.source, seed=args.seed)
    length = args.length[0]
    rows = [profile_method(model, m, length, args.batch, args.steps, args.warmup, args.seed) for m in args.method_specs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(rows, indent=1))
    unit = "CUDA kernels" if args.source.device.type == "cuda" else "aten ops (CPU)"
    lines = [f"# Decode step profile: {args.model}, {args.source.layers} layers, {length} tokens x {args.batch}, "
             f"{args.steps} steps", "", f"| method | path | step ms | {unit} / step | their ms | share of the step |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['decode_path']} | {r['wall_ms_per_step']:.2f} | {r['kernels_per_step']:.0f} | "
                     f"{r['kernel_ms_per_step']:.2f} | {r['kernel_share']:.0%} |")
    names = sorted({k for r in rows for k in r["host_phases_ms_per_step"]})
    if names:
        lines += ["", "The host's phases of a step (ms; `sample` waits for the step's kernels):", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {r['method']} | " + " | ".join(f"{r['host_phases_ms_per_step'].get(n, 0.0):.2f}" for n in names)
                  + " |" for r in rows]
    cols = ["wall", "plan", "launch", "wait", "other"]
    cols += sorted({k for r in rows for k in r["unprofiled_ms_per_step"] if k.startswith("plan.")})
    lines += ["", "The same steps without the profiler (ms a step: the host's plan, graph launch, wait for the "
              "tokens, the rest; wall: the median step; plan.*: the plan's parts, each with its host syncs):", "",
              "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['method']} | " + " | ".join(f"{r['unprofiled_ms_per_step'].get(k, 0.0):.2f}" for k in cols) + " |"
              for r in rows]
    for r in rows:
        lines += ["", f"{r['method']}: the kernels that took the most time a step", ""]
        lines += [f"- {k['name'][:90]}: {k['ms_per_step']:.3f} ms, {k['launches_per_step']:.0f} launches"
                  for k in r["top_kernels"][:8]]
        if r["plan_top_kernels"]:
            lines += ["", f"{r['method']}: the plan's costliest kernels a step", ""]
            lines += [f"- {k['name'][:90]}: {k['ms_per_step']:.3f} ms, {k['launches_per_step']:.0f} launches"
                      for k in r["plan_top_kernels"][:8]]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4 + len(rows) + (5 + len(rows) if names else 0) + 5 + len(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
