"""Run tasks x lengths x methods x budgets through one model and write the results.

    model, tokenizer, label = load_model("probe" | "random" | PATH)
    rows = run_suite(model, tokenizer, RunSpec(tasks=[...], lengths=[...], methods=[...], out="DIR"))

For each (task, length) the prompts are generated once (same ids for every method); for each
method (a `benchmarks.suite.methods.Method`) the samples run greedily in batches of equal-length
prompts, by default through `kvstore.Engine` (RunSpec.path "engine": the batch's prompts
admitted one by one, then decode steps over the batch, each sample ending at the tokenizer's
EOS or its token budget; greedy tokens are those of the generate path, tests/test_bench_runner.py)
or with the store attached through `model.generate` (path "generate"), and one row per (task,
length, method, budget) is appended to `DIR/results.jsonl`, with every sample's prediction and score in
`DIR/samples.jsonl`. Rows already in results.jsonl are skipped, so an interrupted run resumes.
Rows run length by length (shortest first), so a run stopped by `max_minutes` (or killed)
leaves the short lengths complete; a row is written only once all its samples ran.

Timing is honest on CUDA: the device is synchronized before the request starts and after
generate() returns, and each token's stamp is taken after generate() copied it to the host.
On CUDA every (method, length, batch size) first runs one untimed warm-up batch (a few tokens)
so that Triton compilation and allocator growth do not land in the first row's TTFT.

Row fields (per sequence unless said otherwise):
  task, length, method, budget, budget_definition, category, accuracy (mean RULER string-match
  score), exact (fraction of samples with every answer), samples, model, dtype, device,
  batch_size, gpu_kv_bytes / host_kv_bytes / dense_kv_bytes (client.stats() at the end of
  generation, divided by the batch's sequences, averaged over batches), compression
  (dense / gpu), ttft_s (request start to the first generated token, one batch), tt2t_s
  (request start to the second token: includes the first decode step, which waits for any
  PQ build), tpot_s (mean time per output token after the second), tokens_per_s (generated
  tokens of the whole batch per second of generate()), new_tokens (mean generated per sample),
wall_s (the row's wall time, warm-up included), warmup_s (the untimed warm-up's share), path
  ("engine" or "generate"), decode_path ("cuda-graph" or "eager": how the engine decoded).
  On the engine path the byte counts are read at the last step every sequence was live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.suite.methods import Method, MethodUnavailable, expand_methods
from benchmarks.suite.scoring import exact_match, mean, score_sample
from benchmarks.suite.tasks import Sample, make_sample
from kvstore.adapters.hf import CACHE_ARG

logger = logging.getLogger(__name__)

RESULT_FIELDS = (
    "task", "length", "method", "budget", "accuracy", "samples", "gpu_kv_bytes", "dense_kv_bytes",
    "host_kv_bytes", "ttft_s", "tt2t_s", "tpot_s", "tokens_per_s",
)


@dataclass
class RunSpec:
    """What to run. depths: None spreads needle depths evenly over [0, 1] across the samples."""

    tasks: list[str]
    lengths: list[int]
    methods: list[str]
    out: str
    budgets: list[str] | None = None
    samples: int = 10
    batch_size: int | None = None
    seed: int = 0
    depths: list[float] | None = None
    max_new_tokens: int | None = None
    progress: bool = True
    #: stop cleanly (between batches, before a row that would not fit) after this many minutes
    max_minutes: float | None = None
    #: None: warm up on CUDA only (Triton compilation); True / False: always / never
    warmup: bool | None = None
    #: leave out methods the store cannot run (with a warning) instead of failing
    skip_unavailable: bool = False
    #: a method@budget that raises is logged (traceback), recorded in SuiteResult.failed and
    #: left out for the rest of the run, instead of ending it (a long GPU run keeps the rest)
    keep_going: bool = False
    #: "engine" (kvstore.Engine: each prompt prefilled alone, batched decode, the CUDA-graph step
    #: where the preset allows) or "generate" (attach + model.generate() on the batch)
    path: str = "engine"

    def __post_init__(self):
        if self.path not in ("engine", "generate"):
            raise ValueError(f"path must be 'engine' or 'generate', got {self.path!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not self.tasks or not self.lengths or not self.methods:
            raise ValueError("tasks, lengths and methods must each name at least one entry")
        if any(n <= 0 for n in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.depths is not None and any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")

    def depth_of(self, i: int) -> float:
        if self.depths:
            return self.depths[i % len(self.depths)]
        return i / (self.samples - 1) if self.samples > 1 else 0.5

    def batch_for(self, length: int, device: torch.device | str = "cpu") -> int:
        """Sequences per generate() call: --batch-size, else about TOKENS_PER_BATCH[device] prompt
        tokens, balanced so the last batch is not a straggler (20 samples at most 8 -> 7, 7, 6)."""
        if self.batch_size:
            return self.batch_size
        most = max(1, min(self.samples, TOKENS_PER_BATCH[torch.device(device).type == "cuda"] // length))
        num_batches = math.ceil(self.samples / most)
        return math.ceil(self.samples / num_batches)


#: Prompt tokens per batch by default, {on CUDA: ..., else: ...}. CPU: the reference prefill
#: holds B*Hq*T*T attention scores. CUDA: the store's prefill builds a [B, 1, T, T] bool mask
#: for SDPA (7 x 16K: 1.9 GB, plus its bf16 bias) and H2O scores 512 queries at a time
#: (7 x 8 x 512 x 16K fp32: 1.9 GB), small next to 80 GB. Larger batches mean fewer decode
#: steps, and the per-step Python overhead of the store is what a GPU run pays for: 128K gives
#: 20 samples as 1 batch at 4K, 2 at 8K, 3 at 16K. An out-of-memory error halves the batch.
TOKENS_PER_BATCH = {False: 16384, True: 131072}


# ---- models -----------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` names ("auto": cuda when this torch sees a GPU, else cpu).

    Raises ValueError (one line) for a name torch does not parse, a device other than cpu or cuda,
    or a CUDA device this torch does not see (a CPU-only build, or an index past the last GPU).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise ValueError(f"--device {device}: this torch ({torch.__version__}, {build}) sees no CUDA device; "
                             "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def random_model(seed: int = 0, **config):
    """A tiny random Llama (2 layers, hidden 64, GQA 4/2) with the probe tokenizer: plumbing only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.probe.tokenizer import build_tokenizer, default_strings

    tokenizer = build_tokenizer(default_strings())
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 17,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    kwargs.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    return model, tokenizer


