"""`kvstore-bench throughput`: decode tokens/s through the public API, at each method's largest batch.

    kvstore-bench throughput --model llama3-8b --lengths 32k,128k \\
        --methods hf,full,quant,leankv,pqcache,tiered --batch max --new-tokens 64 --out DIR

What a user gets: for every (method, context length) row, a batch of B random prompts of L
tokens is generated greedily, exactly --new-tokens new tokens each. `hf` is the unattached model
through `model.generate()` with transformers' own cache and SDPA (min_new_tokens = max_new_tokens
masks EOS). Every other method is a kvstore preset (`name@field=value[:...]` overrides as in
`kvstore-bench run`) on one of two paths (`--path`, the row's `path`):
  * engine (default): `kvstore.Engine(model, config, max_batch=B)`: the B prompts are admitted
    (each prefilled alone), then decode steps run over the whole batch (`ignore_eos`);
  * generate: `KVStoreClient(config).attach(model)` and `model.generate()` on the padded batch.
Either way the model is detached again after each call, so every call starts from a fresh state.

Models (random weights, nothing downloaded): `llama3-8b` (the Llama-3-8B shape, bf16, built on
the device in seconds; `--layers N` keeps N of its 32 layers), `tiny` (2 layers, hidden 64,
4 q / 2 kv heads, vocab 512: for CPU runs and CI), or a local Hugging Face folder.

Batch (`--batch max`, the default): per row, probe runs first measure what one sequence costs.
  * GPU bytes: peak `max_memory_allocated()` growth over a B=1 call (weights excluded, transient
    activations included). When that peak is more than 10% above the sequence's KV bytes (HF's
    whole-prompt prefill: MLP activations of L tokens), a B=2 probe runs too and the per-sequence
    cost is the growth from B=1 to B=2 (never less than the KV bytes), the rest a fixed cost: a
    prefill that works chunk by chunk does not pay its activations once per sequence.
  * host bytes: the store's `host_kv_bytes` per sequence (the cold tier); on a CPU run every
    byte is host memory: max(KV bytes of all tiers, peak RSS growth).
  B = the largest batch whose bytes fit the GPU's memory (free now + the allocator's cached
  bytes, minus 4% of the total) and the host's available memory (psutil, else /proc/meminfo
  MemAvailable, minus 10% of the total); `limit` says which one capped it ("gpu" or "host"; on a
  CPU run always "host"); `--max-batch` caps B further (then `note` says so; `fit_batch` keeps
  what memory allowed). An out-of-memory error (torch's, or kvstore's OutOfPagesError) frees
  memory and retries at min(B-1, floor(0.85 B)), and `note` records it ("OOM at B=14, ran B=12").
  With `--batch N` there is no back-off: an out-of-memory error is the row's `error`, and an
  untimed B=1 call runs first (warm-up: first-call costs, Triton compilation), as the probes do
  for `--batch max`.

Timing: a streamer passed to generate() synchronizes the device and stamps `perf_counter()` at
each put (the prompt, then each new token); on the engine path the same stamps are taken after
the admission (every first token) and after each decode step. ttft_s = first token - start, tt2t_s = second token -
start, tpot_s = median gap between consecutive tokens after the second, decode_tokens_per_s =
B / tpot_s.

Memory: peak_gpu_bytes = max_memory_allocated() during the call minus what was allocated just
before it (the weights); null on a CPU run. gpu_kv_bytes_per_seq / host_bytes_per_seq: the
store's stats() right after generate() (generate returns the cache, so its sequences are still
live; when stats() reports 0 sequences the batch size divides); on a CPU run the "GPU" tier is
host memory too. For hf: 2 * layers * kv_heads * head_dim * dtype bytes * (L + new tokens).
host_reserved_bytes: the cold tier's slabs (pinned host memory it holds), against the used
batch x host_bytes_per_seq.

Roofline: the bandwidth is measured in the same run (CUDA: best of 10 device-to-device copies of
4 GiB, bytes read + written; CPU: a 256 MiB host copy). step_bytes = what one decode step must
read = step_weight_bytes (every parameter except an untied input-embedding table, of which a step
reads B rows) + step_kv_bytes:
  * hf, full: the dense KV of B * (L + new/2) tokens (the mean over the decode);
  * other methods, an ESTIMATE: the store's gpu_kv_bytes for the whole batch (everything it keeps
    on the device: hot-tier pages, and for the retrieval presets the PQ codes, centroids and GPU
    cache slots, counted in stats' retrieval_gpu_bytes), plus, for PQ methods whose stats do not
    count their codes, the codes a step scans: B * layers * kv_heads * L * pq_subspaces bytes
    (`pq_code_bytes` reports that figure in either case).
roofline_tokens_per_s = B / (step_bytes / hbm_bytes_per_s); roofline_share = decode_tokens_per_s /
roofline_tokens_per_s; speedup_vs_hf = decode_tokens_per_s / hf's at the same length (hf at its
own batch; null without an hf row).

Outputs in --out DIR: results.json (a list of rows, rewritten after every row: a killed run keeps
what it finished), summary.md (table + the commands that made it), throughput.png. An existing
non-empty results.json is refused unless --resume, which skips (method, length) rows already
there (error rows included: delete a row to rerun it) and refuses rows of another model, layer
count, dtype, device, seed or --new-tokens. --max-minutes stops cleanly between rows, before a
row that the slowest row so far (at that length, else scaled from a shorter one) says would not
finish in time. A method that raises gets a row with `error` (one line; the traceback is
logged) and the run goes on; exit status 1 then, 2 for bad arguments (checked before any model
is built).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: The Llama-3-8B architecture (meta-llama/Meta-Llama-3-8B's config.json), random weights.
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
)
#: A tiny Llama for CPU runs and CI.
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
BUILTIN_MODELS = {"llama3-8b": LLAMA3_8B, "tiny": TINY}

MIN_LENGTH = 64
MIN_NEW_TOKENS = 3  # TPOT needs a gap after the second token
GPU_MARGIN = 0.04  # of the GPU's total memory, kept free when sizing the batch
HOST_MARGIN = 0.10  # of the host's total memory (pinned allocations and the OOM killer: be careful)
OOM_BACKOFF = 0.85
PROBE_NEW_TOKENS = 3  # probes run prefill + 2 decode steps
TWO_POINT_SLACK = 1.10  # a B=1 peak above 1.1x the KV bytes triggers the B=2 probe
GPU_COPY_BYTES = 4 << 30
CPU_COPY_BYTES = 256 << 20
PLOT_FILE = "throughput.png"

#: Keys every row of results.json has (null where a figure does not apply or the row failed).
ROW_FIELDS = (
    "method", "length", "batch", "layers", "device_name", "ttft_s", "tt2t_s", "tpot_s", "decode_tokens_per_s",
    "peak_gpu_bytes", "gpu_kv_bytes_per_seq", "host_bytes_per_seq", "step_bytes", "hbm_bytes_per_s",
    "roofline_tokens_per_s", "roofline_share", "speedup_vs_hf", "limit", "path", "error", "note", "new_tokens",
    "prefill_chunk_tokens",
)
#: Further keys every row has: the setup, the batch fit, and the parts of step_bytes.
EXTRA_FIELDS = (
    "model", "dtype", "device", "seed", "preset", "command", "bandwidth_source", "weight_bytes", "step_weight_bytes",
    "step_kv_bytes", "pq_code_bytes", "dense_kv_bytes_per_seq", "fit_batch", "probe_gpu_bytes_per_seq",
    "probe_host_bytes_per_seq", "generated_tokens", "wall_s", "decode_path", "graph_captures", "host_reserved_bytes",
)


# ---- arguments ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _batch(text: str) -> int | str:
    if text == "max":
        return "max"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'max' or a positive integer, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """The `throughput` subcommand on `kvstore-bench`'s subparsers."""
    from benchmarks.args import csv as _csv, lengths as _lengths

    p = sub.add_parser(
        "throughput", help="decode tokens/s at each method's largest batch, against unattached HF and the roofline",
        description="Decode throughput through model.generate(): hf (unattached, SDPA) and kvstore presets, each at "
                    "its largest batch that fits, against the measured-bandwidth roofline. "
                    "See benchmarks/perf/throughput.py.",
    )
    p.add_argument("--model", default="llama3-8b",
                   help="llama3-8b (random weights, the Llama-3-8B shape), tiny (CPU/CI), or a local Hugging Face folder")
    p.add_argument("--layers", type=_positive_int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--lengths", type=_lengths, required=True, help="context lengths in tokens, e.g. 32k,128k")
    p.add_argument("--methods", type=_csv, required=True,
                   help="comma-separated: hf (unattached transformers) and kvstore presets, with optional "
                        "@field=value[:field=value] overrides, e.g. hf,full,quant,leankv,pqcache,tiered")
    p.add_argument("--budget", default=None,
                   help="token budget of the methods that select (pqcache, tiered, ...): a fraction of the prompt "
                        "(0.05) or a token count (2048); default the suite's 0.2. Labels them method[budget]")
    p.add_argument("--batch", type=_batch, default="max", help="'max' (largest that fits; default) or sequences per call")
    p.add_argument("--max-batch", type=_positive_int, default=None, help="cap on the batch --batch max picks")
    p.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens generated per sequence (forced)")
    p.add_argument("--path", choices=("engine", "engine-plain", "generate"), default="engine",
                   help="how kvstore presets generate: engine (kvstore.Engine: each prompt prefilled alone, one batched "
                        "decode step, step t+1 launched before step t's tokens are read where the preset allows; "
                        "default), engine-plain (the same without that overlap, for comparison) or generate (attach + "
                        "model.generate(), the compatible path); hf always runs model.generate()")
    p.add_argument("--out", required=True, help="output folder: results.json, summary.md, throughput.png")
    p.add_argument("--resume", action="store_true", help="continue DIR/results.json, skipping (method, length) rows in it")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop cleanly between rows once this much wall time is spent (rerun with --resume)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto",
                   help="auto (llama3-8b: bf16; else bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    p.add_argument("--no-plots", action="store_true", help="write results.json and summary.md only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(throughput_parser=p)
    return p


@dataclass(frozen=True)
class MethodSpec:
    """One column: `label` as given on the command line; config None for hf."""

    label: str
    config: object | None  # KVStoreConfig

    @property
    def is_hf(self) -> bool:
        return self.config is None


def parse_methods(specs: list[str], budget: str | None = None) -> list[MethodSpec]:
    """MethodSpecs for --methods entries, the selecting ones at `budget` (--budget; None: the suite's
    default); ValueError naming the bad entry (nothing is loaded)."""
    from benchmarks.suite.methods import (BUDGETED, METHODS, MethodUnavailable, check_store, make_method,
                                          parse_budget, parse_method)
    from kvstore.config import KVStoreConfig

    if not specs:
        raise ValueError("--methods names no method")
    if budget is not None:
        parse_budget(budget)  # ValueError naming it
    out, seen = [], set()
    for spec in specs:
        name, options = parse_method(spec)
        if spec in seen:
            continue
        seen.add(spec)
        if name == "hf":
            if options:
                raise ValueError(f"method {spec!r}: hf (unattached transformers) takes no options")
            out.append(MethodSpec(spec, None))
            continue
        try:
            if name in METHODS:
                config = make_method(spec, budget).config
            elif name in KVStoreConfig.preset_names():
                config = KVStoreConfig.preset(name, **options)
                check_store(config)
            else:
                known = ["hf", *METHODS, *(p for p in KVStoreConfig.preset_names() if p not in METHODS)]
                raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")
        except (MethodUnavailable, NotImplementedError) as exc:
            raise ValueError(f"method {spec!r} is not available: {exc}") from None
        except TypeError as exc:
            raise ValueError(f"method {spec!r}: {exc}") from None
        label = f"{spec}[{budget}]" if budget is not None and name in BUDGETED else spec
        out.append(MethodSpec(label, config))
    return out


@dataclass
class ModelSource:
    """What --model/--layers/--dtype/--device resolve to, before anything is loaded."""

    name: str  # "llama3-8b", "tiny" or a folder
    device: torch.device
    dtype: torch.dtype
    layers: int
    config: object  # a transformers PretrainedConfig (not yet with the model)


def resolve_model(args) -> ModelSource:
    """Validate --model, --layers, --device and --dtype against --lengths/--new-tokens (config only)."""
    from benchmarks.suite.runner import resolve_device, resolve_dtype

    device = resolve_device(args.device)  # ValueError for a name torch does not parse or a GPU it does not see
    longest = max(args.lengths) + args.new_tokens
    if args.model in BUILTIN_MODELS:
        from transformers import LlamaConfig

        fields = dict(BUILTIN_MODELS[args.model])
        if args.layers is not None:
            fields["num_hidden_layers"] = args.layers
        fields["max_position_embeddings"] = max(8192, longest)
        config = LlamaConfig(**fields, attn_implementation="sdpa")
        dtype = torch.bfloat16 if args.model == "llama3-8b" and args.dtype == "auto" else resolve_dtype(args.dtype, device)
    else:
        path = Path(args.model)
        if not path.is_dir():
            raise ValueError(f"--model {args.model!r}: not llama3-8b, tiny, or a local Hugging Face model folder "
                             "(nothing is downloaded)")
        from kvstore.adapters.model_dir import check_model_dir, check_weights

        try:  # config.json of a family the store serves; prompts are ids: no tokenizer needed
            config = check_model_dir(path, tokenizer=False, weights=None)
        except ValueError as exc:
            raise ValueError(f"--model {exc}") from None
        layers = getattr(config, "num_hidden_layers", None)
        if args.layers is not None:
            if layers is not None and args.layers > layers:
                raise ValueError(f"--layers {args.layers}: {args.model} has {layers} layers")
            config.num_hidden_layers = args.layers
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and limit < longest:
            raise ValueError(f"--model {args.model}: max_position_embeddings={limit} < the longest length + "
                             f"--new-tokens = {longest}")
        try:
            check_weights(path)
        except ValueError as exc:
            raise ValueError(f"--model {exc}") from None
        dtype = resolve_dtype(args.dtype, device)
    return ModelSource(args.model, device, dtype, config.num_hidden_layers, config)


def validate(args) -> tuple[list[MethodSpec], ModelSource, Path, list[dict]]:
    """Every check that needs no model; ValueError with a one-line message."""
    if not args.lengths:
        raise ValueError("--lengths names no length")
    short = [n for n in args.lengths if n < MIN_LENGTH]
    if short:
        raise ValueError(f"--lengths: {short[0]} tokens is too short (at least {MIN_LENGTH})")
    if args.new_tokens < MIN_NEW_TOKENS:
        raise ValueError(f"--new-tokens must be >= {MIN_NEW_TOKENS} (TPOT is measured after the second token)")
    if args.max_batch is not None and args.batch != "max":
        raise ValueError("--max-batch applies to --batch max only")
    methods = parse_methods(args.methods, args.budget)
    source = resolve_model(args)
    from benchmarks.args import check_out_dir

    out = check_out_dir(args.out)
    existing = read_results(out / "results.json")
    if existing and not args.resume:
        raise ValueError(f"{out / 'results.json'} already holds {len(existing)} rows: pass --resume to continue it, "
                         "or use another --out")
    for row in existing:
        mine = {"model": source.name, "layers": source.layers, "new_tokens": args.new_tokens,
                "dtype": _dtype_name(source.dtype), "device_name": _device_name(source.device), "seed": args.seed}
        theirs = {k: row.get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(f"{k} {theirs[k]!r} (now {mine[k]!r})" for k in mine if theirs[k] != mine[k])
            raise ValueError(f"--resume: {out / 'results.json'} holds rows of another setup: {diff}; use another --out")
    return methods, source, out, existing


# ---- the model ---------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_model(source: ModelSource, seed: int = 0):
    """The model of `source` on its device, in eval mode, with SDPA attention.

    Built-in shapes get random weights made directly on the device: transformers' own
    initialization is skipped (`no_init_weights`), then every matrix is filled in place with
    N(0, 0.02) and every norm weight with 1 (seconds on a GPU for the 8B shape).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if source.name in BUILTIN_MODELS:
        from transformers.initialization import no_init_weights

        with torch.device(source.device), no_init_weights():
            model = LlamaForCausalLM._from_config(source.config, dtype=source.dtype, attn_implementation="sdpa")
        gen = torch.Generator(device=source.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source.name, config=source.config, dtype=source.dtype, attn_implementation="sdpa", local_files_only=True,
        ).to(source.device)
    return model.eval()


@dataclass(frozen=True)
class Geometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def dense_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def geometry_of(model) -> Geometry:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Geometry(cfg.num_hidden_layers, kv, head_dim, next(model.parameters()).element_size())


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter, bytes a decode step reads: all but an untied input-embedding table)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return total, total - (0 if tied else emb.numel() * emb.element_size())


# ---- measurements ------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device) -> tuple[float, str]:
    """(bytes/s counting read + write, how it was measured): a large copy, best of several."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(GPU_COPY_BYTES, int(free * 0.4) // 2)
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * n / best, f"device-to-device copy of {n / 2**30:.1f} GiB, best of 10 (read + write)"
    n = CPU_COPY_BYTES
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best, f"host memory copy of {n >> 20} MiB, best of 5 (read + write)"


def host_memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of host memory: psutil if installed, else /proc/meminfo."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS (Linux); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TokenTimer:
    """A generate() streamer: stamps perf_counter() at each put (the prompt, then each new token),
    after synchronizing the device on CUDA."""

    def __init__(self, device: torch.device, sync: bool = True):
        self.cuda = device.type == "cuda" and sync
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    from kvstore.hot.page_pool import OutOfPagesError

    return isinstance(exc, (torch.OutOfMemoryError, OutOfPagesError))


@dataclass
class Call:
    """One generate() call's measurements."""

    batch: int
    new_tokens: int
    ttft_s: float | None
    tt2t_s: float | None
    tpot_s: float | None
    peak_bytes: int | None  # CUDA: max_memory_allocated growth; CPU: peak RSS growth (None if unknown)
    gpu_kv_bytes_per_seq: float
    host_kv_bytes_per_seq: float
    batch_gpu_kv_bytes: float
    stats: dict | None


def generate_once(model, method: MethodSpec, prompts: torch.Tensor, new_tokens: int, geometry: Geometry,
                  path: str = "generate") -> Call:
    """Run one batch (prompts: int64 [B, L] on the model's device) under `method`: through
    generate() (hf, and presets with path="generate") or through kvstore.Engine (path="engine")."""
    from kvstore import KVStoreClient

    device = prompts.device
    batch, length = prompts.shape
    cuda = device.type == "cuda"
    free_memory(device)
    rss_ok = False
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        rss_ok = _reset_rss_peak()
        base = _proc_status_kb("VmRSS")
    # min_new_tokens = max_new_tokens: EOS is masked until the last token, so exactly new_tokens come
    # (an eos_token_id=None would not do: generate() fills unset fields from model.generation_config).
    # return_dict_in_generate: the output holds the cache, so the store's sequences are live for stats().
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None,
                   top_p=None, top_k=None, pad_token_id=pad, return_dict_in_generate=True)
    if path in ("engine", "engine-plain") and not method.is_hf:
        return _engine_once(model, method, prompts, new_tokens, geometry, base, rss_ok, overlap=path == "engine")
    client = None
    if not method.is_hf:
        config = dataclasses.replace(method.config, max_batch_size=batch)
        client = KVStoreClient(config).attach(model)
    timer = TokenTimer(device)
    out = None
    try:
        mask = torch.ones_like(prompts)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=mask, streamer=timer, **options)
        if cuda:
            torch.cuda.synchronize(device)
        peak = _peak_since(device, base, rss_ok)
        generated = out.sequences.shape[1] - length
        stats = client.stats() if client is not None else None
    finally:
        del out
        if client is not None:
            client.detach()
    return _call(timer.times, start, batch, length, generated, peak, stats, geometry)


