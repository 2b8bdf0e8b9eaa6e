"""Paged decode-attention kernels vs torch SDPA over bf16 KV (Llama-3-8B head shape): K8V4 pages, or
(--pages bf16) pages in the model's dtype (`paged_decode_attention_full`: full, pqcache, oracle).

    python -m benchmarks.perf.decode_attention --out $OUT/decode_attention.json
    # DEFAULT_LAUNCH against launch overrides in one run, in this order (repeats allowed, to see the noise):
    python -m benchmarks.perf.decode_attention --out $OUT/dense.json --batches 8 --lengths 131072 --variants default,high_dense=false
    # the kernel over bf16 pages (FULL_LAUNCH and its sweep): the same bytes as SDPA reads, so ~1x is its roofline
    python -m benchmarks.perf.decode_attention --out $OUT/full.json --pages bf16 --sweep

For each batch B and context N: Hq=32, Hkv=8, d=128, 32-token pages of 200 B per token (K8V4,
fp16 scale+zero) + a 4 B position per slot, pages scattered at random in the pool (every slot holds
a token: the high tier as KVStore keeps it; with high_dense, DEFAULT_LAUNCH's, the kernel does not
read the positions, and the bytes counted leave them out); with --pages bf16, pages of 512 B per
token (K and V in bf16) read through the same scattered page table. Prints time,
bytes read, achieved GB/s next to the copy bandwidth measured in the same run (a device-to-device
copy, read + write bytes / time, as DESIGN.md's 2.94 TB/s), and the speed-up over SDPA. SDPA is
timed two ways, with `enable_gqa=True` and with the query group folded into the query length
(q [B, Hkv, G, d] over K [B, Hkv, N, d], no causal mask), and the faster one is the baseline.
Times: triton.testing.do_bench (CUDA events, L2 flushed between runs), median.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HQ, HKV, D, TPP = 32, 8, 128, 32
KB, VB = D, D // 2
BYTES_PER_TOKEN = KB + VB + 8  # codes + fp16 scale/zero for K and V
#: --pages: bytes a token and KV head of each page kind
PAGE_TOKEN_BYTES = {"k8v4": BYTES_PER_TOKEN, "bf16": 4 * D}


def build_pool(B: int, N: int, device, seed: int = 0, pages_kind: str = "k8v4"):
    g = torch.Generator(device=device).manual_seed(seed)
    pages_per_head = N // TPP
    P = B * HKV * pages_per_head + 1
    page_bytes = TPP * PAGE_TOKEN_BYTES[pages_kind]
    if pages_kind == "bf16":  # K and V in [-1, 1)
        data = (torch.rand(P, page_bytes // 2, device=device, generator=g) * 2 - 1).to(torch.bfloat16).view(torch.uint8)
    else:
        data = torch.randint(0, 256, (P, page_bytes), dtype=torch.uint8, device=device, generator=g)
        meta = data[:, TPP * (KB + VB):].view(torch.float16).view(P, TPP, 4)
        meta[..., 0] = 2.0 / 255  # k scale: keys in [-1, 1]
        meta[..., 1] = -1.0
        meta[..., 2] = 2.0 / 15
        meta[..., 3] = -1.0
    perm = torch.randperm(P - 1, device=device, generator=g).to(torch.int32) + 1
    pages = perm.view(B, 1, HKV, pages_per_head).contiguous()
    num_high = torch.full((B, 1, HKV), N, dtype=torch.int32, device=device)
    slot_pos = torch.arange(TPP, dtype=torch.int32, device=device).repeat(P, 1)
    return data, pages, num_high, slot_pos


def run_kernel_fn(q, data, pages, num_high, slot_pos, nsplit, out_dtype=None, pages_kind="k8v4", **launch):
    """A closure running the kernel over the pool with `nsplit` splits and launch options (DEFAULT_LAUNCH's, or
    FULL_LAUNCH's over bf16 pages, if none)."""
    from gpu_kernels.paged_attention import paged_decode_attention, paged_decode_attention_full

    B = q.shape[0]
    C = pages.shape[-1]
    pps = math.ceil(C / nsplit)
    nsplit = math.ceil(C / pps)
    out = torch.empty(B, HQ, D, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(B, HQ, dtype=torch.float32, device=q.device)
    po = torch.empty(B, HQ, nsplit, D, dtype=torch.float32, device=q.device)
    pl = torch.empty(B, HQ, nsplit, dtype=torch.float32, device=q.device)
    seq = torch.arange(B, device=q.device)

    def fn():
        if pages_kind == "bf16":
            paged_decode_attention_full(q, data, torch.bfloat16, pages, num_high, seq, 0, slot_pos, TPP, D ** -0.5,
                                        out, lse, po, pl, pps, **launch)
        else:
            paged_decode_attention(q, data, pages, num_high, None, seq, 0, slot_pos, (8, 4, TPP), None, 1, D ** -0.5,
                                   out, lse, po, pl, pps, **launch)
        return out

    return fn, out, lse


def check_accuracy(device, pages_kind="k8v4", **launch) -> float:
    """Relative RMS error of the kernel (fp32 output) vs the fp32 reference on the same (dequantized) values."""
    from gpu_kernels import reference

    B, N = 2, 1000
    data, pages, num_high, slot_pos = build_pool(B, 1024, device, seed=1, pages_kind=pages_kind)
    num_high.fill_(N)
    q = torch.randn(B, HQ, D, device=device, dtype=torch.bfloat16)
    fn, out32, _ = run_kernel_fn(q, data, pages, num_high, slot_pos, 5, out_dtype=torch.float32, pages_kind=pages_kind,
                                 **launch)
    fn()
    if pages_kind == "bf16":
        ref, _ = reference.paged_decode_attention_full(q, data, torch.bfloat16, pages[:, 0], num_high[:, 0], slot_pos,
                                                       TPP, D ** -0.5)
    else:
        ref, _, _ = reference.paged_decode_attention(q, data, pages[:, 0], num_high[:, 0],
                                                     torch.zeros_like(num_high[:, 0]), slot_pos, (8, 4, TPP), None, 1,
                                                     D ** -0.5)
    return ((out32 - ref).norm() / ref.norm()).item()


def kernel_bytes(B: int, N: int, C: int, q: torch.Tensor, launch: dict, pages_kind: str = "k8v4") -> int:
    """Bytes one launch reads: pages (+ the 4 B slot positions unless high_dense), page table, queries."""
    from gpu_kernels.paged_attention import DEFAULT_LAUNCH, FULL_LAUNCH

    dense = launch.get("high_dense", (FULL_LAUNCH if pages_kind == "bf16" else DEFAULT_LAUNCH)["high_dense"])
    return B * HKV * N * (PAGE_TOKEN_BYTES[pages_kind] + (0 if dense else 4)) + B * HKV * C * 4 + q.numel() * 2


# The sweep: DEFAULT_LAUNCH first, then variants (masking the high tier, other warps / stages / tokens a
# step, no PTX conversion) and register caps, each at the default split count, half, 4/3, 1.5x and double.
SWEEP = [
    dict(),
    dict(maxnreg=128),
    dict(maxnreg=144),
    dict(high_dense=False),
    dict(num_warps=1, num_stages=4, block_tokens=32),
    dict(num_warps=2, num_stages=2, block_tokens=64),
    dict(num_warps=2, num_stages=3, block_tokens=64),
    dict(num_warps=4, num_stages=3, block_tokens=128),
    dict(num_warps=1, num_stages=3, block_tokens=32, asm_cvt=False),
    dict(num_warps=2, num_stages=2, block_tokens=64, asm_cvt=False),
    dict(num_warps=4, num_stages=2, block_tokens=128, asm_cvt=False),
]
#: --pages bf16: FULL_LAUNCH (4 warps, 3 stages, one 32-token page a step: untimed) first, then warps x tokens a step
SWEEP_FULL = [
    dict(),
    dict(num_warps=1, num_stages=3, block_tokens=32),
    dict(num_warps=2, num_stages=3, block_tokens=32),
    dict(num_warps=4, num_stages=2, block_tokens=32),
    dict(num_warps=2, num_stages=3, block_tokens=64),
    dict(num_warps=4, num_stages=3, block_tokens=64),
    dict(num_warps=8, num_stages=3, block_tokens=64),
    dict(num_warps=8, num_stages=2, block_tokens=128),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits 2 with one line for a bad argument or a machine without a CUDA GPU."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.decode_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--sweep", action="store_true", help="also try other split counts / warps and keep the best")
    ap.add_argument("--variants", help="comma-separated launch variants timed in this order at KVStore's split "
                    "count, each printed: 'default' (DEFAULT_LAUNCH) or key=value:key=value overrides of it, e.g. "
                    "default,high_dense=false (as benchmarks.perf.kernel_resources --variants; repeats allowed); "
                    "with --sweep, timed after it")
    ap.add_argument("--pages", choices=list(PAGE_TOKEN_BYTES), default="k8v4",
                    help="k8v4: the quantized kernel (DEFAULT_LAUNCH); bf16: the kernel over pages in the model's "
                         "dtype (FULL_LAUNCH)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batches):
        ap.error(f"--batches must be >= 1, got {args.batches}")
    if any(n < TPP or n % TPP for n in args.lengths):
        ap.error(f"--lengths must be positive multiples of the {TPP}-token page, got {args.lengths}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        ap.error(f"--out {out}: expected a file in an existing folder")
    from benchmarks.perf.kernel_resources import parse_variant

    try:
        args.variant_launches = [parse_variant(v) for v in args.variants.split(",")] if args.variants else []
    except ValueError as exc:
        ap.error(f"--variants {args.variants!r}: expected default or key=value:key=value ({exc})")
    if not torch.cuda.is_available():
        ap.error(f"needs a CUDA GPU: this torch ({torch.__version__}) sees none. It times the Triton kernel against "
                 "SDPA on the device; without a GPU, `python -m benchmarks.perf.kernel_resources` inspects the kernel")
    try:
        import triton  # noqa: F401 - ships with CUDA builds of torch
    except ImportError:
        ap.error("needs triton (pip install triton)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import triton
    from tqdm.auto import tqdm

    from gpu_kernels.paged_attention import DEFAULT_LAUNCH, FULL_LAUNCH, choose_splits

    variants = args.variant_launches
    kind = args.pages
    launch0, name0, sweep = (FULL_LAUNCH, "FULL_LAUNCH", SWEEP_FULL) if kind == "bf16" else (DEFAULT_LAUNCH,
                                                                                          "DEFAULT_LAUNCH", SWEEP)
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count

    # copy-bandwidth ceiling, measured here
    src = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    copy_gbs = 2 * src.numel() / t_copy / 1e6
    del src, dst
    acc = check_accuracy(device, pages_kind=kind)
    acc_portable = check_accuracy(device, asm_cvt=False) if kind == "k8v4" else float("nan")
    print(f"device: {props.name}, {sms} SMs; copy bandwidth (read+write) {copy_gbs:.0f} GB/s; {kind} pages; "
          f"kernel vs fp32 reference rel RMS {acc:.2e} ({name0}), {acc_portable:.2e} (no PTX: the "
          f"portable conversion); {name0} {launch0}")
    rows = []
    header = (f"{'B':>2} {'N':>7} | {'kernel ms':>9} {'MB read':>8} {'GB/s':>6} {'%copy':>6} | "
              f"{'sdpa ms':>8} {'sdpa GB/s':>9} | {'speedup':>7} | config")
    print(header)
    print("-" * len(header))
    # one row per shape; a --sweep times ~70 launches per shape: the bar says where it is
    shapes = [(B, N) for B in args.batches for N in args.lengths]
    bar = tqdm(total=len(shapes), desc="shapes", unit="shape", disable=args.quiet, file=sys.stderr)
    for B, N in shapes:
        torch.cuda.empty_cache()
        data, pages, num_high, slot_pos = build_pool(B, N, device, pages_kind=kind)
        q = torch.randn(B, HQ, D, device=device, dtype=torch.bfloat16)
        C = pages.shape[-1]
        auto = choose_splits(B, HKV, C, sms)  # what KVStore uses
        configs = [] if variants else [(auto, dict(), False)]  # (splits, launch, print it)
        if args.sweep:
            splits = (auto, max(1, auto // 2), min(C, auto * 4 // 3), min(C, auto * 3 // 2), min(C, auto * 2))
            configs = [(ns, launch, False) for launch in sweep for ns in dict.fromkeys(splits)]
        configs += [(auto, launch, True) for launch in variants]
        best, cfg_times, t_default = None, [], float("nan")
        # warm-up: the GPU idles at low clocks while the pool is built; the first config timed would pay for it
        triton.testing.do_bench(run_kernel_fn(q, data, pages, num_high, slot_pos, auto, pages_kind=kind)[0],
                                warmup=100, rep=200)
        for c, (nsplit, launch, show) in enumerate(configs):
            bar.set_postfix_str(f"B={B} N={N} config {c + 1}/{len(configs)}")
            try:
                fn, _, _ = run_kernel_fn(q, data, pages, num_high, slot_pos, nsplit, pages_kind=kind, **launch)
                t = triton.testing.do_bench(fn, warmup=25, rep=100)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: left out, the sweep goes on
                tqdm.write(f"  config splits={nsplit} {launch} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            cfg_times.append(dict(splits=nsplit, **launch, ms=t))
            if show:
                b = kernel_bytes(B, N, C, q, launch, kind)
                tqdm.write(f"  B={B} N={N} splits={nsplit} {launch or name0}: {t:.4f} ms, "
                           f"{b / 1e6:.1f} MB, {b / t / 1e6:.0f} GB/s")
            if nsplit == auto and not launch:  # what KVStore runs
                t_default = t
            if best is None or t < best[0]:
                best = (t, nsplit, launch)
        t_k, best_splits, best_launch = best
        kbytes = kernel_bytes(B, N, C, q, best_launch, kind)
        del data, slot_pos
        torch.cuda.empty_cache()
        k = torch.randn(B, HKV, N, D, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q4 = q.view(B, HQ, 1, D)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        t_gqa = triton.testing.do_bench(lambda: sdpa(q4, k, v, enable_gqa=True), warmup=25, rep=100)
        qf = q.view(B, HKV, HQ // HKV, D)
        t_fold = triton.testing.do_bench(lambda: sdpa(qf, k, v), warmup=25, rep=100)
        t_s = min(t_gqa, t_fold)
        sbytes = 2 * k.numel() * 2
        del k, v
        row = dict(B=B, N=N, kernel_ms=t_k, kernel_bytes=kbytes, kernel_gbs=kbytes / t_k / 1e6,
                   pct_copy=100 * kbytes / t_k / 1e6 / copy_gbs, sdpa_ms=t_s, sdpa_gqa_ms=t_gqa,
                   sdpa_folded_ms=t_fold, sdpa_bytes=sbytes, sdpa_gbs=sbytes / t_s / 1e6,
                   speedup=t_s / t_k, speedup_default=t_s / t_default, splits=best_splits, launch=best_launch,
                   default_ms=t_default, configs=cfg_times)
        rows.append(row)
        tqdm.write(f"{B:>2} {N:>7} | {t_k:>9.3f} {kbytes / 1e6:>8.1f} {row['kernel_gbs']:>6.0f} {row['pct_copy']:>5.1f}% | "
                   f"{t_s:>8.3f} {row['sdpa_gbs']:>9.0f} | {row['speedup']:>6.2f}x | splits={best_splits} "
                   f"{best_launch or name0} (default {t_default:.3f} ms, {t_s / t_default:.2f}x; "
                   f"sdpa gqa {t_gqa:.3f} / folded {t_fold:.3f} ms)")
        bar.update(1)
    bar.close()
    with open(args.out, "w") as f:
        json.dump(dict(device=props.name, pages=kind, copy_gbs=copy_gbs, accuracy_rel_rms=acc,
                       accuracy_rel_rms_portable=acc_portable, default_launch=launch0, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