def model_label(name: str) -> str:
    """The `model` field of the rows a run of --model `name` writes."""
    return name if name in ("probe", "random") else str(Path(name))


def check_model(name: str) -> str:
    """Check --model before anything is loaded; returns the label its rows get.

    "probe" needs the shipped files; a folder must hold a config.json of a supported family,
    weights and tokenizer files this environment can read (kvstore.adapters.model_dir).
    Raises FileNotFoundError or ValueError with a one-line message.
    """
    if name == "probe":
        from benchmarks.probe.model import PROBE_DIR, has_probe

        if not has_probe(PROBE_DIR):
            raise FileNotFoundError(
                f"--model probe: the probe model is not in {PROBE_DIR} yet. Train it with "
                "`python -m benchmarks.probe.train --out benchmarks/probe/weights`, or pass --model random "
                "(a tiny random Llama: plumbing only) or a local Hugging Face model folder"
            )
    elif name != "random":
        if not Path(name).is_dir():
            raise FileNotFoundError(
                f"--model {name!r}: not 'probe', 'random' or a local folder with a Hugging Face model "
                "(config.json, weights, tokenizer); nothing is downloaded"
            )
        from kvstore.adapters.model_dir import ModelDirError, check_model_dir

        try:
            check_model_dir(name, tokenizer=True)
        except ModelDirError as exc:
            raise ValueError(f"--model {exc}") from None
    return model_label(name)


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, label) for "probe" (the shipped probe model), "random", or a local HF path.

    Checks `name` first (check_model): a folder the store cannot serve fails before its weights load.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model(name)
    if name == "probe":
        from benchmarks.probe.model import PROBE_DIR, load_probe

        model, tokenizer = load_probe(PROBE_DIR, dtype=dt, device=dev)
        return model, tokenizer, "probe"
    if name == "random":
        model, tokenizer = random_model()
        return model.to(device=dev, dtype=dt), tokenizer, "random"
    path = Path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dt).to(dev).eval()
    return model, tokenizer, str(path)