def _peak_since(device: torch.device, base, rss_ok: bool) -> int | None:
    """Peak memory growth since `base`: CUDA max_memory_allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    hwm = _proc_status_kb("VmHWM")
    return hwm - base if rss_ok and hwm is not None and base is not None else None


def _engine_once(model, method: MethodSpec, prompts: torch.Tensor, new_tokens: int, geometry: Geometry,
                 base, rss_ok: bool, overlap: bool = True) -> Call:
    """One batch through kvstore.Engine: every prompt admitted (prefilled alone), then decode
    steps over the whole batch. Stamps: the prompts handed over, the first tokens (all admitted),
    then each decode step as its tokens reach the host (`decode_step` returns them), as TokenTimer
    stamps generate()'s tokens."""
    from kvstore.engine import Engine
    from kvstore.sampling import SamplingParams

    device = prompts.device
    batch, length = prompts.shape
    # the engine hands each step's tokens over on the host (it waits for them, and for nothing launched
    # after them): stamped as they come, with no device sync (one would also wait for the step it
    # launched ahead, `Engine(overlap=...)`, and so time the steps one after the other)
    timer = TokenTimer(device, sync=False)
    config = dataclasses.replace(method.config, max_batch_size=batch)
    with Engine(model, config, max_batch=batch, overlap=None if overlap else False) as engine:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        for row in prompts:
            engine.add_request(row, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # nothing queued before the prompts is timed
        timer.put(None)
        start = timer.times[0]
        engine.admit()
        timer.put(None)
        if engine.waiting:  # the engine queues what does not fit; a row measures B sequences at once
            from kvstore import OutOfPagesError

            raise OutOfPagesError(f"the hot tier admitted {batch - len(engine.waiting)} of {batch} sequences")
        stats = None
        while engine.running:
            if len(engine.running[0].tokens) == new_tokens - 1:
                stats = engine.stats()  # before the last step releases the sequences
            engine.decode_step()
            timer.put(None)
        generated = new_tokens
        if stats is None:
            stats = engine.stats()
        stats["decode_path"] = engine.decode_path  # "cuda-graph" or "eager" (after a failed capture too)
        stats["graph_captures"] = engine.graphs.captures if engine.graphs is not None else 0  # captures in timed steps
        peak = _peak_since(device, base, rss_ok)
    return _call(timer.times, start, batch, length, generated, peak, stats, geometry)


def _call(t: list[float], start: float, batch: int, length: int, generated: int, peak, stats: dict | None,
          geometry: Geometry) -> Call:
    """A Call from token stamps (t[0]: the prompt handed over; t[i]: token i)."""
    gaps = [b - a for a, b in zip(t[2:], t[3:])]
    if stats is not None:
        seqs = stats.get("sequences") or batch
        gpu_per_seq = stats.get("gpu_kv_bytes", 0) / seqs
        host_per_seq = stats.get("host_kv_bytes", 0) / seqs
    else:
        gpu_per_seq = float(geometry.dense_bytes_per_token * (length + generated))
        host_per_seq = 0.0
    return Call(
        batch=batch, new_tokens=generated,
        ttft_s=t[1] - start if len(t) > 1 else None,
        tt2t_s=t[2] - start if len(t) > 2 else None,
        tpot_s=statistics.median(gaps) if gaps else None,
        peak_bytes=peak, gpu_kv_bytes_per_seq=gpu_per_seq, host_kv_bytes_per_seq=host_per_seq,
        batch_gpu_kv_bytes=gpu_per_seq * batch, stats=stats,
    )


# ---- batch sizing ------------------------------------------------------------------------------


@dataclass
class Fit:
    batch: int  # what runs (after --max-batch)
    fit_batch: int  # what memory allows
    limit: str  # "gpu" or "host"
    gpu_bytes_per_seq: float | None
    gpu_fixed_bytes: float | None
    host_bytes_per_seq: float
    note: str | None = None


def fit_batch(model, method: MethodSpec, prompts_for, new_tokens: int, geometry: Geometry,
              max_batch: int | None, path: str = "generate") -> Fit:
    """Probe B=1 (and B=2 when transients dominate) and size the largest batch that fits."""
    device = next(model.parameters()).device
    probe_tokens = min(new_tokens, PROBE_NEW_TOKENS)
    one = generate_once(model, method, prompts_for(1), probe_tokens, geometry, path)
    host_avail, host_total = host_memory()
    host_budget = (host_avail - HOST_MARGIN * host_total) if host_avail is not None and host_total else None
    if device.type == "cuda":
        kv = one.gpu_kv_bytes_per_seq
        per_seq, fixed = float(one.peak_bytes), 0.0
        if one.peak_bytes > TWO_POINT_SLACK * kv:
            try:
                two = generate_once(model, method, prompts_for(2), probe_tokens, geometry, path)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
                if not _is_oom(exc):
                    raise
                two = None
            free_memory(device)
            if two is None:
                return Fit(1, 1, "gpu", per_seq, 0.0, one.host_kv_bytes_per_seq, "OOM in the B=2 probe, ran B=1")
            per_seq = max(float(two.peak_bytes - one.peak_bytes), kv)
            fixed = max(0.0, one.peak_bytes - per_seq)
        free, total = torch.cuda.mem_get_info(device)
        avail = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) - GPU_MARGIN * total
        gpu_fit = int((avail - fixed) // per_seq) if per_seq > 0 else 1 << 30
        host_per_seq = one.host_kv_bytes_per_seq
    else:
        per_seq = fixed = None
        gpu_fit = 1 << 30
        host_per_seq = max(one.gpu_kv_bytes_per_seq + one.host_kv_bytes_per_seq, float(one.peak_bytes or 0))
    if host_budget is None:
        logger.warning("host memory unknown (no psutil, no /proc/meminfo): the batch is not capped by host memory")
        host_fit = 1 << 30
    else:
        host_fit = int(host_budget // host_per_seq) if host_per_seq > 0 else 1 << 30
    if device.type == "cuda":
        limit = "gpu" if gpu_fit <= host_fit else "host"
    else:
        limit = "host"
    fit = min(gpu_fit, host_fit)
    note = None
    batch = fit
    if max_batch is not None and fit > max_batch:
        batch = max_batch
        note = f"--max-batch {max_batch} capped the batch ({limit} memory fits {fit})"
    logger.info("%s: %s per sequence, fixed %s, host %s per sequence -> fits %d (%s)", method.label,
                _fmt_bytes(per_seq), _fmt_bytes(fixed), _fmt_bytes(host_per_seq), fit, limit)
    return Fit(batch, fit, limit, per_seq, fixed, host_per_seq, note)


# ---- rows --------------------------------------------------------------------------------------


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _prefill_chunk(method: MethodSpec) -> int | None:
    """The chunk size generate() prefills with under `method` (None: the prompt in one pass)."""
    if method.is_hf or not getattr(method.config, "chunked_prefill", True):
        return None
    return getattr(method.config, "prefill_chunk_tokens", None)


def run_row(model, method: MethodSpec, length: int, args, geometry: Geometry, ctx: dict) -> dict:
    """One (method, length) row; never raises for a method's own failure (the row's `error`)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    vocab = model.config.vocab_size

    def prompts_for(b: int) -> torch.Tensor:
        """b random prompts of `length` tokens (int64 [b, length] on the device). Rows are drawn
        in order from one seeded generator, so the first prompts are the same at every b."""
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + length)
        return torch.randint(0, vocab, (b, length), generator=g).to(device)

    path = "generate" if method.is_hf else getattr(args, "path", "engine")
    row = {k: None for k in ROW_FIELDS + EXTRA_FIELDS}
    row.update(
        method=method.label, length=length, layers=geometry.layers, device_name=ctx["device_name"], path=path,
        new_tokens=args.new_tokens, hbm_bytes_per_s=ctx["bandwidth"], bandwidth_source=ctx["bandwidth_source"],
        model=ctx["model"], dtype=ctx["dtype"], device=str(device), weight_bytes=ctx["weight_bytes"],
        step_weight_bytes=ctx["step_weight_bytes"], seed=args.seed, command=ctx["command"],
        preset=None if method.is_hf else method.config.name,
        prefill_chunk_tokens=_prefill_chunk(method),
    )
    started = time.perf_counter()
    notes: list[str] = []
    call: Call | None = None
    failure: BaseException | None = None
    phase = "in the B=1 probe" if args.batch == "max" else "in the B=1 warm-up"
    try:
        if args.batch == "max":
            fit = fit_batch(model, method, prompts_for, args.new_tokens, geometry, args.max_batch, path)
            batch, row["limit"], row["fit_batch"] = fit.batch, fit.limit, fit.fit_batch
            row["probe_gpu_bytes_per_seq"], row["probe_host_bytes_per_seq"] = fit.gpu_bytes_per_seq, fit.host_bytes_per_seq
            if fit.note:
                notes.append(fit.note)
            if batch < 1:
                raise MemoryError(f"one sequence does not fit: {_fmt_bytes(fit.gpu_bytes_per_seq)} GPU "
                                  f"(+ {_fmt_bytes(fit.gpu_fixed_bytes)} fixed), {_fmt_bytes(fit.host_bytes_per_seq)} host")
        else:
            batch = args.batch
            # untimed warm-up (as the probes are for --batch max): first-call costs, Triton compilation
            # and allocator growth stay out of the timings
            generate_once(model, method, prompts_for(1), min(args.new_tokens, PROBE_NEW_TOKENS), geometry, path)
        ooms: list[int] = []
        while True:
            row["batch"], phase = batch, f"at B={batch}"
            oom = False
            try:
                call = generate_once(model, method, prompts_for(batch), args.new_tokens, geometry, path)
            except Exception as exc:  # noqa: BLE001 - the row records it
                if not _is_oom(exc) or args.batch != "max" or batch == 1:
                    raise
                oom = True
            if not oom:
                break
            ooms.append(batch)
            free_memory(device)  # outside the except block: the traceback no longer holds the tensors
            batch = max(1, min(batch - 1, int(batch * OOM_BACKOFF)))
            logger.warning("%s at %d tokens: out of memory at B=%d, retrying at B=%d", method.label, length,
                           ooms[-1], batch)
        if ooms:
            notes.append(f"OOM at B={', B='.join(map(str, ooms))}, ran B={batch}")
    except Exception as exc:  # noqa: BLE001 - the row records it, the run goes on
        logger.warning("%s at %d tokens failed", method.label, length, exc_info=True)
        failure = exc
    if failure is not None:
        row["error"] = _one_line(failure)
        if _is_oom(failure):
            row["error"] = f"out of memory {phase}: {row['error']}"
        del failure
    elif call is not None:
        _fill_measurements(row, call, method, length, geometry, ctx, cuda)
    call = None
    free_memory(device)
    row["note"] = "; ".join(notes) or None
    row["wall_s"] = time.perf_counter() - started
    return row


def _fill_measurements(row: dict, call: Call, method: MethodSpec, length: int, geometry: Geometry, ctx: dict,
                       cuda: bool) -> None:
    B = call.batch
    row["generated_tokens"] = call.new_tokens  # == new_tokens (min_new_tokens masks EOS)
    row["decode_path"] = (call.stats or {}).get("decode_path", "eager")
    row["graph_captures"] = (call.stats or {}).get("graph_captures", 0)
    row["ttft_s"], row["tt2t_s"], row["tpot_s"] = _finite(call.ttft_s), _finite(call.tt2t_s), _finite(call.tpot_s)
    row["decode_tokens_per_s"] = B / call.tpot_s if call.tpot_s else None
    row["peak_gpu_bytes"] = call.peak_bytes if cuda else None
    row["gpu_kv_bytes_per_seq"] = call.gpu_kv_bytes_per_seq
    row["host_bytes_per_seq"] = call.host_kv_bytes_per_seq
    row["host_reserved_bytes"] = (call.stats or {}).get("host_reserved_bytes")  # the slabs, vs used: B x host/seq
    row["dense_kv_bytes_per_seq"] = geometry.dense_bytes_per_token * (length + call.new_tokens)
    config = method.config
    pq_codes = None
    if method.is_hf or config.name == "full":
        kv = geometry.dense_bytes_per_token * B * (length + call.new_tokens / 2)
    else:
        kv = call.batch_gpu_kv_bytes
        if config.selector == "pq":
            pq_codes = B * geometry.layers * geometry.kv_heads * length * config.pq_subspaces
            if "retrieval_gpu_bytes" not in (call.stats or {}):
                kv += pq_codes
    row["step_kv_bytes"] = kv
    row["pq_code_bytes"] = pq_codes
    row["step_bytes"] = ctx["step_weight_bytes"] + kv
    bw = ctx["bandwidth"]
    row["roofline_tokens_per_s"] = B * bw / row["step_bytes"] if bw and row["step_bytes"] else None
    if row["decode_tokens_per_s"] and row["roofline_tokens_per_s"]:
        row["roofline_share"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
    if call.stats:
        for key in ("compression", "gpu_cache_hit_rate", "pq_build_seconds", "pq_wait_seconds"):
            if key in call.stats:
                row[key] = _finite(call.stats[key])


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_hf for every row: decode tokens/s over hf's at the same length (None without hf)."""
    hf = {r["length"]: r.get("decode_tokens_per_s") for r in rows if r["method"] == "hf" and not r.get("error")}
    for r in rows:
        base, mine = hf.get(r["length"]), r.get("decode_tokens_per_s")
        r["speedup_vs_hf"] = mine / base if base and mine else None


# ---- outputs -----------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); move it away or use another --out") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path} does not hold a list of rows; use another --out")
    return rows


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(path: Path, rows: list[dict]) -> None:
    """Atomically rewrite results.json (a killed run keeps every finished row)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{k: _clean(v) for k, v in r.items()} for r in rows], indent=1) + "\n")
    os.replace(tmp, path)


def _fmt_bytes(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _order(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _paths(rows: list[dict]) -> str:
    """How the rows decoded, in words: hf through generate(), the presets by their `path`."""
    names = {"engine": "`kvstore.Engine`", "engine-plain": "`kvstore.Engine(overlap=False)`",
             "generate": "`model.generate()` with `attach`"}
    preset = sorted({r.get("path") or "generate" for r in rows if r.get("method") != "hf"})
    said = " and ".join(names.get(p, p) for p in preset)
    return "hf through `model.generate()`" + (f", kvstore presets through {said}" if said else "")


def summary_markdown(rows: list[dict]) -> str:
    if not rows:
        return "# kvstore-bench throughput\n\nNo rows yet.\n"
    first = rows[0]
    bw = next((r["hbm_bytes_per_s"] for r in rows if r.get("hbm_bytes_per_s")), None)
    lines = [
        "# kvstore-bench throughput",
        "",
        f"Model: {first.get('model')} ({first.get('layers')} layers, {first.get('dtype')}, random prompts), "
        f"{first.get('new_tokens')} new tokens per sequence; {_paths(rows)}. "
        f"Device: {first.get('device')} ({first.get('device_name')}). Measured bandwidth: "
        f"{_fmt(bw and bw / 1e9, '.0f')} GB/s ({first.get('bandwidth_source')}). Weights: "
        f"{_fmt_bytes(first.get('weight_bytes'))} ({_fmt_bytes(first.get('step_weight_bytes'))} read per step).",
        "",
        "decode tok/s = batch / TPOT (median gap between tokens after the second). roofline = batch / "
        "(bytes a step reads / bandwidth); for methods other than hf and full the KV part is an estimate "
        "(the store's GPU KV bytes). vs hf: decode tok/s over hf's at the same length, each at its own batch.",
        "",
        "| method | length | batch | limit | TTFT s | TT2T s | TPOT ms | decode tok/s | roofline tok/s | share | "
        "vs hf | peak GPU | GPU KV/seq | host/seq | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    methods = _order(rows)
    for r in sorted(rows, key=lambda r: (r["length"], methods.index(r["method"]))):
        note = r.get("error") and f"ERROR: {r['error']}" or r.get("note") or ""
        lines.append(
            f"| {r['method']} | {r['length']} | {_fmt(r.get('batch'), 'd')} | {r.get('limit') or '-'} | "
            f"{_fmt(r.get('ttft_s'), '.3f')} | {_fmt(r.get('tt2t_s'), '.3f')} | "
            f"{_fmt(r.get('tpot_s') and r['tpot_s'] * 1e3, '.2f')} | {_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
            f"{_fmt(r.get('roofline_tokens_per_s'), '.1f')} | {_fmt(r.get('roofline_share'), '.3f')} | "
            f"{_fmt(r.get('speedup_vs_hf'), '.2f')} | {_fmt_bytes(r.get('peak_gpu_bytes'))} | "
            f"{_fmt_bytes(r.get('gpu_kv_bytes_per_seq'))} | {_fmt_bytes(r.get('host_bytes_per_seq'))} | "
            f"{note.replace('|', '/')} |"
        )
    commands = []
    for r in rows:
        if r.get("command") and r["command"] not in commands:
            commands.append(r["command"])
    lines += ["", "Made by:" if len(commands) <= 1 else "Made by (one invocation each):", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict]) -> Path | None:
    """Decode tokens/s by context length per method (log y), each method's roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    good = [r for r in rows if not r.get("error") and r.get("decode_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(_order(good)):
        mine = sorted((r for r in good if r["method"] == method), key=lambda r: r["length"])
        color = f"C{i % 10}"
        xs = [r["length"] for r in mine]
        ax.plot(xs, [r["decode_tokens_per_s"] for r in mine], "o-", color=color,
                label=f"{method} (B={'/'.join(str(r['batch']) for r in mine)})")
        roof = [(r["length"], r["roofline_tokens_per_s"]) for r in mine if r.get("roofline_tokens_per_s")]
        if roof:
            ax.plot(*zip(*roof), "x--", color=color, alpha=0.6, label=f"{method} roofline")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in good})
    if lengths:
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s (whole batch)")
    first = rows[0] if rows else {}
    ax.set_title(f"{first.get('model', '')} x{first.get('layers', '')} layers on {first.get('device_name', '')}",
                 fontsize=9)
    if good:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, rows: list[dict], plots: bool = True) -> str:
    add_speedups(rows)
    write_results(out / "results.json", rows)
    text = summary_markdown(rows)
    (out / "summary.md").write_text(text)
    if plots:
        write_plot(out / PLOT_FILE, rows)
    return text


