"""A worker: one `kvstore.Engine` (a Hugging Face causal LM with a KVStore) decoding batches.

`WorkerEngine` is a plain class; the controller runs it as a Ray actor (one per GPU, or a CPU
worker when there is none), and tests run it in-process. Its batches go through the engine, the
same loop users run (kvstore/engine.py): each prompt is prefilled alone, a batch's decode step
is one `Engine.decode_step` over its requests (greedy, no EOS stop: every request gets exactly
`max_new_tokens`), captured in a CUDA graph where the preset allows it. The controller steps
each batch once per round, so a chaos kill lands between two known steps.

The engine's recorder (`Engine(recorder=...)`) hands every layer's attention inputs to the
worker, which mirrors them into the batch's cold-tier segment (cluster/node_memory.py) in the
padded timeline of kvstore.adapters.transfer (row b's prompt ends at the batch's prompt column,
then one column per decode step). A batch can start from prompts (prefill), resume from a
segment (no prefill: `Engine.restore` replays the store calls the engine made, from the
recorded inputs, so the store's state is the uninterrupted run's for every preset), or be
re-prefilled when its segment was lost: the prompts are prefilled and the generated tokens fed
back as decode steps (`forced_tokens`), which also leaves the store as the uninterrupted run had it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.node_memory import ArenaSpec, BatchArena
from kvstore import KVStoreConfig
from kvstore.adapters.transfer import exportable
from kvstore.engine import Engine
from kvstore.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: The random-weight model used until the probe model exists (and in tests).
RANDOM_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def probe_model_dir() -> Path | None:
    """benchmarks/probe/weights/ when it holds a model (config.json + safetensors), else None."""
    try:
        import benchmarks
    except ImportError:
        return None
    path = Path(benchmarks.__file__).parent / "probe" / "weights"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None


@dataclass(frozen=True)
class ModelSpec:
    """Which engine a worker loads.

    name: "random" (a small Llama with seeded random weights), "probe" (benchmarks/probe/weights/),
      "auto" (probe if present, else random), or a local directory / Hugging Face model name
      (loaded from safetensors only: no pickle loading of user-supplied files).
    seed: weight seed of the random model.
    dtype: "auto" (bfloat16 on GPU for loaded models, float32 otherwise) or a torch dtype name.
    """

    name: str = "auto"
    seed: int = 0
    dtype: str = "auto"

    def resolved(self) -> "ModelSpec":
        if self.name == "auto":
            return ModelSpec("probe" if probe_model_dir() is not None else "random", self.seed, self.dtype)
        return self


def build_model(spec: ModelSpec, device: torch.device):
    """Load the engine `spec` names onto `device` (eval mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = spec.resolved()
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and spec.name != "random" else torch.float32
    else:
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"ModelSpec.dtype={spec.dtype!r} is not a torch dtype name")
    if spec.name == "random":
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(LlamaConfig(**RANDOM_MODEL))
    else:
        source = probe_model_dir() if spec.name == "probe" else spec.name
        if source is None:
            raise ValueError("ModelSpec.name='probe' but benchmarks/probe/weights/ holds no model yet")
        model = AutoModelForCausalLM.from_pretrained(str(source), use_safetensors=True, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class _Batch:
    batch_id: str
    rids: list[int]  # the engine's request ids, row by row
    prompts: list[list[int]]
    prompt_columns: int  # P: every row's prompt ends at column P - 1 of the padded timeline
    max_new_tokens: int
    tokens: list[list[int]]  # generated so far, row by row
    arena: BatchArena | None = None
    t: int = 0  # columns fed so far
    scale: float = 1.0

    @property
    def size(self) -> int:
        return len(self.rids)

    @property
    def generated(self) -> int:
        return len(self.tokens[0])


class _SegmentRecorder:
    """The engine's recorder: what the store receives, into the batch's segment (when it has one).

    Copies are asynchronous on CUDA (the segment is pinned); the step's sampled tokens are read on
    the host after them (`Engine._take`), so a committed column is complete."""

    def __init__(self, worker: "WorkerEngine"):
        self.worker = worker

    def prefill(self, rid: int, layer: int, start: int, q, k, v, scale: float) -> None:
        b, row = self.worker._rows[rid]
        b.scale = float(scale)
        if b.arena is None:
            return
        seg, nb = b.arena, self.worker.device.type == "cuda"
        c = b.prompt_columns - len(b.prompts[row]) + start
        T = k.shape[2]
        seg.kv[c:c + T, 0, layer, row].copy_(k[0].transpose(0, 1), non_blocking=nb)  # [T, Hkv, d]
        seg.kv[c:c + T, 1, layer, row].copy_(v[0].transpose(0, 1), non_blocking=nb)
        if seg.q is not None:
            seg.q[c:c + T, layer, row].copy_(q[0].transpose(0, 1), non_blocking=nb)

    def step(self, rids: list[int], k, v, q) -> None:
        b, _ = self.worker._rows[rids[0]]  # a step is one batch's, its rows in order
        if b.arena is None:
            return
        seg, nb = b.arena, self.worker.device.type == "cuda"
        seg.kv[b.t, 0].copy_(k, non_blocking=nb)  # [L, B, Hkv, d]
        seg.kv[b.t, 1].copy_(v, non_blocking=nb)
        if seg.q is not None:
            seg.q[b.t].copy_(q, non_blocking=nb)


class WorkerEngine:
    """A `kvstore.Engine` serving batches of greedy-decoded sequences, each mirrored to its segment.

    Args:
        model: which engine to load.
        preset: the KVStoreConfig preset the store runs.
        device: "cuda", "cpu" or None (cuda when available).
        max_seqs: sequences this worker serves at once (its capacity; the engine's max_batch).
        num_threads: torch CPU threads (1 keeps CPU results independent of the host's cores).
        record_queries: also publish each step's queries, so a takeover replays the store's calls
          (exact for every preset); None: only when the preset's store state depends on them.
        store_overrides: KVStoreConfig fields that override the preset's.
    """

    def __init__(self, model: ModelSpec = ModelSpec(), preset: str = "full", device: str | None = None,
                 max_seqs: int = 8, num_threads: int | None = 1, record_queries: bool | None = None,
                 store_overrides: dict | None = None):
        if max_seqs < 1:
            raise ValueError(f"max_seqs={max_seqs} must be >= 1")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_spec = model.resolved()
        self.model = build_model(self.model_spec, self.device)
        config = KVStoreConfig.preset(preset, **{"max_batch_size": max_seqs, **(store_overrides or {})})
        self.engine = Engine(self.model, config, max_batch=max_seqs, recorder=_SegmentRecorder(self))
        self.client, self.store = self.engine.client, self.engine.store
        self.max_seqs = max_seqs
        self.batches: dict[str, _Batch] = {}
        self._rows: dict[int, tuple[_Batch, int]] = {}  # engine request id -> (batch, row)
        geo = self.store.geometry
        # Presets whose store state depends on queries are rebuilt from them, so they are kept.
        self.record_queries = not exportable(self.store) if record_queries is None else bool(record_queries)
        logger.info("worker %d ready: %s on %s, preset %s, capacity %d sequences, decode step %s", os.getpid(),
                    self.model_spec.name, self.device, preset, max_seqs, self.engine.decode_path)
        self._geometry = dict(num_layers=geo.num_layers, num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim,
                              dtype=str(geo.dtype).removeprefix("torch."),
                              num_q_heads=geo.num_q_heads if self.record_queries else 0)

    # ---- what the controller asks ------------------------------------------------------------
    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover
            pass
        return {
            "pid": os.getpid(),
            "node_id": node_id,
            "device": str(self.device),
            "max_seqs": self.max_seqs,
            "free": self.free,
            "model": self.model_spec.name,
            "vocab_size": int(self.model.config.vocab_size),
            "decode_path": self.engine.decode_path,
            **self._geometry,
        }

    @property
    def free(self) -> int:
        return self.max_seqs - sum(b.size for b in self.batches.values())

    def stats(self) -> dict:
        return self.engine.stats()

    # ---- batches ------------------------------------------------------------------------------
    def start(self, batch_id: str, prompts: list[list[int]], max_new_tokens: int, arena: ArenaSpec | None = None,
              generated: list[list[int]] | None = None) -> list[int]:
        """Prefill a batch and return each row's first generated token.

        With `generated` (a re-prefill after its segment was lost): the prompts are prefilled and
        the generated tokens are fed back one decode step at a time (teacher forcing), so the
        store ends in the state the uninterrupted run had (LeanKV's scores, PQ codebooks, the
        quantized pages) and the batch goes on with the tokens it would have produced; returns
        generated[-1]. A replayed step whose own token differs from the recorded one (a
        nondeterministic kernel) counts in `take_replay_mismatches` and the recorded token is kept.
        """
        if batch_id in self.batches:
            self.finish(batch_id)
        B = len(prompts)
        if B == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("start needs at least one prompt and no empty prompt")
        if B > self.free:
            raise ValueError(f"batch {batch_id!r} of {B} sequences exceeds this worker's free capacity {self.free}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        gen = generated or [[] for _ in prompts]
        if len(gen) != B or len({len(g) for g in gen}) != 1:
            raise ValueError("generated must hold one list per prompt, all of the same length")
        g = len(gen[0])
        if g > max_new_tokens:
            raise ValueError(f"{g} generated tokens exceed max_new_tokens={max_new_tokens}")
        P = max(len(p) for p in prompts)
        if arena is not None and (arena.max_tokens < P + max_new_tokens or arena.batch != B):
            raise ValueError(f"arena {arena.name} holds [{arena.batch}, {arena.max_tokens}], batch needs "
                             f"[{B}, {P + max_new_tokens}]")
        b = _Batch(batch_id, [], [list(p) for p in prompts], P, max_new_tokens, [[] for _ in prompts],
                   arena=self._attach(arena))
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        try:
            for row, p in enumerate(prompts):
                rid = self.engine.add_request(p, params, forced_tokens=gen[row])
                b.rids.append(rid)
                self._rows[rid] = (b, row)
            if b.arena is not None:  # the prompts' ids and validity (host bookkeeping, not the data path)
                for row, p in enumerate(prompts):
                    b.arena.ids[row, P - len(p):P] = torch.tensor(p, dtype=torch.int64)
                    b.arena.valid[row, P - len(p):P] = 1
            first = {o.request_id: o.token_id for o in self.engine.admit()}
            if len(first) != B or self.engine.waiting:
                raise RuntimeError(f"batch {batch_id!r}: the engine admitted {len(first)} of {B} prompts")
        except BaseException:
            self._drop(b)
            raise
        for row, rid in enumerate(b.rids):
            b.tokens[row].append(first[rid])
        b.t = P
        self.batches[batch_id] = b
        if b.arena is not None:
            b.arena.ids[:, P] = torch.tensor([t[0] for t in b.tokens], dtype=torch.int64)
            b.arena.set_layout(P, P, b.scale)
            b.arena.commit(b.t, b.generated)
        for _ in range(1, g):
            self._decode(b)
        return [t[-1] for t in b.tokens]

    def resume(self, batch_id: str, arena: ArenaSpec, max_new_tokens: int) -> list[list[int]]:
        """Take over a batch from its cold-tier segment, without prefill.

        Rebuilds the batch's requests in this worker's engine from the committed columns
        (`Engine.restore`: the store calls replayed from the recorded inputs, no model) and
        returns each row's generated tokens so far (the segment is the truth: a step the dead
        worker committed counts). Raises FileNotFoundError when the segment is gone (its cold
        tier died).
        """
        if batch_id in self.batches:
            self.finish(batch_id)
        seg = BatchArena.attach(arena)
        try:
            t, g, P = seg.committed, seg.generated, seg.prompt_columns
            if t == 0 or g == 0:
                raise ValueError(f"arena {arena.name} holds no committed step yet")
            if arena.batch > self.free:
                raise ValueError(f"batch {batch_id!r} of {arena.batch} sequences exceeds free capacity {self.free}")
            if seg.q is None and self.record_queries:
                raise ValueError(f"arena {arena.name} holds no queries; preset {self.store.config.name!r} needs them to resume")
            lengths = seg.valid[:, :P].sum(1).tolist()
            prompts = [seg.ids[row, P - n:P].tolist() for row, n in enumerate(lengths)]
            tokens = seg.ids[:, P:P + g].tolist()
            kv = seg.kv[:t]  # [t, 2, L, B, H, d]
            keys, values = kv[:, 0].permute(1, 2, 3, 0, 4), kv[:, 1].permute(1, 2, 3, 0, 4)
            queries = seg.q[:t].permute(1, 2, 3, 0, 4) if seg.q is not None else None
            b = _Batch(batch_id, [], prompts, P, max_new_tokens, [list(x) for x in tokens], arena=seg, t=t,
                       scale=seg.scale)
            params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
            b.rids = self.engine.restore(prompts, tokens, params, keys, values, queries, scale=seg.scale)
        except BaseException:
            seg.close()
            raise
        for row, rid in enumerate(b.rids):
            self._rows[rid] = (b, row)
        seg.pin()
        self.batches[batch_id] = b
        logger.info("resumed batch %s at column %d (%d tokens generated) without prefill", batch_id, t, g)
        return [list(x) for x in b.tokens]

    def step(self, batch_id: str) -> list[int]:
        """One greedy decode step of a batch; returns each row's new token."""
        b = self.batches[batch_id]
        if b.generated >= b.max_new_tokens:
            raise ValueError(f"batch {batch_id!r} already generated its {b.max_new_tokens} tokens")
        return self._decode(b)

    def _decode(self, b: _Batch) -> list[int]:
        """Feed column b.t (each row's last token), append each row's next one."""
        t = b.t
        new = [o.token_id for o in self.engine.decode_step(b.rids)]  # the recorder writes column t
        for row, tok in zip(b.tokens, new):
            row.append(tok)
        b.t = t + 1
        if b.arena is not None:
            b.arena.valid[:, t] = 1
            b.arena.ids[:, t + 1] = torch.tensor(new, dtype=torch.int64)
            b.arena.commit(b.t, b.generated)
        return new

    def take_replay_mismatches(self) -> int:
        """Rows of replayed steps whose own token differed from the recorded one since the last call."""
        n, self.engine.forced_mismatches = self.engine.forced_mismatches, 0
        return n

    def generated(self, batch_id: str) -> list[list[int]]:
        return [list(row) for row in self.batches[batch_id].tokens]

    def finish(self, batch_id: str) -> None:
        """End a batch: its sequences leave the store and its segment is unmapped."""
        b = self.batches.pop(batch_id, None)
        if b is not None:
            self._drop(b)

    # ---- internals ---------------------------------------------------------------------------
    def _drop(self, b: _Batch) -> None:
        for rid in b.rids:
            self.engine.abort(rid)  # a finished request is gone already
            self._rows.pop(rid, None)
        if b.arena is not None:
            b.arena.close()

    def _attach(self, arena: ArenaSpec | None) -> BatchArena | None:
        if arena is None:
            return None
        if (arena.num_q_heads > 0) != self.record_queries:
            raise ValueError(f"arena {arena.name} has num_q_heads={arena.num_q_heads}; this worker "
                             f"{'records' if self.record_queries else 'does not record'} queries")
        seg = BatchArena.attach(arena)
        seg.pin()
        return seg