# ---- results file -----------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON (an interrupted write?); ignored", path, i + 1)
    return rows


def check_results_model(results: Path, label: str, rows: list[dict] | None = None) -> None:
    """ValueError when `results` (a results.jsonl) holds rows of a model other than `label`."""
    rows = read_rows(results) if rows is None else rows
    other = {r.get("model") for r in rows} - {label}
    if other:
        raise ValueError(f"{results} holds results of model {sorted(map(str, other))}, not {label!r}: use another --out")


def row_key(row: dict) -> tuple:
    return (row["task"], int(row["length"]), row["method"], str(row["budget"]))


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")


# ---- generation -------------------------------------------------------------------------------


class _StepTimer:
    """A `generate()` streamer that stamps the time of each put (prompt, then each token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:  # generate() moves the tokens to the host first: in sync already
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_batch(model, tokenizer, samples: list[Sample], method: Method, client, max_new_tokens: int) -> dict:
    """Greedy-generate one batch of equal-length samples with the store attached.

    Returns predictions, timings and the store's byte counts at the end of generation (the
    batch's sequences still live: the runner passes its own KVStoreCache and frees it after).
    """
    from kvstore.adapters.hf import KVStoreCache

    device = next(model.parameters()).device
    ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timer = _StepTimer(device)
    cache = KVStoreCache(client.store)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, **{CACHE_ARG: cache}, max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id, streamer=timer,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        stats = client.stats()
    finally:
        cache.release()
    new = out[:, ids.shape[1]:]
    preds = [tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
    # t[0] prompt handed over, t[i] token i generated
    return _batch_result(preds, timer.times, start, end, (len(timer.times) - 1) * len(samples), stats)


def _batch_result(preds: list[str], t: list[float], start: float, end: float, generated: int, stats: dict) -> dict:
    """A batch's row material from its token stamps (t[0]: the prompts handed over; t[i]: step i)."""
    steps = len(t) - 1
    n = len(preds)
    return {
        "predictions": preds,
        "ttft_s": t[1] - start if steps >= 1 else float("nan"),
        "tt2t_s": t[2] - start if steps >= 2 else float("nan"),
        "tpot_s": (t[-1] - t[2]) / (steps - 2) if steps >= 3 else float("nan"),
        "tokens_per_s": generated / (end - start) if end > start else float("nan"),
        "new_tokens": steps,
        "gpu_kv_bytes": stats.get("gpu_kv_bytes", 0) / n,
        "host_kv_bytes": stats.get("host_kv_bytes", 0) / n,
        "dense_kv_bytes": stats.get("dense_kv_bytes", 0) / n,
        "stats": stats,
    }


def generate_batch_engine(tokenizer, samples: list[Sample], engine, max_new_tokens: int) -> dict:
    """`generate_batch` through a kvstore.Engine: the batch's prompts admitted, then decode steps
    until every one ends (EOS or max_new_tokens). Stamps after the admission (first tokens) and
    after each step; the store's byte counts are those of the last step all sequences were live."""
    from kvstore.sampling import SamplingParams

    device = engine.device
    # the tokenizer's EOS ends a sample, as generate_batch's eos_token_id (not the model's own list)
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=eos, ignore_eos=True)
    rids = [engine.add_request(s.input_ids, params) for s in samples]
    tokens: dict[int, list[int]] = {r: [] for r in rids}
    t = []

    def stamp():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t.append(time.perf_counter())

    stamp()
    start = t[0]
    outs = engine.admit()
    stamp()
    stats = engine.stats()
    while True:
        for o in outs:
            if o.request_id in tokens:  # (an engine kept from an earlier row returns only these)
                tokens[o.request_id].append(o.token_id)
        if not engine.running:
            break
        if len(engine.running) == len(samples):
            stats = engine.stats()  # every sequence still live
        outs = engine.decode_step()
        stamp()
    preds = [tokenizer.decode(tokens[r], skip_special_tokens=True) for r in rids]
    return _batch_result(preds, t, start, t[-1], sum(len(v) for v in tokens.values()), stats)


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


