"""What the decode-attention kernels cost the GPU, read without a GPU: registers, spills, shared
memory, how many programs an SM holds, and the instruction mix of the main loop.

    python -m benchmarks.perf.kernel_resources                  # DEFAULT_LAUNCH, Llama-3-8B head shape
    python -m benchmarks.perf.kernel_resources --variants default,num_warps=2:block_tokens=64 --json out.json
    python -m benchmarks.perf.kernel_resources --pages bf16     # the kernel over bf16 pages (FULL_LAUNCH)

Two kernels: `_paged_decode_kernel` over quantized pages (--pages k8v4, the default) and
`_full_decode_kernel` over pages in the model's dtype (--pages bf16 / fp16 / fp32: full, pqcache, oracle).

Triton compiles the kernel for sm_90 on this machine (its bundled ptxas) with the constexprs its
launcher would pass (`kernel_constexprs`, `full_kernel_constexprs`) and the divisibility a real
launch specializes on (pointers, page bytes and strides divisible by 16), then disassembles the
cubin with the bundled nvdisasm. The loop is the largest span from a label to a branch back to it
(the walk over pages; a branch inside it, as the skipped rescale makes, counts both sides); its instruction
mix (PRMT/HADD2: code conversion, HMMA: tensor-core dots, LDGSTS: asynchronous page copies, MOV:
register shuffles) is what a kernel change moves. Registers set occupancy: 65,536 per SM, so a
one-warp program at R registers lets 65536 // (32 * R) programs share an SM.

The numbers are the local Triton's; the GPU machine's Triton may differ by a few registers.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_PTRS = {"q_ptr": "*bf16", "data_ptr": "*u8", "data16_ptr": "*fp16", "data64_ptr": "*i64", "pages_ptr": "*i32",
         "num_high_ptr": "*i32", "num_low_pages_ptr": "*i32", "seq_ptr": "*i64", "pos_ptr": "*i32",
         "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "emit_ptr": "*fp32", "ret_ptr": "*i32"}
# runtime integers a launch sees as multiples of 16 (Triton specializes on that)
_DIV16 = {"C", "page_bytes", "max_slots", "stride_qb", "stride_qh", "stride_ps", "stride_pl", "stride_ph",
          "stride_ns", "stride_nl"}
# `_full_decode_kernel`'s pointers (kv_ptr: the pool viewed in the pages' dtype) and multiples of 16
_FULL_PTRS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "pages_ptr": "*i32", "num_tokens_ptr": "*i32", "seq_ptr": "*i64",
              "pos_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
_FULL_DIV16 = {"C", "page_elems", "max_slots", "stride_qb", "stride_qh", "stride_ps", "stride_pl", "stride_ph",
               "stride_ns", "stride_nl"}
#: --pages: the quantized pages, or pages in the model's dtype (Triton's pointer type names)
PAGES = {"k8v4": None, "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile(consts, fp32: bool, num_warps: int, num_stages: int, maxnreg: int | None = None, arch: int = 90,
             pages: str | None = None):
    """triton.compile of `_paged_decode_kernel` (pages None: quantized) or `_full_decode_kernel` (pages
    "bf16", "fp16" or "fp32": the pages' dtype) for sm_`arch` with `consts`, specialized as a real launch
    is (pointers, page bytes and strides divisible by 16). fp32: an fp32 query (else as the pages, bf16
    for quantized ones)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpu_kernels import paged_attention

    fn = paged_attention._paged_decode_kernel if pages is None else paged_attention._full_decode_kernel
    if not hasattr(fn, "cache_key"):
        raise RuntimeError("the kernel was loaded for the Triton interpreter: run with TRITON_INTERPRET=0")
    if pages is None:
        base, div16 = _PTRS, _DIV16
        ptrs = {**_PTRS, "q_ptr": "*fp32" if fp32 else "*bf16"}
    else:
        base, div16 = _FULL_PTRS, _FULL_DIV16
        ptrs = {**_FULL_PTRS, "kv_ptr": "*" + pages, "q_ptr": "*fp32" if fp32 else "*" + pages}
    sig = {n: ptrs.get(n, "constexpr" if n in consts else ("fp32" if n == "scale_log2" else "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in base or n in div16}
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(ASTSource(fn, sig, constexprs=dict(consts), attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=opts)


def _resources(kernel) -> tuple[dict, str]:
    """A compiled kernel's resource usage ({"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..} as strings,
    from the bundled cuobjdump) and its SASS (nvdisasm)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)), sass


def parse_variant(text: str) -> dict:
    """'default' or 'key=value:key=value' (ints and true/false) -> launch overrides."""
    if text in ("", "default"):
        return {}
    out = {}
    for item in text.split(":"):
        k, v = item.split("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), None)
        if out[k] is None:
            out[k] = int(v)
    return out


def compile_report(launch: dict | None = None, num_kv_heads: int = 8, group: int = 4, head_dim: int = 128,
                   tokens_per_page: int = 32, low: tuple[int, int, int] | None = None, emit: bool = False,
                   arch: int = 90, pages: str = "k8v4") -> dict:
    """Compile one launch variant for sm_`arch` and return its resources and loop instruction mix.
    pages: "k8v4" (the quantized kernel, DEFAULT_LAUNCH) or "bf16" / "fp16" / "fp32" (the kernel over
    pages in that dtype with a query of the same dtype, FULL_LAUNCH; low and emit do not apply)."""
    from gpu_kernels.paged_attention import DEFAULT_LAUNCH, FULL_LAUNCH, full_kernel_constexprs, kernel_constexprs

    dtype = PAGES[pages]
    if dtype is None:
        cfg = {**DEFAULT_LAUNCH, **(launch or {})}
        high = (8, 4, tokens_per_page)
        page_bytes = tokens_per_page * (head_dim + head_dim // 2 + 8)
        consts = kernel_constexprs(num_kv_heads, group, head_dim, 1, high, low, page_bytes, cfg["block_tokens"],
                                   emit, False, cfg["asm_cvt"], cfg["high_dense"])
        keys = ("num_warps", "num_stages", "block_tokens", "asm_cvt", "high_dense")
    else:
        cfg = {**FULL_LAUNCH, **(launch or {})}
        consts = full_kernel_constexprs(num_kv_heads, group, head_dim, tokens_per_page, cfg["block_tokens"],
                                        dtype == "fp32", cfg["high_dense"])
        keys = ("num_warps", "num_stages", "block_tokens", "high_dense")
    kernel = _compile(consts, dtype == "fp32", cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg"), arch,
                      pages=dtype)
    fields, sass = _resources(kernel)
    regs = int(fields.get("REG", 0))
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line.strip()))}
    loops = []  # (label line, backward branch line): the largest is the main loop over pages
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    a, b = max(loops, key=lambda ab: ab[1] - ab[0]) if loops else (0, len(lines))
    body = lines[a:b + 1]
    ops = collections.Counter()
    for line in body:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    warps = cfg["num_warps"]
    return dict(
        pages=pages, launch={k: cfg[k] for k in keys} | ({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
        block_g=consts["BLOCK_G"], registers=regs, stack_bytes=int(fields.get("STACK", 0)),
        shared_bytes=kernel.metadata.shared, programs_per_sm_by_registers=65536 // (32 * warps * max(regs, 1)),
        loop_instructions=sum(ops.values()), loop_mix=dict(ops.most_common()),
    )


def compile_variants(full: bool = False, arch: int = 90) -> list[str]:
    """Compile the kernel for sm_`arch` over its constexpr combinations; return the failures.

    The interpreter accepts code the compiler refuses (a constexpr assigned twice in an unrolled
    loop, a value whose type changes across a loop), so CI compiles what the GPU would run. `full`:
    every combination (192, minutes); else query dtype x scale groups x low tier, with emitted
    logits and HIGH_DENSE (8), plus the masking high tier (high_dense=False) with the low tier (1).
    """
    import itertools

    from gpu_kernels.paged_attention import kernel_constexprs

    grid = dict(fp32=[False, True], emit=[True] if not full else [False, True], low=[False, True], groups=[1, 2],
                group=[4] if not full else [1, 4, 8], warps=[1] if not full else [1, 4],
                dense=[True] if not full else [True, False])
    combos = [c + (128,) for c in itertools.product(*grid.values())]
    if not full:
        combos.append((False, True, True, 1, 4, 1, False, 128))
    # small heads with the low tier (the test models'): K4 key halves of 8 and 16 dims, below / at a dot's K of 16
    # (d=16 runs fp32 dots whatever the query dtype: paged_decode_attention)
    combos += [(fp32, True, True, 1, 4, 1, True, d) for d, fp32 in ((16, True), (32, False), (32, True))]
    failures = []
    for fp32, emit, low, groups, group, warps, dense, d in combos:
        page_bytes = 32 * (d + d // 2 + 8 * groups)
        low_fmt = (4, 2, page_bytes // (d // 2 + d // 4 + 8 * groups)) if low else None
        consts = kernel_constexprs(8, group, d, groups, (8, 4, 32), low_fmt, page_bytes, 32 * warps, emit, fp32,
                                   True, dense)
        try:
            _compile(consts, fp32, warps, 3, arch=arch)
        except Exception as e:  # noqa: BLE001 - collected and reported, the rest still compile
            failures.append(f"fp32={fp32} emit={emit} low={low} groups={groups} G={group} "
                            f"warps={warps} high_dense={dense} d={d}: {_root_cause(e)}")
    return failures + compile_full_variants(full, arch) + compile_step_kernels(arch)


def _compile_kernel(fn, ptrs: dict, consts: dict, floats=(), num_warps: int = 4, arch: int = 90):
    """triton.compile of any kernel for sm_`arch`: `ptrs` its pointer arguments' types ("*bf16" ...),
    `consts` its constexprs, `floats` its fp32 scalars; the other arguments i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the kernel was loaded for the Triton interpreter: run with TRITON_INTERPRET=0")
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=dict(consts)), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))


def compile_step_kernels(arch: int = 90) -> list[str]:
    """The decode step's other kernels at the Llama-3-8B shape (8 KV heads of 128, a group of 4): the retrieved
    tokens' attention (bf16 and fp32 rows) and its merge, the cold tier's fused fetch (K8V4 and 16-bit rows),
    the GPU cache's lookup and admission (4096 slots: a quantized LFU and a 16-bit LRU cache), LeanKV's
    score update, the models' RMSNorm, the new token's PQ coding (2 sub-spaces of 64 centroids), the ADC tables
    and the two PQ scoring passes.
    Returns the failures: a compile error, or registers spilled at the launch setting the store uses."""
    from gpu_kernels import fetch, gpu_cache, policy_scan, pq_encode, pq_score, retrieved_attention, rms_norm
    from gpu_kernels import quant as quant_kernels

    cases = []
    for dt in ("bf16", "fp32"):
        cases.append((f"retrieved attention, {dt} rows", retrieved_attention._retrieved_split_kernel,
                      {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "v_ptr": "*" + dt, "valid_ptr": "*u8",
                       "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"},
                      dict(HKV=8, G=4, BLOCK_G=16, D=128, BLOCK_N=retrieved_attention.RETRIEVED_LAUNCH["block_rows"],
                           DOT_F32=dt == "fp32"), ("scale_log2",), retrieved_attention.RETRIEVED_LAUNCH["num_warps"]))
    cases.append(("retrieved attention's merge", retrieved_attention._merge_hot_kernel,
                  {"hot_out_ptr": "*fp32", "hot_lse_ptr": "*fp32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                   "out_ptr": "*bf16", "lse_ptr": "*fp32"}, dict(HQ=32, BLOCK_S=16, D=128), (), 4))
    maps = {n: "*i64" for n in ("pos_ptr", "seq_ptr", "table_ptr", "chunk_slab_ptr", "chunk_local_ptr", "slab_n_ptr",
                                "slab_addr_ptr")}
    for quant in (True, False):
        cases.append((f"fused fetch, {'K8V4' if quant else 'bf16'} rows", fetch._fetch_kernel,
                      {**maps, "want_ptr": "*u8", "raw_ptr": "*u8" if quant else "*bf16",
                       "raw16_ptr": "*fp16" if quant else "*bf16", "k_out": "*bf16", "v_out": "*bf16"},
                      dict(H=8, D=128, QUANT=quant, DEQUANT=quant, RB=200 if quant else 256, BLOCK_B=256, NG=1,
                           KBITS=8, VBITS=4, BLOCK_R=8), (), 4))
    for quant, lfu in ((True, True), (False, False)):
        row = "*u8" if quant else "*bf16"
        cases.append((f"cache admission, {'K8V4 LFU' if quant else 'bf16 LRU'}", gpu_cache._admit_kernel,
                      {"seq_ptr": "*i64", "pos_ptr": "*i64", "valid_ptr": "*u8", "slot_ptr": "*i64", "src_ptr": row,
                       "src_v_ptr": row, "score_ptr": "*fp32", "cpos_ptr": "*i32", "slot_of_ptr": "*i16",
                       "dst_ptr": row, "dst_v_ptr": row, "step_ptr": "*fp32", "prot_ptr": "*fp32", "vic_ptr": "*i32",
                       "vals_ptr": "*fp32"},
                      dict(H=8, SLOTS=4096, BLOCK_N=4096, BLOCK_K=gpu_cache.ADMIT_LAUNCH["block_k"],
                           ROW=200 if quant else 128, BLOCK_ROW=256 if quant else 128, LFU=lfu, TOUCH=True,
                           TWO=not quant), ("decay",), gpu_cache.ADMIT_LAUNCH["num_warps"]))
    cases.append(("cache lookup", gpu_cache._lookup_kernel,
                  {"seq_ptr": "*i64", "pos_ptr": "*i64", "valid_ptr": "*u8", "slot_of_ptr": "*i16", "slot_ptr": "*i64",
                   "hits_ptr": "*i64", "lookups_ptr": "*i64", "miss_ptr": "*u8", "rows_ptr": "*i64"},
                  dict(H=8, COUNT=True, OUTS=True, BLOCK=1024), (), 4))
    cases.append(("RMSNorm, bf16 rows of 4096", rms_norm._rms_norm_kernel,
                  {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK=4096), ("eps",), 8))
    cases.append(("LeanKV score update (page table)", policy_scan._observe_kernel,
                  {"logits_ptr": "*fp32", "lse_ptr": "*fp32", "pages_ptr": "*i32", "score_ptr": "*fp32",
                   "seq_ptr": "*i64", "ntok_ptr": "*i32", "nlow_ptr": "*i32"},
                  dict(HKV=8, G=4, BLOCK_W=8, BLOCK_S=64, TPP=32), (), 4))
    cases.append(("PQ coding of the new token", pq_encode._encode_kernel,
                  {"k_ptr": "*bf16", "cen_ptr": "*fp16", "seq_ptr": "*i64", "pos_ptr": "*i64", "codes_ptr": "*u8"},
                  dict(H=8, M=2, K=64, DSUB=64), (), 4))
    cases.append(("decode write, K8V4 + slot positions", quant_kernels._quantize_into_pages_kernel,
                  {"data_ptr": "*u8", "data16_ptr": "*fp16", "page_ptr": "*i32", "slot_ptr": "*i32", "k_ptr": "*bf16",
                   "v_ptr": "*bf16", "pos_ptr": "*i32", "slot_pos_ptr": "*i32", "slot_score_ptr": "*fp32"},
                  dict(TPP=32, D=128, NG=1, KBITS=8, VBITS=4, POS=True, SCORE=True), (), 4))
    for m, dsub in ((2, 64), (4, 8)):  # sub-spaces of 64 dims (a dot), and of 8 (below a dot's K: summed in registers)
        cases.append((f"PQ tables (ADC) of the step's queries, d/m={dsub}", pq_score._table_kernel,
                      {"q_ptr": "*bf16", "cen_ptr": "*fp16", "seq_ptr": "*i64", "table_ptr": "*fp32"},
                      dict(H=8, G=4, GP=16, M=m, K=64, DSUB=dsub), ("scale",), 4))
    for final in (False, True):
        cases.append((f"PQ scores, pass {2 if final else 1}" + (" (tiered's exclusion)" if final else ""),
                      pq_score._pq_pass,
                      {"table_ptr": "*fp32", "codes_ptr": "*u8", "seq_ptr": "*i64", "lo_ptr": "*i64", "hi_ptr": "*i64",
                       "lse_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "score_ptr": "*fp32",
                       "excl_ptr": "*u8"},
                      dict(HKV=8, G=4, GP=4, M=2, K=64, BLOCK_N=2048, FINAL=final, NBP=16, EXCLUDE=final), (), 4))
    failures = []
    for name, fn, ptrs, consts, floats, warps in cases:
        try:
            fields, _ = _resources(_compile_kernel(fn, ptrs, consts, floats, warps, arch))
            log.info("%-36s regs %3s  stack %4s B  smem %6s B", name, fields.get("REG"), fields.get("STACK"),
                     fields.get("SHARED"))
        except Exception as e:  # noqa: BLE001 - collected and reported, the rest still compile
            failures.append(f"{name}: {_root_cause(e)}")
            continue
        if int(fields.get("STACK", 0)):  # registers spilled to local memory: a launch setting to change
            failures.append(f"{name}: spills {fields['STACK']} bytes a thread at its launch setting")
    return failures


def compile_full_variants(full: bool = False, arch: int = 90) -> list[str]:
    """`compile_variants` for `_full_decode_kernel`: pages' dtype x fp32 query x GQA group x warps x
    masking x page size; CI compiles 5 of them (each dtype, tensor-core and fp32 dots, one and several
    pages a loop step, a page of 9 tokens padded to 16 rows, the masking variant), `full` every
    combination (216)."""
    import itertools

    from gpu_kernels.paged_attention import full_kernel_constexprs

    if full:
        combos = list(itertools.product(["bf16", "fp16", "fp32"], [False, True], [1, 4, 8], [1, 4], [True, False],
                                        [16, 32, 64]))
    else:
        combos = [("bf16", False, 4, 4, True, 32), ("fp16", False, 1, 1, False, 16), ("fp32", True, 8, 4, True, 32),
                  ("bf16", True, 4, 4, True, 64), ("bf16", False, 4, 4, True, 9)]
    failures = []
    for pages, fp32, group, warps, dense, tpp in combos:
        fp32 = fp32 or pages == "fp32"
        consts = full_kernel_constexprs(8, group, 128, tpp, 32, fp32, dense)
        try:
            _compile(consts, fp32, warps, 3, arch=arch, pages=pages)
        except Exception as e:  # noqa: BLE001 - collected and reported, the rest still compile
            failures.append(f"pages={pages} fp32 query={fp32} G={group} warps={warps} high_dense={dense} "
                            f"tokens/page={tpp}: {_root_cause(e)}")
    return failures


def _root_cause(e: BaseException) -> str:
    """'Type: message' (its last 200 characters) of the innermost cause of a failed compile."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e)[-200:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,num_warps=2:num_stages=2:block_tokens=64",
                    help="comma-separated launch variants ('default' or key=value:key=value)")
    ap.add_argument("--group", type=int, default=4, help="GQA group (query heads per KV head)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--pages", choices=list(PAGES), default="k8v4",
                    help="k8v4: the quantized kernel (DEFAULT_LAUNCH); bf16/fp16/fp32: the kernel over pages in that "
                         "dtype (FULL_LAUNCH)")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--check-variants", choices=["ci", "full"],
                    help="compile both kernels' constexpr combinations instead; exit 1 if any fails")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check_variants:
        failures = compile_variants(full=args.check_variants == "full")
        for f in failures:
            log.error("%s", f)
        log.info("%d failed", len(failures))
        raise SystemExit(1 if failures else 0)
    reports = []
    for text in args.variants.split(","):
        r = compile_report(parse_variant(text), group=args.group, head_dim=args.head_dim, pages=args.pages)
        reports.append(r)
        top = ", ".join(f"{k} {v}" for k, v in list(r["loop_mix"].items())[:8])
        log.info("%-45s regs %3d  stack %4d B  smem %6d B  programs/SM %2d  loop %4d instr: %s",
                 text, r["registers"], r["stack_bytes"], r["shared_bytes"], r["programs_per_sm_by_registers"],
                 r["loop_instructions"], top)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