# ---- the command -------------------------------------------------------------------------------


def _estimate(longest_at: dict[int, float], length: int) -> float:
    """Seconds the next row at `length` may take: the slowest row at that length so far, else the
    slowest at the longest shorter length scaled by the length ratio (0 with nothing to go by)."""
    if length in longest_at:
        return longest_at[length]
    shorter = [n for n in longest_at if n < length]
    return longest_at[max(shorter)] * length / max(shorter) if shorter else 0.0


def run(args, argv: list[str]) -> int:
    """`kvstore-bench throughput` after argparse (see the module docstring). Returns the exit status."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # Every row allocates and frees tens of GiB of differently sized tensors: with expandable
    # segments the caching allocator maps memory instead of keeping fixed blocks, so a batch sized
    # from the probes is not refused for fragmentation (call 1 at 32K: hf and quant OOM at the
    # first batch they tried). Read when CUDA's allocator starts: set before any CUDA tensor.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = args.throughput_parser
    try:
        methods, source, out, rows = validate(args)
    except ValueError as exc:
        parser.error(str(exc).splitlines()[0])  # exits 2
    deadline = t0 + 60 * args.max_minutes if args.max_minutes is not None else None
    done = {(r["method"], int(r["length"])) for r in rows}
    todo = [(length, m) for length in sorted(set(args.lengths)) for m in methods if (m.label, length) not in done]
    if len(done):
        logger.info("resuming %s: %d rows there, %d to run", out / "results.json", len(rows), len(todo))
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["kvstore-bench", *argv])
    if not todo:
        print(write_outputs(out, rows, plots=not args.no_plots))
        return 0
    device = source.device
    bandwidth, how = measure_bandwidth(device)
    logger.info("memory bandwidth %.0f GB/s (%s)", bandwidth / 1e9, how)
    start = time.perf_counter()
    model = build_model(source, args.seed)
    total_w, step_w = weight_bytes(model)
    logger.info("%s: %d layers, %s weights, built in %.1f s on %s", source.name, source.layers, _fmt_bytes(total_w),
                time.perf_counter() - start, device)
    ctx = dict(
        device_name=_device_name(device),
        bandwidth=bandwidth, bandwidth_source=how, model=source.name, dtype=_dtype_name(source.dtype),
        weight_bytes=total_w, step_weight_bytes=step_w, command=command,
    )
    geometry = geometry_of(model)
    stopped = None
    failed = 0
    longest_at: dict[int, float] = {}  # length -> the slowest row's seconds so far
    bar = tqdm(todo, desc="throughput rows", unit="row", disable=args.quiet)
    for length, method in bar:
        now = time.perf_counter()
        if deadline is not None and now + _estimate(longest_at, length) > deadline:
            stopped = (f"--max-minutes {args.max_minutes:g} reached after {(now - t0) / 60:.1f} min "
                       f"({len(rows)} rows in {out / 'results.json'})")
            break
        bar.set_postfix_str(f"{method.label} {length}")
        row = run_row(model, method, length, args, geometry, ctx)
        longest_at[length] = max(longest_at.get(length, 0.0), row["wall_s"])
        failed += bool(row["error"])
        rows.append(row)
        add_speedups(rows)
        write_results(out / "results.json", rows)
        if row["error"]:
            logger.warning("%s at %d tokens: ERROR %s", method.label, length, row["error"])
        else:
            logger.info("%s at %d tokens: B=%d (%s), TPOT %.2f ms, %.1f tok/s, %.3f of the roofline", method.label,
                        length, row["batch"], row["limit"] or "--batch", (row["tpot_s"] or 0) * 1e3,
                        row["decode_tokens_per_s"] or 0, row["roofline_share"] or 0)
    bar.close()
    del model
    free_memory(device)
    print(write_outputs(out, rows, plots=not args.no_plots))
    if stopped:
        logger.warning("stopped: %s; rerun with --resume to continue", stopped)
    if failed:
        logger.warning("%d row(s) failed (their `error` says why)", failed)
    return 1 if failed else 0