class DeadlineReached(Exception):
    """The run's max_minutes passed; the row in progress was abandoned (nothing written)."""


def _method_config(method: Method, batch_size: int):
    config = method.config
    return dataclasses.replace(config, max_batch_size=batch_size) if config.max_batch_size < batch_size else config


class EngineCache:
    """One kvstore.Engine kept across consecutive rows of the same method and batch size (the
    engine path's rows run method by method within a length: `run_suite`), so that its store and
    the CUDA graphs it captured (a batch whose requests stop one by one meets many batch sizes)
    serve every task, not one row each. Another method or batch size closes it first."""

    def __init__(self, model):
        self.model = model
        self.key: tuple | None = None
        self.engine = None

    def get(self, method: Method, batch_size: int):
        from kvstore import Engine

        key = (method.key, batch_size)
        if key != self.key:
            self.close()
            try:
                self.engine = Engine(self.model, _method_config(method, batch_size), max_batch=batch_size)
            except NotImplementedError as exc:
                raise MethodUnavailable(f"{method.name}: {exc}") from None
            self.key = key
        return self.engine

    def close(self) -> None:
        """Close the engine held (after an error inside a row too: its requests may be unfinished)."""
        engine, self.engine, self.key = self.engine, None, None
        if engine is not None:
            engine.close()


def run_method(model, tokenizer, samples: list[Sample], method: Method, batch_size: int,
               max_new_tokens: int | None = None, progress=None, warmup: bool = False,
               deadline: float | None = None, path: str = "generate",
               engines: EngineCache | None = None) -> tuple[dict, list[dict]]:
    """Run `samples` (one task and length) under `method`; returns (row, per-sample records).

    warmup: first run the first batch untimed for a few tokens (Triton compilation on CUDA).
    deadline: a time.perf_counter() value; past it, DeadlineReached is raised between batches.
    A store that refuses the method at attach raises MethodUnavailable.
    path: "generate" (attach + model.generate()) or "engine" (kvstore.Engine with max_batch = batch_size;
    from `engines` where given, which keeps it for the next row, else a new one closed at the end).
    """
    from kvstore import KVStoreClient

    wall_start = time.perf_counter()
    config = _method_config(method, batch_size)
    client = engine = None
    own_engine = engines is None
    batches = []
    records = []
    if path == "engine":
        engine = (engines if engines is not None else EngineCache(model)).get(method, batch_size)
    else:
        try:
            client = KVStoreClient(config)
            client.attach(model)
        except NotImplementedError as exc:
            raise MethodUnavailable(f"{method.name}: {exc}") from None

    def generate(chunk, budget):
        if engine is not None:
            return generate_batch_engine(tokenizer, chunk, engine, budget)
        return generate_batch(model, tokenizer, chunk, method, client, budget)

    try:
        warm_start = time.perf_counter()
        if warmup:
            generate(samples[:batch_size], min(4, max_new_tokens or 4))
        warmup_s = time.perf_counter() - warm_start
        for start in range(0, len(samples), batch_size):
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineReached(f"{method.name} {method.budget} stopped after {len(records)} samples")
            chunk = samples[start:start + batch_size]
            budget = max_new_tokens or max(s.max_new_tokens for s in chunk)
            res = generate(chunk, budget)
            batches.append(res)
            for s, pred in zip(chunk, res["predictions"]):
                records.append({
                    "task": s.task, "length": s.length, "method": method.name, "budget": method.budget,
                    "seed": s.seed, "depth": s.depth, "needle_positions": list(s.needle_positions),
                    "answers": list(s.answers), "prediction": pred, "score": score_sample(pred, s.answers),
                })
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if engine is not None:
            if own_engine:
                engine.close()
        else:
            client.detach()
    first = samples[0]
    gpu = _nanmean([b["gpu_kv_bytes"] for b in batches])
    dense = _nanmean([b["dense_kv_bytes"] for b in batches])
    row = {
        "task": first.task,
        "length": first.length,
        "method": method.name,
        "budget": method.budget,
        "accuracy": mean(r["score"] for r in records),
        "exact": mean(float(exact_match(r["prediction"], r["answers"])) for r in records),
        "samples": len(records),
        "gpu_kv_bytes": gpu,
        "dense_kv_bytes": dense,
        "host_kv_bytes": _nanmean([b["host_kv_bytes"] for b in batches]),
        "compression": dense / gpu if gpu else float("nan"),
        "ttft_s": _nanmean([b["ttft_s"] for b in batches]),
        "tt2t_s": _nanmean([b["tt2t_s"] for b in batches]),
        "tpot_s": _nanmean([b["tpot_s"] for b in batches]),
        "tokens_per_s": _nanmean([b["tokens_per_s"] for b in batches]),
        "new_tokens": _nanmean([b["new_tokens"] for b in batches]),
        "category": first.category,
        "budget_definition": method.budget_definition,
        "batch_size": batch_size,
        "preset": config.name,
        "path": path,
        "decode_path": engine.decode_path if engine is not None else "eager",
        "wall_s": time.perf_counter() - wall_start,
        "warmup_s": warmup_s,
    }
    return row, records


