"""A worker: one engine (a Hugging Face causal LM) with a KVStoreClient attached, decoding batches.

`WorkerEngine` is a plain class; the controller runs it as a Ray actor (one per GPU, or a CPU
worker when there is none), and tests run it in-process. It drives decoding itself, one step
per call, as a forward loop over `past_key_values` with greedy argmax (no EOS stop: every
request gets exactly `max_new_tokens`), so that

* each step's state (next token ids, the new K/V of every layer) is published to the batch's
  cold-tier segment (cluster/node_memory.py) straight from this process, and
* a chaos kill lands between two known steps.

Per batch the worker keeps the padded timeline of kvstore.adapters.transfer (left padding, column t
is the t-th token fed). A batch can start from prompts (prefill), resume from a segment (no
prefill: its K/V are imported into the store), or be re-prefilled when its segment was lost: the
prompt is prefilled and the generated tokens are replayed as decode steps, so the store's state
(and every later token) is the uninterrupted run's for every preset.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.node_memory import ArenaSpec, BatchArena
from kvstore import KVStoreClient, KVStoreConfig
from kvstore.adapters.hf import CACHE_ARG
from kvstore.adapters.transfer import BatchKV, BatchTrace, TapCache, exportable, import_batch, replay_batch

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
    cache: TapCache
    ids: torch.Tensor  # int64 [B, max_tokens + 1] on the device: the padded timeline of token ids
    mask: torch.Tensor  # int64 [B, max_tokens] on the device: 1 for real tokens
    positions: torch.Tensor  # int64 [B, 1] position of the next token to feed
    prompt_columns: int
    max_new_tokens: int
    t: int = 0  # columns fed so far
    generated: int = 0
    arena: BatchArena | None = None
    stage: torch.Tensor | None = None  # [2, L, B, Hkv, d] this step's K/V, then one copy to the arena
    prefill_stage: torch.Tensor | None = None  # [T, 2, L, B, Hkv, d] during a prefill
    q_stage: torch.Tensor | None = None  # [L, B, Hq, d] this step's queries (when recorded)
    prefill_q_stage: torch.Tensor | None = None  # [T, L, B, Hq, d]
    scale: float = 1.0
    prefill_columns: int = 0

    @property
    def size(self) -> int:
        return self.ids.shape[0]


class WorkerEngine:
    """An engine with the store attached, serving batches of greedy-decoded sequences.

    Args:
        model: which engine to load.
        preset: the KVStoreConfig preset the store runs.
        device: "cuda", "cpu" or None (cuda when available).
        max_seqs: sequences this worker serves at once (its capacity).
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
        self.client = KVStoreClient(config).attach(self.model)
        self.store = self.client.store
        self.max_seqs = max_seqs
        self.batches: dict[str, _Batch] = {}
        #: replayed steps (re-prefill after a lost segment) whose own token differed from the recorded one
        self.replay_mismatches = 0
        geo = self.store.geometry
        # Presets whose store state depends on queries are rebuilt by replay, which needs them.
        self.record_queries = not exportable(self.store) if record_queries is None else bool(record_queries)
        logger.info("worker %d ready: %s on %s, preset %s, capacity %d sequences", os.getpid(),
                    self.model_spec.name, self.device, preset, max_seqs)
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
            **self._geometry,
        }

    @property
    def free(self) -> int:
        return self.max_seqs - sum(b.size for b in self.batches.values())

    def stats(self) -> dict:
        return self.client.stats()

    # ---- batches ------------------------------------------------------------------------------
    def start(self, batch_id: str, prompts: list[list[int]], max_new_tokens: int, arena: ArenaSpec | None = None,
              generated: list[list[int]] | None = None) -> list[int]:
        """Prefill a batch and return each row's first generated token.

        With `generated` (a re-prefill after its segment was lost): the prompt is prefilled and
        the generated tokens are fed back one decode step at a time (teacher forcing), so the
        store ends in the state the uninterrupted run had (LeanKV's scores, PQ codebooks, the
        quantized pages) and the batch goes on with the tokens it would have produced; returns
        generated[-1]. A replayed step whose own token differs from the recorded one (a
        nondeterministic kernel) counts in `replay_mismatches` and the recorded token is kept.
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
        max_tokens = P + max_new_tokens
        if arena is not None and (arena.max_tokens < max_tokens or arena.batch != B):
            raise ValueError(f"arena {arena.name} holds [{arena.batch}, {arena.max_tokens}], batch needs [{B}, {max_tokens}]")
        b = self._new_batch(batch_id, B, max_tokens, P, max_new_tokens, arena)
        for row, p in enumerate(prompts):  # building the host-side id table (not the data path)
            b.ids[row, P - len(p):P] = torch.tensor(p, dtype=torch.int64)
            b.mask[row, P - len(p):P] = 1
        T = P
        mask = b.mask[:, :T]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        b.prefill_stage = self._stage(T, B)
        b.prefill_q_stage = self._q_stage(T, B)
        with torch.no_grad():
            out = self.model(input_ids=b.ids[:, :T], attention_mask=mask, position_ids=positions,
                             **{CACHE_ARG: b.cache}, use_cache=True)
        b.ids[:, T] = out.logits[:, -1].argmax(-1)
        b.t, b.generated, b.prefill_columns = T, 1, T
        b.positions = mask.sum(1, keepdim=True)
        self._publish(b, 0, T, b.prefill_stage, b.prefill_q_stage)
        b.prefill_stage = b.prefill_q_stage = None
        if b.arena is not None:
            b.arena.set_layout(P, T, b.scale)
        self.batches[batch_id] = b
        if g:
            recorded = torch.tensor(gen, dtype=torch.int64, device=self.device)  # [B, g]
            self._force(b, recorded[:, 0])
            for i in range(1, g):
                self._decode(b, forced=recorded[:, i])
        elif b.arena is not None:
            b.arena.commit(b.t, b.generated)
        return b.ids[:, b.t].tolist()

    def _force(self, b: _Batch, recorded: torch.Tensor) -> None:
        """Keep the recorded token at column b.t (a replay), counting rows whose own token differs."""
        own = b.ids[:, b.t]
        self.replay_mismatches += int((own != recorded).sum().item())
        b.ids[:, b.t] = recorded
        if b.arena is not None:
            b.arena.ids[:, b.t].copy_(recorded)
            b.arena.commit(b.t, b.generated)

    def resume(self, batch_id: str, arena: ArenaSpec, max_new_tokens: int) -> list[list[int]]:
        """Take over a batch from its cold-tier segment, without prefill.

        Imports the committed K/V into this worker's store and returns each row's generated
        tokens so far (the segment is the truth: a step the dead worker committed counts).
        Raises FileNotFoundError when the segment is gone (its cold tier died).
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
            b = self._new_batch(batch_id, arena.batch, arena.max_tokens, P, max_new_tokens, None)
            b.ids.copy_(seg.ids.to(self.device))
            b.mask[:, :t] = seg.valid[:, :t].to(self.device)
            kv = seg.kv[:t].to(self.device)  # [t, 2, L, B, H, d]
            keys = kv[:, 0].permute(1, 2, 3, 0, 4)
            values = kv[:, 1].permute(1, 2, 3, 0, 4)
            valid = b.mask[:, :t].bool()
            if seg.q is not None:  # rebuild the store's state by replaying its calls
                queries = seg.q[:t].to(self.device).permute(1, 2, 3, 0, 4)
                trace = BatchTrace(keys, values, valid, queries, seg.prefill_columns, seg.scale)
                replay_batch(self.store, trace, cache=b.cache)
            elif self.record_queries:
                raise ValueError(f"arena {arena.name} holds no queries; preset {self.store.config.name!r} needs them to resume")
            else:
                import_batch(self.store, BatchKV(keys, values, valid), cache=b.cache)
            b.prefill_columns, b.scale = seg.prefill_columns, seg.scale
        except BaseException:
            seg.close()
            raise
        b.arena = seg
        seg.pin()
        b.t, b.generated = t, g
        b.positions = b.mask[:, :t].sum(1, keepdim=True)
        self.batches[batch_id] = b
        logger.info("resumed batch %s at column %d (%d tokens generated) without prefill", batch_id, t, g)
        return b.ids[:, P:P + g].tolist()

    def step(self, batch_id: str) -> list[int]:
        """One greedy decode step of a batch; returns each row's new token."""
        b = self.batches[batch_id]
        if b.generated >= b.max_new_tokens:
            raise ValueError(f"batch {batch_id!r} already generated its {b.max_new_tokens} tokens")
        return self._decode(b)

    def _decode(self, b: _Batch, forced: torch.Tensor | None = None) -> list[int] | None:
        """Feed column b.t, write the next token at b.t + 1 (argmax, or `forced` during a replay)."""
        t = b.t
        b.mask[:, t] = 1
        with torch.no_grad():
            out = self.model(input_ids=b.ids[:, t:t + 1], attention_mask=b.mask[:, :t + 1], position_ids=b.positions,
                             **{CACHE_ARG: b.cache}, use_cache=True)
        b.ids[:, t + 1] = out.logits[:, -1].argmax(-1)
        b.positions += 1
        b.t, b.generated = t + 1, b.generated + 1
        self._publish(b, t, 1, b.stage.unsqueeze(0), None if b.q_stage is None else b.q_stage.unsqueeze(0))
        if forced is not None:
            self._force(b, forced)
            return None
        new = b.ids[:, t + 1].tolist()  # the step's one host sync; the publish copies precede it on the stream
        if b.arena is not None:
            b.arena.commit(b.t, b.generated)
        return new

    def take_replay_mismatches(self) -> int:
        """Rows of replayed steps whose own token differed from the recorded one since the last call."""
        n, self.replay_mismatches = self.replay_mismatches, 0
        return n

    def generated(self, batch_id: str) -> list[list[int]]:
        b = self.batches[batch_id]
        return b.ids[:, b.prompt_columns:b.prompt_columns + b.generated].tolist()

    def finish(self, batch_id: str) -> None:
        """End a batch: its sequences leave the store and its segment is unmapped."""
        b = self.batches.pop(batch_id, None)
        if b is None:
            return
        b.cache.release()
        if b.arena is not None:
            b.arena.close()

    # ---- internals ---------------------------------------------------------------------------
    def _stage(self, T: int, B: int) -> torch.Tensor:
        geo = self.store.geometry
        return torch.empty(T, 2, geo.num_layers, B, geo.num_kv_heads, geo.head_dim, dtype=geo.dtype, device=self.device)

    def _q_stage(self, T: int, B: int) -> torch.Tensor | None:
        if not self.record_queries:
            return None
        geo = self.store.geometry
        return torch.empty(T, geo.num_layers, B, geo.num_q_heads, geo.head_dim, dtype=geo.dtype, device=self.device)

    def _new_batch(self, batch_id: str, B: int, max_tokens: int, P: int, max_new_tokens: int,
                   arena: ArenaSpec | None) -> _Batch:
        holder: dict[str, _Batch] = {}

        def on_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
            b = holder["b"]
            b.scale = float(scale)
            if b.prefill_stage is None:  # decode: [B, H, 1, d]
                b.stage[0, layer] = k[:, :, 0]
                b.stage[1, layer] = v[:, :, 0]
                if b.q_stage is not None:
                    b.q_stage[layer] = q[:, :, 0]
            else:  # prefill: [B, H, T, d] -> [T, B, H, d]
                b.prefill_stage[:, 0, layer] = k.permute(2, 0, 1, 3)
                b.prefill_stage[:, 1, layer] = v.permute(2, 0, 1, 3)
                if b.prefill_q_stage is not None:
                    b.prefill_q_stage[:, layer] = q.permute(2, 0, 1, 3)

        b = _Batch(
            batch_id=batch_id,
            cache=TapCache(self.store, on_attend),
            ids=torch.zeros(B, max_tokens + 1, dtype=torch.int64, device=self.device),
            mask=torch.zeros(B, max_tokens, dtype=torch.int64, device=self.device),
            positions=torch.zeros(B, 1, dtype=torch.int64, device=self.device),
            prompt_columns=P,
            max_new_tokens=max_new_tokens,
            stage=self._stage(1, B)[0],
        )
        q_stage = self._q_stage(1, B)
        b.q_stage = None if q_stage is None else q_stage[0]
        holder["b"] = b
        if arena is not None:
            if (arena.num_q_heads > 0) != self.record_queries:
                raise ValueError(f"arena {arena.name} has num_q_heads={arena.num_q_heads}; this worker "
                                 f"{'records' if self.record_queries else 'does not record'} queries")
            b.arena = BatchArena.attach(arena)
            b.arena.pin()
        return b

    def _publish(self, b: _Batch, t: int, n: int, stage: torch.Tensor, q_stage: torch.Tensor | None) -> None:
        """Copy columns t .. t+n-1 (K/V, queries, validity, next ids) into the batch's segment, if any."""
        if b.arena is None:
            return
        seg = b.arena
        nb = self.device.type == "cuda"
        seg.kv[t:t + n].copy_(stage, non_blocking=nb)
        if seg.q is not None:
            seg.q[t:t + n].copy_(q_stage, non_blocking=nb)
        seg.valid[:, t:t + n].copy_(b.mask[:, t:t + n], non_blocking=nb)
        seg.ids[:, t:t + n + 1].copy_(b.ids[:, t:t + n + 1], non_blocking=nb)
