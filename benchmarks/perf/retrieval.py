"""PQ retrieval on the GPU vs FAISS on the host; fetch bandwidth; TTFT / time to 2nd token with the PQ build.

    python -m benchmarks.perf.retrieval --out $OUT/perf_retrieval.json          # GPU machine
    python -m benchmarks.perf.retrieval --quick                                  # CPU smoke run

1. Scoring + top-k (issue 4 target: B=8, N=128K, 8 KV heads <= 0.5 ms per layer, >= 20x FAISS):
   Hq=32, Hkv=8, d=128, PQCache's m=2, b=6, top-k = N/10 per (sequence, KV head). GPU: the
   table (torch), gpu_kernels/pq_score.py (two passes over the uint8 codes), torch.topk.
   Host: FAISS IndexPQ (inner product) over the same codes, one index per (sequence, KV head),
   searched on a thread pool of all host cores (OpenMP 1 per worker): (a) plain MIPS top-k per
   query head (less work than the GPU does: no GQA aggregation), (b) the retrieval service's
   full rule (all ADC scores, softmax per query head, summed over the group, top-k), which is
   the GPU path's exact semantics. Times: GPU median of triton.testing.do_bench (CUDA events);
   host median wall time of a few runs.
2. Fetch: the UVA gather kernel (gpu_kernels/fetch.py) of random 256-byte rows from a pinned
   host slab into GPU memory, against one large pinned host-to-device copy of the same bytes
   (the ceiling, measured in the same run), and PQCache's way (CPU fancy-index + copy).
3. TTFT and time to the 2nd token on a random-weight HF Llama at Llama-3-8B width (hidden
   4096, 32 query / 8 KV heads, d=128, MLP 14336) with `--layers` layers and a `--prompt`-token
   prompt: preset full (no cold tier), oracle (cold tier copy, no PQ build) and pqcache (cold
   tier + PQ build on host threads). The PQ build's TTFT cost = pqcache / oracle - 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gpu_kernels import reference
from kvstore.adapters.hf import CACHE_ARG, model_cache

HQ, HKV, D = 32, 8, 128


def _bench_gpu(fn, quick):
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return _wall(fn, 1 if quick else 3) * 1e3


def _wall(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_scoring(B, N, device, threads, quick, m=2, bits=6):
    import faiss

    from retrieval.service import RetrievalService, SearchRequest, pq_index

    K, k = 1 << bits, max(1, N // 10)
    g = torch.Generator(device="cpu").manual_seed(B * 7 + N)
    cen = torch.randn(B, HKV, m, K, D // m, generator=g)
    codes = torch.randint(0, K, (B, HKV, N, m), generator=g, dtype=torch.uint8)
    q = torch.randn(B, HQ, D, generator=g)
    scale = D ** -0.5
    cen_d, codes_d, q_d = cen.to(device), codes.to(device), q.to(device)
    seq = torch.arange(B, device=device)
    lo, hi = torch.zeros(B, dtype=torch.int64, device=device), torch.full((B,), N, dtype=torch.int64, device=device)
    out = torch.empty(B, HKV, N, dtype=torch.float32, device=device)
    use_kernel = device.type == "cuda"
    if use_kernel:
        from gpu_kernels.pq_score import pq_scores

    def score():
        table = reference.pq_tables(q_d, cen_d, scale).contiguous()
        if use_kernel:
            return pq_scores(table, codes_d, seq, lo, hi, N, out=out)
        return reference.pq_scores(table, codes_d, seq, lo, hi, N)

    def score_topk():
        return torch.topk(score(), k, dim=-1, sorted=False)

    sc = score()
    topk_only_ms = _bench_gpu(lambda: torch.topk(sc, k, dim=-1, sorted=False), quick)
    sc_half = sc.half()
    topk_half_ms = _bench_gpu(lambda: torch.topk(sc_half, k, dim=-1, sorted=False), quick)
    table_only_ms = _bench_gpu(lambda: reference.pq_tables(q_d, cen_d, scale).contiguous(), quick)
    blocks = {}
    if use_kernel:
        tbl = reference.pq_tables(q_d, cen_d, scale).contiguous()
        for bn in (512, 1024, 2048):
            blocks[bn] = _bench_gpu(lambda: pq_scores(tbl, codes_d, seq, lo, hi, N, out=out, block_n=bn), quick)

    gpu_ms = _bench_gpu(score_topk, quick)
    score_ms = _bench_gpu(score, quick)
    _, idx = score_topk()
    # host: FAISS over the same codes
    cen_np, codes_np, q_np = cen.numpy(), codes.numpy(), q.numpy()
    indexes = [[pq_index(cen_np[b, h], codes_np[b, h]) for h in range(HKV)] for b in range(B)]
    G = HQ // HKV
    pool = ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,))

    def faiss_mips():
        futs = [pool.submit(indexes[b][h].search, np.ascontiguousarray(q_np[b, h * G:(h + 1) * G]), k)
                for b in range(B) for h in range(HKV)]
        return [f.result() for f in futs]

    faiss_mips()
    mips_s = _wall(faiss_mips, 1 if quick else 3)
    svc = RetrievalService(threads)
    reqs = [SearchRequest(cen_np[b], codes_np[b], q_np[b], 0, N, k, scale) for b in range(B)]
    rule_s = _wall(lambda: svc.submit(reqs).result(), 1)
    got = svc.submit(reqs[:1]).result()[0, 0]
    svc.close()
    pool.shutdown()
    agree = len(set(got.tolist()) & set(idx[0, 0].cpu().tolist())) / k
    return {
        "B": B, "N": N, "k": k, "m": m, "bits": bits, "gpu_score_topk_ms": gpu_ms, "gpu_score_ms": score_ms,
        "faiss_mips_ms": mips_s * 1e3, "faiss_rule_ms": rule_s * 1e3, "host_threads": threads,
        "speedup_vs_mips": mips_s * 1e3 / gpu_ms, "speedup_vs_rule": rule_s * 1e3 / gpu_ms,
        "topk_agreement_with_service": agree, "topk_only_ms": topk_only_ms, "topk_half_ms": topk_half_ms, "table_only_ms": table_only_ms,
        "kernel_ms_by_block_n": blocks,
    }


def bench_fetch(device, quick):
    R = (1 << 16) if quick else (1 << 22)  # 4M rows x 256 B = 1 GiB pinned slab
    M = (1 << 12) if quick else (1 << 20)  # 1M rows = 256 MiB fetched
    pinned = device.type == "cuda"
    src = torch.empty(R, D, dtype=torch.bfloat16, pin_memory=pinned)
    src.copy_(torch.randn(R, D, dtype=torch.bfloat16, device=device).cpu() if pinned else torch.randn(R, D).bfloat16())
    rows = torch.randperm(R, device=device)[:M]
    dst = torch.empty(M, D, dtype=torch.bfloat16, device=device)
    nbytes = M * D * 2
    res = {"rows": M, "row_bytes": D * 2, "slab_bytes": R * D * 2}
    if pinned:
        from gpu_kernels.fetch import gather_rows

        gather_rows(src, rows, dst)
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), src[rows.cpu()]), "UVA gather returned wrong rows"
        t = _bench_gpu(lambda: gather_rows(src, rows, dst, block_r=16, num_warps=4), quick)
        res["uva_gather_old_16r_4w_GBps"] = nbytes / t / 1e6
        sweep = {}
        for br, nw in ((16, 8), (32, 4), (64, 4), (64, 8), (128, 8), (256, 8), (512, 16)):
            sweep[f"{br}r_{nw}w"] = nbytes / _bench_gpu(lambda: gather_rows(src, rows, dst, block_r=br, num_warps=nw), quick) / 1e6
        res["uva_sweep_GBps"] = sweep
        res["uva_best"] = max(sweep, key=sweep.get)
        t = _bench_gpu(lambda: gather_rows(src, rows, dst), quick)
        res["uva_gather_GBps"] = nbytes / t / 1e6  # the default the store uses (64 rows, 8 warps)
        half = torch.where(torch.rand(M, device=device) < 0.5, rows, torch.full_like(rows, -1))
        t_half = _bench_gpu(lambda: gather_rows(src, half, dst), quick)
        res["uva_gather_half_hits_GBps_of_fetched"] = nbytes / 2 / t_half / 1e6
        t_copy = _bench_gpu(lambda: dst.copy_(src[:M], non_blocking=True), quick)
        res["pinned_copy_ceiling_GBps"] = nbytes / t_copy / 1e6
        rows_cpu = rows.cpu()
        staging = torch.empty(M, D, dtype=torch.bfloat16, pin_memory=True)

        def pqcache_way():
            torch.index_select(src, 0, rows_cpu, out=staging)
            dst.copy_(staging, non_blocking=True)
            torch.cuda.synchronize()

        res["cpu_gather_then_copy_GBps"] = nbytes / _wall(pqcache_way, 3) / 1e9
        res["uva_vs_ceiling"] = res["uva_gather_GBps"] / res["pinned_copy_ceiling_GBps"]
        del staging
    else:
        t = _wall(lambda: reference.gather_rows(src, rows, dst), 3)
        res["reference_gather_GBps"] = nbytes / t / 1e9
    del src
    res["store_order"] = bench_fetch_store_order(device, quick)
    return res


def bench_fetch_store_order(device, quick, B=8, N=131072, C=256, budget=0.1, hit_rate=0.5):
    """The fetch as the store issues it, over one layer's region of the cold tier at B=8, N=128K (4 GiB).

    Cold-tier layout (kvstore/cold/host_tier.py): per chunk of C positions, [2 (K, V), Hkv, C, d]; a
    sequence's chunks consecutive. Per (sequence, KV head): top-k positions of random scores by
    torch.topk(sorted=False) (the selector's call), half of them misses; the gather rows are
    [K rows of (b, h, slot)..., V rows...] with -1 for hits, as ColdTier.fetch builds them. The GPU
    maps pinned host memory in pages its translation cache covers only partly: rows gathered in
    address order (what topk's unsorted output gives within a head) keep the reads in flight on a
    few pages; the same rows in random order (`uva_gather_GBps` above) miss on nearly every row.
    """
    if quick:
        B, N = 2, 4096
    H = HKV
    chunks = B * N // C
    src = torch.empty(chunks * 2 * H * C, D, dtype=torch.bfloat16, pin_memory=device.type == "cuda")
    src.view(-1)[:: 4096].fill_(1.0)
    k = int(N * budget)
    g = torch.Generator(device=device).manual_seed(0)
    pos = torch.topk(torch.rand(B, H, N, device=device, generator=g), k, dim=-1, sorted=False).indices
    want = torch.rand(B, H, k, device=device, generator=g) < (1 - hit_rate)
    b = torch.arange(B, device=device).view(B, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1)
    krow = ((b * (N // C) + pos // C) * 2 * H + h) * C + pos % C
    krow = torch.where(want, krow, torch.full_like(krow, -1))
    rows = torch.cat([krow.view(-1), torch.where(krow.view(-1) >= 0, krow.view(-1) + H * C, krow.view(-1))])
    dst = torch.empty(rows.numel(), D, dtype=torch.bfloat16, device=device)
    nbytes = int(want.sum()) * 2 * D * 2
    res = {"B": B, "N": N, "k": k, "region_bytes": src.numel() * 2, "fetched_bytes": nbytes,
           "topk_indices_ascending": float((pos.diff(dim=-1) > 0).float().mean())}
    if device.type == "cuda":
        from gpu_kernels.fetch import gather_rows

        gather_rows(src, rows, dst)
        torch.cuda.synchronize()
        sel = rows >= 0
        assert torch.equal(dst[sel].cpu(), src[rows[sel].cpu()]), "store-order gather returned wrong rows"
        res["store_order_GBps"] = nbytes / _bench_gpu(lambda: gather_rows(src, rows, dst), quick) / 1e6
        shuffled = rows[torch.randperm(rows.numel(), device=device, generator=g)]
        res["shuffled_GBps"] = nbytes / _bench_gpu(lambda: gather_rows(src, shuffled, dst), quick) / 1e6
        srt = torch.sort(rows).values
        res["sorted_GBps"] = nbytes / _bench_gpu(lambda: gather_rows(src, srt, dst), quick) / 1e6
        cdst = torch.empty(min(src.numel(), 1 << 27), dtype=torch.bfloat16, device=device)
        res["pinned_copy_ceiling_GBps"] = cdst.numel() * 2 / _bench_gpu(
            lambda: cdst.copy_(src.view(-1)[: cdst.numel()], non_blocking=True), quick) / 1e6
    else:
        res["reference_GBps"] = nbytes / _wall(lambda: reference.gather_rows(src, rows, dst), 1) / 1e9
    return res


def bench_ttft(device, layers, prompt, quick, progress=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvstore import KVStoreClient, KVStoreConfig

    if quick:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                          num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=prompt + 64)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=prompt + 64,
                          rope_theta=500000.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for preset in ("full", "oracle", "pqcache"):
        client = KVStoreClient(KVStoreConfig.preset(preset))
        times = []
        with client.attach(model), torch.no_grad():
            for rep in range(1 if quick else 3):  # rep 0 warms up (compiles, allocates the pinned slab)
                sync()
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                sync()
                t1 = time.perf_counter()
                out2 = model(nxt, **{CACHE_ARG: model_cache(out)}, use_cache=True)
                nxt2 = out2.logits[:, -1:].argmax(-1)
                sync()
                t2 = time.perf_counter()
                model(nxt2, **{CACHE_ARG: model_cache(out)}, use_cache=True)
                sync()
                t3 = time.perf_counter()
                st = client.stats()
                model_cache(out).release()
                times.append((t1 - t0, t2 - t0, t3 - t2, st))
        if progress is not None:
            progress.update(1)
        use = times[1:] if len(times) > 1 else times
        ttft = statistics.median(t[0] for t in use)
        tt2t = statistics.median(t[1] for t in use)
        tpot = statistics.median(t[2] for t in use)
        st = use[-1][3]
        rows.append({"preset": preset, "ttft_ms": ttft * 1e3, "tt2t_ms": tt2t * 1e3, "step3_ms": tpot * 1e3,
                     "gpu_kv_bytes": st["gpu_kv_bytes"], "host_kv_bytes": st["host_kv_bytes"],
                     "dense_kv_bytes": st["dense_kv_bytes"], "pq_build_s": st.get("pq_build_seconds", 0.0),
                     "pq_wait_s": st.get("pq_wait_seconds", 0.0)})
    del model
    return {"layers": layers, "prompt": prompt, "rows": rows}


PARTS = ("scoring", "fetch", "ttft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits 2 with one line for a bad argument, or for the full sizes on a
    machine without a CUDA GPU (they need one: pass --quick there)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf.retrieval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: scoring,fetch,ttft")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.skip_parts = set(filter(None, (p.strip() for p in args.skip.split(","))))
    unknown = sorted(args.skip_parts - set(PARTS))
    if unknown:
        ap.error(f"--skip {args.skip}: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    if args.skip_parts >= set(PARTS):
        ap.error("--skip leaves nothing to run")
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.prompt < 64:
        ap.error(f"--prompt must be >= 64 tokens, got {args.prompt}")
    if args.out is not None and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        ap.error(f"--out {args.out}: expected a file in an existing folder")
    if not args.quick and not torch.cuda.is_available():
        ap.error(f"the full sizes need a CUDA GPU (this torch, {torch.__version__}, sees none: 128K-token scoring, "
                 "a 1 GiB pinned slab, a 32K prefill at 8B width); pass --quick for the CPU smoke run")
    return args


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = os.cpu_count() or 1
    skip = args.skip_parts
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "host_cores": threads}
    sizes = [(1, 4096), (2, 8192)] if args.quick else [(1, 32768), (8, 32768), (1, 131072), (8, 131072)]
    steps = (0 if "scoring" in skip else len(sizes)) + (0 if "fetch" in skip else 1) + (0 if "ttft" in skip else 3)
    bar = tqdm(total=steps, desc="perf_retrieval", unit="step", disable=args.quiet, file=sys.stderr)
    if "scoring" not in skip:
        result["scoring"] = []
        for B, N in sizes:
            bar.set_postfix_str(f"scoring B={B} N={N}")
            result["scoring"].append(bench_scoring(B, N, device, threads, args.quick))
            bar.update(1)
    if "fetch" not in skip:
        bar.set_postfix_str("fetch")
        result["fetch"] = bench_fetch(device, args.quick)
        bar.update(1)
    if "ttft" not in skip:
        bar.set_postfix_str("ttft: full, oracle, pqcache")
        result["ttft"] = bench_ttft(device, args.layers, 2048 if args.quick else args.prompt, args.quick, progress=bar)
    bar.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n== device {result['device']}, {threads} host cores ==")
    if "scoring" in result:
        print("scoring+top-k  (Hq=32 Hkv=8 d=128 m=2 b=6, k=N/10)")
        print(f"{'B':>3} {'N':>7} {'gpu ms':>8} {'score ms':>8} {'faiss mips ms':>13} {'faiss rule ms':>13} "
              f"{'x mips':>7} {'x rule':>7} {'agree':>6}")
        for r in result["scoring"]:
            print(f"{r['B']:>3} {r['N']:>7} {r['gpu_score_topk_ms']:>8.3f} {r['gpu_score_ms']:>8.3f} "
                  f"{r['faiss_mips_ms']:>13.2f} {r['faiss_rule_ms']:>13.2f} {r['speedup_vs_mips']:>7.1f} "
                  f"{r['speedup_vs_rule']:>7.1f} {r['topk_agreement_with_service']:>6.3f}")
            print(f"      breakdown: topk only {r['topk_only_ms']:.3f} ms, table only {r['table_only_ms']:.3f} ms, "
                  f"topk on fp16 {r['topk_half_ms']:.3f} ms, kernels by block_n {{{', '.join(f'{b}: {v:.3f}' for b, v in r['kernel_ms_by_block_n'].items())}}}")
    if "fetch" in result:
        print("fetch  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result["fetch"].items()
                                    if not isinstance(v, dict)))
        if "store_order" in result["fetch"]:
            print("fetch in the store's order  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in result["fetch"]["store_order"].items()))
        if "uva_sweep_GBps" in result["fetch"]:
            print("fetch sweep GB/s: " + ", ".join(f"{k}={v:.1f}" for k, v in result["fetch"]["uva_sweep_GBps"].items()))
    if "ttft" in result:
        t = result["ttft"]
        print(f"TTFT / time to 2nd token, Llama-3-8B width, {t['layers']} layers, prompt {t['prompt']}")
        print(f"{'preset':>8} {'TTFT ms':>9} {'TT2T ms':>9} {'step3 ms':>9} {'gpu/dense':>9} {'host/dense':>10} {'build s':>8} {'wait s':>7}")
        base = {r["preset"]: r for r in t["rows"]}
        for r in t["rows"]:
            print(f"{r['preset']:>8} {r['ttft_ms']:>9.1f} {r['tt2t_ms']:>9.1f} {r['step3_ms']:>9.1f} "
                  f"{r['gpu_kv_bytes'] / max(r['dense_kv_bytes'], 1):>9.3f} {r['host_kv_bytes'] / max(r['dense_kv_bytes'], 1):>10.3f} "
                  f"{r['pq_build_s']:>8.2f} {r['pq_wait_s']:>7.2f}")
        if "oracle" in base and "pqcache" in base:
            print(f"PQ build TTFT growth (pqcache / oracle - 1): {base['pqcache']['ttft_ms'] / base['oracle']['ttft_ms'] - 1:+.1%}; "
                  f"vs full: {base['pqcache']['ttft_ms'] / base['full']['ttft_ms'] - 1:+.1%}")


if __name__ == "__main__":
    main()