@dataclass
class SuiteResult:
    """What run_suite did: every row now in results.jsonl, and whether the plan finished."""

    rows: list[dict]
    planned: int  # rows this call set out to run (rows already in the file excluded)
    completed: int  # rows this call wrote
    stopped: str | None = None  # why it stopped early (max_minutes), else None
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why the store refused it
    failed: dict[str, str] = field(default_factory=dict)  # "method budget" -> the error (keep_going)

    @property
    def finished(self) -> bool:
        return self.stopped is None


def run_suite(model, tokenizer, spec: RunSpec, model_label: str = "model") -> SuiteResult:
    """Run everything in `spec` not already in OUT/results.jsonl (lengths ascending).

    Stops cleanly at spec.max_minutes: before a row whose estimated time (seconds per sample
    seen at that length) would overrun, or between batches; rerunning resumes.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    deadline = t0 + 60 * spec.max_minutes if spec.max_minutes is not None else None
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    results, sample_file = out / "results.jsonl", out / "samples.jsonl"
    existing = read_rows(results)
    check_results_model(results, model_label, existing)
    done = {row_key(r) for r in existing}
    methods = expand_methods(spec.methods, spec.budgets, spec.skip_unavailable)  # raises MethodUnavailable early
    param = next(model.parameters())
    device = param.device
    warmup = spec.warmup if spec.warmup is not None else device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # lengths ascending; within a length the engine path runs method by method (one engine serves a method's
    # tasks: `EngineCache`), the generate path task by task
    if spec.path == "engine":
        order = [(task, length, m) for length in sorted(spec.lengths) for m in methods for task in spec.tasks]
    else:
        order = [(task, length, m) for length in sorted(spec.lengths) for task in spec.tasks for m in methods]
    todo = [(task, length, m) for task, length, m in order if (task, length, m.name, m.budget) not in done]
    skipped = len(spec.tasks) * len(spec.lengths) * len(methods) - len(todo)
    if skipped:
        logger.info("resuming: %d rows already in %s are skipped", skipped, results)
    result = SuiteResult(rows=[], planned=len(todo), completed=0)
    bar = tqdm(total=len(todo) * spec.samples, desc="samples", unit="sample", disable=not spec.progress)
    cache: dict[tuple[str, int], list[Sample]] = {}
    warmed: set[tuple] = set()
    max_batch: dict[int, int] = {}  # length -> batch cap after an out-of-memory error
    per_sample: dict[int, float] = {}  # length -> the slowest row's seconds per sample so far
    refused: set[str] = set()
    broken: set[tuple[str, str]] = set()
    engines = EngineCache(model) if spec.path == "engine" else None
    try:
        i = 0
        while i < len(todo):
            task, length, method = todo[i]
            i += 1
            if method.name in refused or method.key in broken:
                continue
            now = time.perf_counter()
            if deadline is not None and now + per_sample.get(length, 0.0) * spec.samples > deadline:
                result.stopped = (
                    f"max_minutes={spec.max_minutes:g} reached after {(now - t0) / 60:.1f} min "
                    f"({result.completed} of {result.planned} rows written)"
                )
                break
            if (task, length) not in cache:
                if any(n != length for _, n in cache):
                    cache.clear()  # one length at a time: generation order groups them
                cache[(task, length)] = [
                    make_sample(task, length, spec.seed * 1_000_003 + i, tokenizer, spec.depth_of(i))
                    for i in range(spec.samples)
                ]
            batch = min(spec.batch_for(length, device), max_batch.get(length, spec.samples))
            bar.set_postfix_str(f"{task} {length} {method.name} {method.budget}")
            wkey = (method.key, length, batch)
            try:
                row, records = run_method(
                    model, tokenizer, cache[(task, length)], method, batch, spec.max_new_tokens, bar,
                    warmup=warmup and wkey not in warmed, deadline=deadline, path=spec.path, engines=engines,
                )
            except torch.OutOfMemoryError:
                if engines is not None:
                    engines.close()  # its requests are unfinished, and the retry needs its memory
                if batch == 1 or spec.batch_size:
                    raise
                max_batch[length] = batch // 2
                logger.warning("out of memory at %d tokens x %d sequences: batches of %d from now on",
                               length, batch, batch // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                todo.insert(i, (task, length, method))  # retry the row next
                continue
            except MethodUnavailable as exc:
                if not (spec.skip_unavailable or (method.name not in spec.methods and _from_available(spec.methods))):
                    raise
                logger.warning("method %s skipped: %s", method.name, exc)
                refused.add(method.name)
                result.skipped[method.name] = str(exc)
                continue
            except DeadlineReached as exc:
                result.stopped = (
                    f"max_minutes={spec.max_minutes:g} reached after {(time.perf_counter() - t0) / 60:.1f} min "
                    f"({result.completed} of {result.planned} rows written; {exc}, not written)"
                )
                break
            except Exception as exc:
                if engines is not None:
                    engines.close()  # its requests may be unfinished
                if not spec.keep_going:
                    raise
                logger.exception("%s %d %s %s failed; this method@budget is left out from now on",
                                 task, length, method.name, method.budget)
                broken.add(method.key)
                result.failed[f"{method.name} {method.budget}"] = f"{task} {length}: {type(exc).__name__}: {exc}"
                continue
            warmed.add(wkey)
            per_sample[length] = max(per_sample.get(length, 0.0), (row["wall_s"] - row["warmup_s"]) / spec.samples)
            row.update(model=model_label, dtype=str(param.dtype).removeprefix("torch."), device=str(device),
                       device_name=device_name)
            _append(sample_file, records)
            _append(results, [row])
            result.completed += 1
            logger.info(
                "%s %d %s %s: accuracy %.3f, GPU KV %.0f B/seq (dense %.0f), TTFT %.3fs, %.1fs",
                task, length, method.name, method.budget, row["accuracy"], row["gpu_kv_bytes"],
                row["dense_kv_bytes"], row["ttft_s"], row["wall_s"],
            )
    finally:
        bar.close()
        if engines is not None:
            engines.close()
    if result.stopped:
        logger.warning("stopped: %s; rerun the same command to resume", result.stopped)
    result.rows = read_rows(results)
    return result


def _from_available(names: list[str]) -> bool:
    from benchmarks.suite.methods import ALL_AVAILABLE

    return any(n in ALL_AVAILABLE for n in names)
