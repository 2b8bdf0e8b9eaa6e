"""Engine: a generation loop over a Hugging Face model and a KVStore, with continuous batching.

    engine = Engine(model, KVStoreConfig.preset("quant"), tokenizer=tok)
    outs = engine.generate(["The capital of France is", ids], max_new_tokens=32)
    for out in engine.stream(prompts, SamplingParams(temperature=0.7, top_p=0.9, seed=1)):
        print(out.request_id, out.token_id)          # tokens as they come
    engine.close()                                  # or `with Engine(...) as engine:`

Requests (token ids, or text with the tokenizer) wait in a queue. Each `step()`:

1. admits waiting requests while fewer than `max_batch` run: a request's prompt goes through the
   model alone (one sequence, no padding; in chunks of `prefill_chunk_tokens` for the presets
   that chunk, `KVStoreConfig.chunked_prefill`), and its first token is sampled from the last
   position's logits (`logits_to_keep=1`: no [T, vocab] logits);
2. runs one decode step over every running request at once: one forward of [B, 1] tokens, each
   at its own position, attending its own sequence in the store (`KVStore.plan` once, then each
   layer's `KVStore.decode`);
3. samples the next tokens on the device (`kvstore.sampling`: seeded per request and
   batch-invariant), streams them out, and finishes requests at EOS, a stop token, a stop string
   or `max_new_tokens`: a finished request's pages go back to the pool at once, and the others
   keep decoding.

A server cancels a request with `abort(request_id)`, and may step a subset of the running
requests (`decode_step(request_ids)`: the cluster worker steps its batches in turn). With a
`recorder` the engine hands over what its store receives, and `restore` rebuilds such requests
in another engine's store without running the model (cluster/worker.py: a dead worker's batch
resumes from its cold-tier segment); `forced_tokens` replays a recorded generation through the
model instead.

A request gets the tokens it gets alone, whatever joins or leaves the batch around it (greedy:
exactly, up to the model's own batch-size-dependent rounding; sampled: the noise is a function
of its seed, step and token).

On CUDA the decode step is captured in a CUDA graph and replayed, up to `max_batch` graphs kept
(one per batch size and widths seen), so a step seen before replays (kvstore/cuda_graph.py: which
stores qualify, what a replay reads; `warmup` captures every batch size ahead of traffic);
elsewhere, or where the store cannot be captured, it runs eagerly (every op launched from
Python). The engine logs which path runs (`decode_path`). With `overlap` (on CUDA, for the presets
whose steps can be taken back) step t+1 is planned and launched before the host reads step t's
tokens (the device feeds them to it), so the host's work between steps runs while the device
computes; a step launched for a batch that then changes is taken back (`KVStore.cancel`).
`KVStoreClient.attach(model)` + `model.generate()` stays the compatible path.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from kvstore.client import KVStoreClient
from kvstore.config import KVStoreConfig
from kvstore.hot.page_pool import OutOfPagesError
from kvstore.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One new token of one request (what `step()` and `stream()` yield)."""

    request_id: int
    token_id: int
    logprob: float | None = None
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "length" once finished


@dataclass
class Completion:
    """A finished request (what `generate()` returns, in the order of its prompts)."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    logprobs: list[float] | None = None


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    seq_id: int | None = None
    finish_reason: str | None = None
    text: str | None = None
    forced: list[int] = field(default_factory=list)  # teacher forcing: its first tokens, given

    @property
    def length(self) -> int:
        """Tokens the store holds for this request once its last token is written."""
        return len(self.prompt) + len(self.tokens)


@dataclass
class _Launched:
    """A step's tokens sampled on the device, not yet read by the host (`Engine._accept` reads them).

    reqs: its rows' requests. plan and inputs (sequence slots, token ids, positions on the device):
    a decode step's, None for a prefill's first token. host/event: where the tokens are copied to
    pinned host memory and the event after that copy (CUDA; the host waits for that step only)."""

    reqs: list[_Request]
    tok: torch.Tensor
    logp: torch.Tensor | None
    plan: Any = None
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    host: tuple[torch.Tensor, torch.Tensor | None] | None = None
    event: Any = None

    @property
    def rids(self) -> list[int]:
        return [r.rid for r in self.reqs]


def _cache_classes():
    """The KVStoreCache subclasses of a decode step and of a recorded prefill (built on first use:
    importing this module imports no transformers)."""
    from kvstore.adapters.hf import KVStoreCache

    class DecodeCache(KVStoreCache):
        """The cache of one decode step over the engine's running sequences (any set, any order):
        layer 0 plans the step, every layer decodes. The engine owns the sequences: this cache
        releases nothing."""

        def __init__(self, store, seq_ids: torch.Tensor, plan=None, record=None):
            super().__init__(store)
            self.seq_ids = seq_ids
            self.decoding = True
            self.given_plan = plan  # a plan made before the forward (the CUDA-graph path)
            self.record = record  # (k, v [L, B, Hkv, d], q [L, B, Hq, d]): each layer's inputs copied in

        def attend(self, layer_idx: int, q, k, v, padding_mask, scale: float) -> torch.Tensor:
            if self.record is not None:  # copies into fixed buffers: a captured step records too
                rk, rv, rq = self.record
                rk[layer_idx].copy_(k[:, :, 0])
                rv[layer_idx].copy_(v[:, :, 0])
                rq[layer_idx].copy_(q[:, :, 0])
            return super().attend(layer_idx, q, k, v, padding_mask, scale)

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            if layer_idx == 0:
                if key_states.shape[0] != self.seq_ids.numel() or key_states.shape[-2] != 1:
                    raise ValueError(f"a decode step takes [{self.seq_ids.numel()}, 1] tokens, got "
                                     f"{list(key_states.shape[::2])}")
                self.plan = self.given_plan if self.given_plan is not None else self.store.plan(self.seq_ids)
            return key_states, value_states

    class PrefillCache(KVStoreCache):
        """A prompt's cache whose every layer's attention inputs also go to `on_inputs`."""

        def __init__(self, store, prompt_lengths, prompt_width, on_inputs):
            super().__init__(store, prompt_lengths, prompt_width)
            self.on_inputs = on_inputs
            self.start = 0  # the chunk's first position

        def attend(self, layer_idx: int, q, k, v, padding_mask, scale: float) -> torch.Tensor:
            self.on_inputs(layer_idx, self.start, q, k, v, scale)
            return super().attend(layer_idx, q, k, v, padding_mask, scale)

    return DecodeCache, PrefillCache


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (kvstore's parent)
_PACKAGES = tuple(os.path.join(_ROOT, p) + os.sep for p in ("kvstore", "gpu_kernels"))


def _innermost_frame(exc: BaseException) -> str:
    """'file:line function' of the innermost frame of kvstore or gpu_kernels in exc's traceback (the
    line that broke a capture: the model's own frames and torch's are skipped)."""
    found = "?"
    for f in traceback.extract_tb(exc.__traceback__):
        if f.filename.startswith(_PACKAGES):
            found = f"{os.path.relpath(f.filename, _ROOT)}:{f.lineno} {f.name}"
    return found


def _engine_dropped(client: KVStoreClient) -> None:
    """An Engine garbage-collected without close(): the model detached, every page freed."""
    client.detach()


class Engine:
    """Generation over `model` with a KVStore: continuous batching, device sampling, streaming.

    Args:
        model: a Hugging Face causal LM of a family kvstore serves (attached for the engine's
            life; `close()` detaches it and frees every page).
        config: a KVStoreConfig, or a preset name ("full", "quant", "tiered", ...). Default "full".
        tokenizer: a Hugging Face tokenizer, for text prompts, text outputs and stop strings.
        max_batch: most requests decoding at once; more wait in the queue.
        seed: the engine's seed; requests without their own seed get one derived from it.
        cuda_graphs: capture the decode step in CUDA graphs and replay them
            (kvstore/cuda_graph.py). None (default): where the store supports it; True: required
            (ValueError saying why not, if not); False: every step eager.
        recorder: an object that keeps what the store receives, so that requests can be rebuilt
            elsewhere without the model (`restore`; the cluster worker mirrors it to host memory):
            `recorder.prefill(request_id, layer, start, q, k, v, scale)` gets every layer's
            attention inputs of a prompt as its prefill runs (post-RoPE, [1, H, T, d], positions
            start .. start + T - 1), and `recorder.step(request_ids, k, v, q)` each decode step's
            after the step (k, v [L, B, Hkv, d], q [L, B, Hq, d]; buffers the next step rewrites,
            written inside a captured step too). None: nothing is recorded.
        overlap: plan and launch decode step t+1 before the host reads step t's tokens, so the
            plan's host work runs while the device computes (`decode_step`). None (default): on
            CUDA. Takes effect where a step can be taken back (`KVStore.cancellable`: full, quant).
    """

    def __init__(self, model: Any, config: KVStoreConfig | str | None = None, *, tokenizer: Any = None,
                 max_batch: int = 32, seed: int = 0, cuda_graphs: bool | None = None, recorder: Any = None,
                 overlap: bool | None = None):
        if config is None:
            config = KVStoreConfig.preset("full")
        elif isinstance(config, str):
            config = KVStoreConfig.preset(config)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.client = KVStoreClient(config)
        self.client.attach(model)  # checks the model; refuses one attached elsewhere
        self.model = model
        self.store = self.client.store
        self.config = self.client.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.seed = int(seed)
        self.device = self.store.geometry.device
        from kvstore.adapters.hf import CACHE_ARG, KVStoreCache

        self._cache_arg = CACHE_ARG
        self._prefill_cache = KVStoreCache
        self._decode_cache, self._tap_prefill_cache = _cache_classes()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._next_id = 0
        self.closed = False
        self.recorder = recorder
        # an engine dropped without close() detaches from the model (freeing every page) when collected
        self._finalizer = weakref.finalize(self, _engine_dropped, self.client)
        self._records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per batch size
        #: forced tokens (`add_request(forced_tokens=...)`) that differed from the token the step sampled
        self.forced_mismatches = 0
        from kvstore.cuda_graph import DecodeGraphs, graph_support

        why_not = graph_support(self.store) if cuda_graphs is not False else "cuda_graphs=False"
        if cuda_graphs and why_not:
            self.client.detach()
            raise ValueError(f"cuda_graphs=True: {why_not}")
        self.graphs = DecodeGraphs(self.store, max_graphs=max_batch) if why_not is None else None
        self._static: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        #: the least width of a step's attention (pages) and selection (tokens), set by `warmup`
        self._floor_pages = self._floor_select = 0
        self._plan = None  # the last step's plan
        #: plan and launch step t+1 before reading step t's tokens (default: on CUDA). Only where the plan
        #: reads nothing back (`KVStore.plans_ahead`: full, quant, pqcache); where a step can be taken back
        #: (`KVStore.cancellable`: full, quant) a step launched for a batch that then changed is; elsewhere
        #: it rides: it runs for the rows that ended (their tokens dropped) and lands for the others
        self.overlap = (self.device.type == "cuda") if overlap is None else bool(overlap)
        self._ahead: _Launched | None = None  # the step launched ahead, its tokens not read yet
        #: requests that ended while the step ahead (which cannot be taken back) ran for them: released
        #: once it lands; and the tokens of a step ahead landed between decode steps (by an admission,
        #: an abort, a restore), returned by the next `decode_step`
        self._riders: list[_Request] = []
        self._landed: list[StepOutput] = []
        #: steps launched ahead that ran for requests which had ended (their rows' work dropped)
        self.ridden_steps = 0
        #: steps launched ahead and then taken back (their batch changed: a request finished or joined)
        self.cancelled_steps = 0
        self.decode_path = "cuda-graph" if self.graphs is not None else "eager"
        say = logger.info if self.device.type == "cuda" else logger.debug  # on a CPU there is no choice to report
        say("engine: %s preset, max batch %d, decode step: %s", self.config.name, max_batch,
            "CUDA graph" if self.graphs is not None else f"eager ({why_not})")

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int] | torch.Tensor, params: SamplingParams | None = None, *,
                    forced_tokens: Sequence[int] | None = None) -> int:
        """Queue one request; returns its id. prompt: text (needs the tokenizer) or token ids.

        forced_tokens: teacher forcing (replaying a recorded generation): the request's first
        tokens are these rather than the ones sampled, each fed back as a decode step, so the
        store ends as the recorded run left it; a sampled token that differs counts in
        `forced_mismatches`. At most max_new_tokens of them."""
        self._check_open()
        params = params or SamplingParams()
        forced = self._encode(forced_tokens) if forced_tokens is not None and len(forced_tokens) else []
        if len(forced) > params.max_new_tokens:
            raise ValueError(f"{len(forced)} forced tokens exceed max_new_tokens={params.max_new_tokens}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(..., tokenizer=...)")
        ids = self._encode(prompt)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                             f"model's max_position_embeddings={limit}")
        rid = self._next_id
        self._next_id += 1
        seed = params.seed if params.seed is not None else (self.seed * 1_000_003 + rid) & 0x7FFFFFFF
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        self.waiting.append(_Request(rid, ids, params, seed, stop_ids, forced=forced))
        return rid

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: Engine(..., tokenizer=...), or pass token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"a tensor prompt is int token ids of shape [T] or [1, T], got {prompt.dtype} "
                                 f"{list(prompt.shape)}")
            ids = prompt.tolist()
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the model's vocabulary [0, {vocab})")
        return list(ids)

    def abort(self, request_id: int) -> bool:
        """Drop an unfinished request (its client went away): a waiting one leaves the queue, a
        running one's pages go back to the pool at once. False if it is not waiting or running."""
        self._check_open()
        self._settle()
        self._landed = [o for o in self._landed if o.request_id != request_id]  # its client is gone
        for r in self.waiting:
            if r.rid == request_id:
                self.waiting.remove(r)
                r.finish_reason = "abort"
                return True
        for r in self.running:
            if r.rid == request_id:
                self._release(r)
                r.finish_reason = "abort"
                self.running.remove(r)
                return True
        return False

    @torch.no_grad()
    def restore(self, prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]], params: SamplingParams,
                keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None,
                scale: float | None = None) -> list[int]:
        """Requests that ran elsewhere (an engine with a `recorder`), rebuilt in this engine's store
        from their recorded attention inputs without running the model, and running here again;
        returns their new ids. Their next decode step feeds their last token.

        The rows decoded together (one step each, as `decode_step(request_ids)` runs a batch):
        prompts[b] and tokens[b] (generated so far, the same count g >= 1 for every row) are row
        b's; keys, values [L, B, Hkv, T, d] and queries [L, B, Hq, T, d] its inputs in the padded
        timeline layout of kvstore/adapters/transfer.py, T = P + g - 1: row b's prompt in columns
        P - len(prompts[b]) .. P - 1, then one column per decode step. The store receives the
        calls this engine makes for such requests (each prompt alone, in the same chunks, then
        the steps with the same plans), so it ends in the state the recorded run left (bit for
        bit where the store is deterministic, whatever the preset). queries=None: zeros, exact
        only where the store's state does not depend on them (kvstore.adapters.transfer.exportable).
        Sampling after this uses `params` (a seeded request continues its noise only with its seed).
        """
        from kvstore.adapters.transfer import exportable

        self._check_open()
        self._settle()
        B, g = len(prompts), len(tokens[0]) if tokens else 0
        geo = self.store.geometry
        if keys.dim() != 5:
            raise ValueError(f"restore: keys/values must be [L, B, Hkv, T, d], got {list(keys.shape)}")
        L, _, H, T, d = keys.shape
        P = T - (g - 1)
        if B == 0 or len(tokens) != B or g < 1 or any(len(t) != g for t in tokens):
            raise ValueError("restore needs one prompt and one token list per row, each with the same count g >= 1")
        if len(self.running) + B > self.max_batch:
            raise ValueError(f"restore: {B} requests exceed the free batch slots "
                             f"({self.max_batch - len(self.running)} of max_batch={self.max_batch})")
        if (L, H, d) != (geo.num_layers, geo.num_kv_heads, geo.head_dim) or keys.shape != values.shape \
                or keys.shape[1] != B or any(len(p) > P for p in prompts):
            raise ValueError(f"restore: keys/values {list(keys.shape)} are not [L={geo.num_layers}, B={B}, "
                             f"Hkv={geo.num_kv_heads}, T >= prompt + {g - 1}, d={geo.head_dim}]")
        if queries is None and not exportable(self.store):
            raise ValueError(f"restore: preset {self.config.name!r} keeps state that depends on the queries; pass them")
        if queries is not None and tuple(queries.shape) != (L, B, geo.num_q_heads, T, d):
            raise ValueError(f"restore: queries {list(queries.shape)} are not [L, B, Hq, T, d] = "
                             f"{[L, B, geo.num_q_heads, T, d]}")
        dev = dict(device=self.device, dtype=geo.dtype)
        k, v = keys.to(**dev), values.to(**dev)
        q = queries.to(**dev) if queries is not None else torch.zeros(L, B, geo.num_q_heads, T, d, **dev)
        scale = d ** -0.5 if scale is None else float(scale)
        reqs = []
        for b in range(B):
            self.add_request(prompts[b], params)  # validates it; it runs from here, not from the queue
            req = self.waiting.pop()
            req.tokens = [int(t) for t in tokens[b]]
            reqs.append(req)
        try:
            for b, req in enumerate(reqs):  # each prompt alone, in the chunks `_prefill` takes
                n = len(req.prompt)
                size = self._prepare_prefill(req)
                seq = self.store.add_sequences(1, torch.tensor([n]))
                req.seq_id = int(seq[0])
                for start in range(0, n, size):
                    c = slice(P - n + start, P - n + min(n, start + size))
                    valid = torch.ones(1, c.stop - c.start, dtype=torch.bool, device=self.device)
                    for layer in range(L):
                        self.store.prefill(layer, seq, q[layer, b:b + 1, :, c], k[layer, b:b + 1, :, c],
                                           v[layer, b:b + 1, :, c], valid, scale)
            seq_ids = torch.tensor([r.seq_id for r in reqs], dtype=torch.int64, device=self.device)
            for t in range(P, T):  # the decode steps, with the plans `_decode` makes for these requests
                plan = self._make_plan(reqs, seq_ids)
                c = slice(t, t + 1)
                for layer in range(L):
                    self.store.decode(layer, plan, q[layer, :, :, c], k[layer, :, :, c], v[layer, :, :, c], scale)
        except BaseException:
            for r in reqs:
                self._release(r)
            raise
        for r in reqs:
            self._check_finished(r)
        self.running += [r for r in reqs if r.finish_reason is None]
        for r in reqs:
            if r.finish_reason is not None:
                self._release(r)
        return [r.rid for r in reqs]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._landed)  # (landed: tokens not yet returned)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit what fits (`admit`), then one decode step of every running request (`decode_step`);
        the new tokens."""
        return self.admit() + self.decode_step()

    @torch.no_grad()
    def admit(self) -> list[StepOutput]:
        """Prefill waiting requests while fewer than `max_batch` run; their first tokens.

        The hot tier's pool is grown once for all of them, not once per request (a growth copies the
        pool: for a moment it is there twice). Where the hot tier keeps every token the need is known
        now (`KVStore.reserve` with each one's prompt and new tokens). Where the policy keeps a subset
        (LeanKV, a window) it is known after the first prompt: the pages that one keeps, per prompt
        token, size the room for the others (`_reserve_like`), so the pool grows once while it holds
        one sequence, not once per sequence with the batch's pages copied each time (at 128K on an
        80 GB card the last of those copies was what refused a ninth tiered sequence). A request that finds the hot tier full
        (a capped `hot_tier_bytes`) waits for running ones to finish; with none running, the
        OutOfPagesError propagates (it can never fit) and the request is dropped.
        """
        self._check_open()
        outputs: list[StepOutput] = []
        take = list(self.waiting)[: max(0, self.max_batch - len(self.running))]
        if take:
            self._settle()  # a step launched ahead is for the batch without them (cancelled before the prefill)
            if self.config.hot_policy == "all":  # every token stays: the whole need is known now
                self.store.reserve(len(take), [len(r.prompt) for r in take], [r.params.max_new_tokens for r in take],
                                   chunked=True)
        used = self.store.hot.pool.num_used
        for i, req in enumerate(take):
            try:
                logits = self._prefill(req)
            except OutOfPagesError:
                if not self.running:
                    self.waiting.popleft()
                    raise
                logger.info("engine: request %d waits (hot tier full with %d running)", req.rid, len(self.running))
                break
            self.waiting.popleft()
            self.running.append(req)
            outputs += self._take(logits, [req])
            if i == 0 and len(take) > 1 and self.config.hot_policy != "all":
                self._reserve_like(req, self.store.hot.pool.num_used - used, take[1:])
        self.running = [r for r in self.running if r.finish_reason is None]  # done at their first token
        return outputs

    def _reserve_like(self, first: _Request, kept: int, rest: list[_Request]) -> None:
        """After the first prompt of an admission, where the policy keeps a subset: room in the pool for
        the rest in one growth, each keeping the pages `first` kept per prompt token (`kept` pages), plus
        its decode tokens' pages, plus one whole prompt held at a time where prefill is chunked."""
        geo, tpp = self.store.geometry, self.store.hot.tokens_per_page
        heads = geo.num_layers * geo.num_kv_heads
        per_token = kept / max(1, len(first.prompt))
        need = sum(math.ceil(per_token * len(r.prompt)) + heads * -(-r.params.max_new_tokens // tpp) for r in rest)
        chunk = self.config.prefill_chunk_tokens
        whole = [heads * -(-len(r.prompt) // tpp) for r in rest if self.config.chunked_prefill and len(r.prompt) > chunk]
        try:
            self.store.hot.pool.reserve(need + max(whole, default=0))
        except OutOfPagesError:  # an estimate: the prefills grow the pool (or wait) one by one, as without it
            logger.debug("engine: no room for the admission's estimate of %d pages; growing per request", need)

    @torch.no_grad()
    def decode_step(self, request_ids: Iterable[int] | None = None) -> list[StepOutput]:
        """One decode step of every running request (one forward of [B, 1]), or of the running
        requests `request_ids` in that order (the others wait a step); their next tokens.

        With `overlap` (on CUDA), step t+1 of the same batch is planned and launched before the host
        reads step t's tokens (the device samples them and feeds them to t+1 itself), so the plan's
        host work runs while the device computes, and this call returns step t's tokens. Where a
        request then finishes (or joins, or a subset is stepped), the step launched ahead is taken
        back (`KVStore.cancel`) and planned again for the new batch: the tokens are the same either
        way. A store whose steps cannot be taken back but whose plan reads nothing back
        (`KVStore.plans_ahead`: pqcache) lets it ride instead: the rows of requests that ended are
        computed and dropped (one step of work each), the others' tokens are its, returned by the
        next call (which then returns every row it ran, a subset asked for or not), and a step ahead
        landed by an admission, an abort or a restore comes back with the next call's tokens. Without
        a recorder or forced tokens; not while a waiting request is about to be admitted."""
        self._check_open()
        if request_ids is None:
            batch = self.running
        else:
            by_id = {r.rid: r for r in self.running}
            ids = list(request_ids)
            missing = [i for i in ids if i not in by_id]
            if missing or len(set(ids)) != len(ids):
                raise ValueError(f"decode_step: request {missing[0] if missing else ids} is not running once")
            batch = [by_id[i] for i in ids]
        step = self._ahead
        if step is not None and (request_ids is not None or step.rids != [r.rid for r in batch]):
            self._settle()  # launched for another batch: taken back, planned again below
            step = None
            if not self.store.cancellable:  # it landed instead (it ran for these rows and ended ones): its tokens
                outputs, self._landed = self._landed, []
                return outputs
        landed, self._landed = self._landed, []
        self._ahead = None
        if not batch:
            return landed
        if step is None:
            step = self._launch(batch)
        ahead = None
        if request_ids is None and self._can_overlap(batch):
            planned = self._plan
            try:
                ahead = self._launch(batch, after=step)
            except Exception as exc:  # noqa: BLE001 - an optimization: this step's tokens still come, plainly
                if self._plan is not planned and not self.store.cancellable:
                    raise  # it planned and cannot be taken back: the store is a step ahead of the requests
                logger.warning("engine: launching a step ahead failed (%s: %s); stepping plainly from here",
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.overlap = False
        self._ahead = ahead  # held before the tokens are read: whatever happens there, it is taken back later
        with torch.profiler.record_function("kvstore.sample"):  # waits for the step's tokens
            outputs = landed + self._accept(step, release=ahead is None)
        ended = [r for r in batch if r.finish_reason is not None]
        if ahead is not None and ended:  # its batch just changed
            if self.store.cancellable:
                self._settle()
                for r in ended:
                    self._release(r)
            else:  # the step ahead runs for them too: they are released once it lands
                self._riders += ended
                self.ridden_steps += 1
                if len(ended) == len(batch):  # it runs for nobody: land it now
                    self._settle()
        self.running = [r for r in self.running if r.finish_reason is None]
        return outputs

    def _can_overlap(self, batch: list[_Request]) -> bool:
        """Whether the step after this one may be launched before this one's tokens are read: the
        same rows will run it (none ends by length at this step, no admission is due), and its plan
        reads nothing back from the device (a wrong guess is taken back, or rides: `decode_step`)."""
        if not self.overlap or self.recorder is not None or not self.store.plans_ahead:
            return False
        if self.waiting and len(self.running) < self.max_batch:
            return False
        return all(not r.forced and len(r.tokens) + 1 < r.params.max_new_tokens for r in batch)

    def _settle(self) -> None:
        """Take back the step launched ahead, if any (`KVStore.cancel`): before the store is changed
        otherwise (a prefill, an abort, a restore, a close) or when its batch changed. A step that
        cannot be taken back lands instead: its tokens are recorded (the next `decode_step` returns
        them) and the requests that rode it are released."""
        step, self._ahead = self._ahead, None
        if step is None:
            return
        if self.store.cancellable:
            self.store.cancel(step.plan)
            self.cancelled_steps += 1
            return
        self._landed += self._accept(step)
        self._release_riders()
        self.running = [r for r in self.running if r.finish_reason is None]

    def _release_riders(self) -> None:
        """Free the requests that ended while a step ahead ran for them (it has landed)."""
        riders, self._riders = self._riders, []
        for r in riders:
            self._release(r)

    def _prefill(self, req: _Request) -> torch.Tensor:
        """The request's prompt into the store (its own sequence); logits [1, V] of its last token."""
        T = len(req.prompt)
        ids = torch.tensor([req.prompt], dtype=torch.int64, device=self.device)
        size = self._prepare_prefill(req)
        if self.recorder is None or req.rid < 0:
            cache = self._prefill_cache(self.store, torch.tensor([T]), T)
        else:
            cache = self._tap_prefill_cache(self.store, torch.tensor([T]), T,
                                            lambda *inputs: self.recorder.prefill(req.rid, *inputs))
        try:
            for start in range(0, T, size):
                end = min(T, start + size)
                cache.start = start
                pos = torch.arange(start, end, device=self.device).view(1, -1)
                out = self.model(input_ids=ids[:, start:end], position_ids=pos, use_cache=True, logits_to_keep=1,
                                 **{self._cache_arg: cache})
        except BaseException:
            cache.release()
            raise
        cache._finalizer.detach()  # the engine owns the sequence from here: released when it finishes
        req.seq_id = int(cache.seq_ids[0])
        return out.logits[:, -1]

    def _prepare_prefill(self, req: _Request) -> int:
        """Before a request's prompt goes into the store (`_prefill`, `restore`): the pool and page
        tables sized for it; returns the prefill's chunk size (even chunks where the preset chunks,
        LeanKV scoring with the last one; the whole prompt otherwise)."""
        T, chunk = len(req.prompt), self.config.prefill_chunk_tokens
        chunked = self.config.chunked_prefill and T > chunk
        self.store.reserve(1, T, req.params.max_new_tokens, chunked=chunked)
        # the page tables as wide as this request will need (+1: a step's plan looks one page ahead),
        # once: not doubled mid-generation (a CUDA graph reads them at a fixed address)
        self.store.hot.table.ensure_pages(self._pages_needed(req) + 1)
        return -(-T // -(-T // chunk)) if chunked else T

    def _pages_needed(self, req: _Request) -> int:
        """Page-table entries a head of this request reaches by its last token."""
        return -(-(len(req.prompt) + req.params.max_new_tokens) // self.store.hot.tokens_per_page)

    def _pages_hint(self, batch: list[_Request]) -> int | None:
        """The width the step's attention is sized for (`KVStore.plan`): where the hot tier keeps every
        token, the widest table the batch reaches, so the launch stays the same until it ends. Where
        it drops tokens (a window, LeanKV) that width is the dense one, many times what a head holds:
        the kernel's splits past a head's pages would idle (at 128K, tiered keeps about a tenth), so
        the plan sizes them for the pages in use, rounded up in 1/8 steps (kvstore/hot/tier.py).
        Never below the width `warmup` set."""
        if self.store.config.hot_policy != "all":
            return self._floor_pages or None
        return max(self._floor_pages, *(self._pages_needed(r) for r in batch))

    def _make_plan(self, batch: list[_Request], seq_ids: torch.Tensor, positions: list[int] | None = None):
        with torch.profiler.record_function("kvstore.plan"):  # a range that profiles (profile_step) attribute by
            self._plan = self.store.plan(seq_ids, pages_hint=self._pages_hint(batch),
                                         select_hint=self._floor_select or None, host_positions=positions,
                                         host_seq_ids=None if positions is None else [r.seq_id for r in batch])
        return self._plan

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device without waiting for the device's queue (pinned, async)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _launch(self, batch: list[_Request], after: _Launched | None = None) -> _Launched:
        """Plan, run and sample one decode step of `batch`; the host reads its tokens later (`_accept`).
        after: the step launched just before, same rows, whose tokens (still on the device) this step
        feeds: a step launched ahead of the host reading them (`decode_step`)."""
        ahead = 0 if after is None else 1
        positions = [r.length - 1 + ahead for r in batch]  # the store's length of each sequence before the step
        if after is None:
            rows = torch.tensor([[r.seq_id, r.tokens[-1], p] for r, p in zip(batch, positions)], dtype=torch.int64)
            staged = self._to_device(rows)
        else:
            seq_ids, _, pos = after.inputs
            staged = torch.stack([seq_ids, after.tok, pos + 1], 1)
        before = self._plan  # the step before's plan: not this one's to take back
        try:
            logits, inputs = self._decode(batch, staged, positions)
            tok, logp = self._sample(logits, batch, ahead)
        except BaseException:
            if after is not None and self._plan is not before and self.store.cancellable:
                self.store.cancel(self._plan)  # planned, then failed: it leaves nothing behind
            raise
        return self._launched(batch, tok, logp, plan=self._plan, inputs=inputs)

    def _decode(self, batch: list[_Request], staged: torch.Tensor, positions: list[int]):
        """One step of every request in `batch` from its rows [B, 3] on the device (sequence slot,
        token id, position): logits [B, V] of their next tokens, and the step's inputs."""
        record = self._record_buffers(len(batch)) if self.recorder is not None else None
        if self.graphs is not None:
            logits, inputs = self._decode_graph(batch, staged, positions, record)
        else:
            logits, inputs = self._decode_eager(batch, staged, positions, record)
        if record is not None and batch[0].rid >= 0:  # (warmup's dummies have negative ids: not recorded)
            self.recorder.step([r.rid for r in batch], *record)
        return logits, inputs

    def _record_buffers(self, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where a step of B rows copies its attention inputs (fixed per B: a captured step writes them)."""
        if B not in self._records:
            geo = self.store.geometry
            kv = (geo.num_layers, B, geo.num_kv_heads, geo.head_dim)
            self._records[B] = (torch.zeros(kv, dtype=geo.dtype, device=self.device),
                                torch.zeros(kv, dtype=geo.dtype, device=self.device),
                                torch.zeros(geo.num_layers, B, geo.num_q_heads, geo.head_dim, dtype=geo.dtype,
                                            device=self.device))
        return self._records[B]

    def _decode_eager(self, batch: list[_Request], staged: torch.Tensor, positions: list[int], record):
        seq_ids, tokens, pos = staged.unbind(1)
        seq_ids = seq_ids.contiguous()
        # the same plan as the graph path (buffers sized for the widest table the batch reaches):
        # the same kernel launch, so eager and graph steps give the same bits
        plan = self._make_plan(batch, seq_ids, positions)
        cache = self._decode_cache(self.store, seq_ids, plan, record)
        out = self.model(input_ids=tokens.view(-1, 1), position_ids=pos.view(-1, 1), use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1], (seq_ids, tokens, pos)

    def _decode_graph(self, batch: list[_Request], staged: torch.Tensor, positions: list[int], record):
        """The step through the batch size's CUDA graph: static inputs filled, the plan made on
        the host (sized for the widest table the running requests reach), then one replay."""
        B = len(batch)
        if B not in self._static:
            self._static[B] = tuple(torch.zeros(B, dtype=torch.int64, device=self.device) for _ in range(3))
        seq_ids, tokens, pos = self._static[B]
        seq_ids.copy_(staged[:, 0])
        tokens.copy_(staged[:, 1])
        pos.copy_(staged[:, 2])
        plan = self._make_plan(batch, seq_ids, positions)
        cache = self._decode_cache(self.store, seq_ids, plan, record)

        def forward(p):
            out = self.model(input_ids=tokens.view(-1, 1), position_ids=pos.view(-1, 1), use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: cache})
            return out.logits[:, -1]

        try:
            return self.graphs.run(plan, (seq_ids, tokens, pos), forward), (seq_ids, tokens, pos)
        except Exception as exc:  # noqa: BLE001 - capture is an optimization: fall back, say so once
            logger.warning("engine: CUDA graph capture failed at %s (%s: %s); decoding eagerly from here",
                           _innermost_frame(exc), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            logger.debug("engine: the capture's traceback", exc_info=exc)
            self.graphs, self.decode_path = None, "eager"
            torch.cuda.synchronize(self.device)
            return forward(plan), (seq_ids, tokens, pos)  # the same plan again: a layer rewrites its token, then attends

    def _sample(self, logits: torch.Tensor, reqs: list[_Request], ahead: int = 0):
        """The next token of each request on the device (row i of logits is reqs[i]): nothing read back.
        ahead: 1 for a step launched before the host has the step before's tokens (one more each)."""
        ps = [r.params for r in reqs]
        V = logits.shape[-1]
        hot = [i for i, p in enumerate(ps) if p.temperature > 0]  # the sampled rows, known here
        filtered = any(0 < ps[i].top_k < V or ps[i].top_p < 1 for i in hot)
        # one host-to-device copy per dtype, not one per field
        floats = self._to_device(torch.tensor([[p.temperature, p.top_p] for p in ps], dtype=torch.float32))
        ints = self._to_device(torch.tensor([p.top_k for p in ps] + [r.seed for r in reqs]
                                            + [len(r.tokens) + ahead for r in reqs] + hot, dtype=torch.int64))
        B = len(reqs)
        top_k, seeds, steps, rows = ints[:B], ints[B:2 * B], ints[2 * B:3 * B], ints[3 * B:]
        temp, top_p = floats.unbind(1)
        want = any(p.logprobs for p in ps)
        return sample(logits, temp, top_k, top_p, seeds, steps, want_logprobs=want, rows=rows, filtered=filtered)

    def _launched(self, reqs: list[_Request], tok: torch.Tensor, logp: torch.Tensor | None, **kw) -> _Launched:
        """The record of sampled tokens; on CUDA their copy to pinned host memory is started, and an
        event marks its end (the host then waits for this step, not for what was queued after it)."""
        step = _Launched(reqs, tok, logp, **kw)
        if self.device.type == "cuda":
            host_tok = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
            host_tok.copy_(tok, non_blocking=True)
            host_logp = None
            if logp is not None:
                host_logp = torch.empty(logp.shape, dtype=logp.dtype, pin_memory=True)
                host_logp.copy_(logp, non_blocking=True)
            step.host = (host_tok, host_logp)
            step.event = torch.cuda.Event()
            step.event.record()
        return step

    def _take(self, logits: torch.Tensor, reqs: list[_Request]) -> list[StepOutput]:
        """Sample the next token of each request (row i of logits is reqs[i]); record and finish."""
        return self._accept(self._launched(reqs, *self._sample(logits, reqs)))

    def _accept(self, step: _Launched, release: bool = True) -> list[StepOutput]:
        """The host's side of a step's tokens: wait for them, then record each, finish the requests that
        end (their pages freed here unless `release` is False: the caller frees them)."""
        if step.event is not None:
            step.event.synchronize()
            tok, logp = step.host
        else:
            tok, logp = step.tok, step.logp
        tok = tok.tolist()
        logp = logp.tolist() if logp is not None else None
        outs = []
        for i, r in enumerate(step.reqs):
            if r.finish_reason is not None:  # it ended at the step before: this row rode along, dropped
                continue
            t = tok[i]
            if len(r.tokens) < len(r.forced):  # teacher forcing: the recorded token, whatever was sampled
                t, own = r.forced[len(r.tokens)], t
                self.forced_mismatches += int(t != own)
            r.tokens.append(t)
            lp = logp[i] if logp is not None and r.params.logprobs else None
            if lp is not None:
                r.logprobs.append(lp)
            self._check_finished(r)
            outs.append(StepOutput(r.rid, t, lp, r.finish_reason is not None, r.finish_reason))
            if r.finish_reason is not None and release:
                self._release(r)
        return outs

    def _check_finished(self, r: _Request) -> None:
        if r.tokens[-1] in r.stop_ids:
            r.finish_reason = "eos" if r.tokens[-1] in self.eos_ids and r.tokens[-1] not in r.params.stop_token_ids else "stop"
        elif r.params.stop:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            hits = [text.find(s) for s in r.params.stop if s in text]
            if hits:
                r.finish_reason, r.text = "stop", text[:min(hits)]
        if r.finish_reason is None and len(r.tokens) >= r.params.max_new_tokens:
            r.finish_reason = "length"

    def _release(self, r: _Request) -> None:
        if r.seq_id is not None:
            self.store.release(torch.tensor([r.seq_id], dtype=torch.int64, device=self.device))
            r.seq_id = None

    # ---- ahead of traffic ----------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self, prompt_tokens: int, max_new_tokens: int = 16) -> dict:
        """Get ready for requests of up to `prompt_tokens` + `max_new_tokens` tokens, before serving
        them (as vLLM captures its decode graphs at startup): afterwards a step of any batch size up
        to max_batch, over prompts of any length within that shape, compiles and captures nothing.

        max_batch dummy requests of `prompt_tokens` seeded random tokens are prefilled and decoded
        (nothing of them is returned or kept): one step over all of them sets the step's widths
        for the whole shape (the attention's pages, the selection's tokens: `KVStore.plan`'s
        pages_hint and select_hint, never narrower from now on), then one step at each batch size
        from max_batch down to 1 compiles the Triton kernels and captures that size's CUDA graph.
        Where the hot tier keeps every token, the pool and the page tables are sized for max_batch
        requests of the shape. Costs max_batch prefills of `prompt_tokens` and max_batch + 1 steps.
        Requests past the shape still run (their step is captured again, as without warmup); under
        LeanKV the pages a head keeps depend on its prompt, so a real prompt may keep more than the
        dummies did. Returns what it did: {"batch_sizes", "captures", "pages", "select", "seconds"}.
        """
        import time

        self._check_open()
        if self.has_unfinished:
            raise ValueError("warmup needs an idle engine: call it before adding requests")
        for name, v in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"warmup: {name} must be an int >= 1, got {v!r}")
        n = self.max_batch
        steps = max_new_tokens + n + 1  # the dummies' tokens: the shape's, and one step per batch size
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and prompt_tokens + max_new_tokens > limit:
            raise ValueError(f"warmup: {prompt_tokens} + {max_new_tokens} tokens exceed the model's "
                             f"max_position_embeddings={limit}")
        start = time.perf_counter()
        captures = self.graphs.captures if self.graphs is not None else 0
        g = torch.Generator().manual_seed(self.seed)
        prompts = torch.randint(0, self.model.config.vocab_size, (n, prompt_tokens), generator=g).tolist()
        params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
        dummies = [_Request(-1 - i, p, params, 0, frozenset()) for i, p in enumerate(prompts)]
        saved_stats = self.store.last_stats  # the figures of the last generation stay the user's
        try:
            if self.config.hot_policy == "all":
                self.store.reserve(n, prompt_tokens, steps)
            for r in dummies:
                self._take(self._prefill(r), [r])
            if self.store.cold_path is not None:
                self.store.cold_path.reserve_positions(prompt_tokens + steps + 1)
            # one step over all of them (eagerly: no graph at a width about to change) sets the floors
            graphs, self.graphs = self.graphs, None
            try:
                self._accept(self._launch(dummies))
            finally:
                self.graphs = graphs
            plan, hot = self._plan, self.store.hot
            if plan.selection is not None:
                self._floor_select = int(plan.selection.k.max().item())
            if self.config.hot_policy == "all":  # the dummies' widest table: a request of the shape needs no more
                self._floor_pages = self._pages_needed(dummies[0])
            else:  # what a head holds now, plus every token still to come in a fresh slot of each tier
                grow = -(-steps // hot.tokens_per_page) + (-(-steps // hot.low_tokens_per_page) if hot.low else 0)
                ret = self.store.cold_path.ret_tokens_per_page if self.store.cold_path is not None else 0
                self._floor_pages = plan.hot_ws["width"] + grow + (-(-self._floor_select // ret) if ret else 0)
            for b in range(n, 0, -1):  # every batch size once, at the floors
                self._accept(self._launch(dummies[:b]))
        finally:
            for r in dummies:
                self._release(r)
            self.store.last_stats = saved_stats
        out = {"batch_sizes": list(range(1, n + 1)),
               "captures": (self.graphs.captures if self.graphs is not None else 0) - captures,
               "pages": self._floor_pages, "select": self._floor_select,
               "seconds": time.perf_counter() - start}
        logger.info("engine: warmed up for %d + %d tokens at batch sizes 1..%d in %.1f s (%d captures; width %d "
                    "pages, selection %d)", prompt_tokens, max_new_tokens, n, out["seconds"], out["captures"],
                    out["pages"], out["select"])
        return out

    # ---- conveniences --------------------------------------------------------------------------
    def stream(self, prompts: Iterable, params: SamplingParams | Sequence[SamplingParams] | None = None,
               **kwargs) -> Iterator[StepOutput]:
        """Queue `prompts` and yield their tokens as they come (interleaved across requests)."""
        self._queue(prompts, params, kwargs)
        while self.has_unfinished:
            yield from self.step()

    def generate(self, prompts: Iterable, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs) -> list[Completion]:
        """Generate for every prompt (text or token ids); Completions in the prompts' order.

        `params` is one SamplingParams for all, or one per prompt; keyword arguments build one
        (e.g. `generate(prompts, max_new_tokens=32, temperature=0.8, seed=1)`).
        Requests queued earlier (add_request) run too, but only these prompts' results return.
        """
        reqs = self._queue(prompts, params, kwargs)
        while any(r.finish_reason is None for r in reqs):
            self.step()
        ids = {r.rid for r in reqs}  # (their tokens are in the completions: none comes back from a later step)
        self._landed = [o for o in self._landed if o.request_id not in ids]
        return [self._completion(r) for r in reqs]

    def _queue(self, prompts, params, kwargs) -> list[_Request]:
        prompts = list(prompts) if not isinstance(prompts, (str, torch.Tensor)) else [prompts]
        if params is not None and kwargs:
            raise ValueError("pass either params or sampling keyword arguments, not both")
        if params is None:
            params = SamplingParams(**kwargs)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        first = self._next_id
        for p, sp in zip(prompts, plist):  # validates every prompt before any runs
            self.add_request(p, sp)
        return [r for r in self.waiting if r.rid >= first]

    def _completion(self, r: _Request) -> Completion:
        text = r.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        return Completion(r.rid, r.prompt, list(r.tokens), r.finish_reason, text,
                          list(r.logprobs) if r.params.logprobs else None)

    # ---- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Engine is closed")

    def close(self) -> None:
        """Drop every request, free every page and detach from the model (restored exactly)."""
        if self.closed:
            return
        self._settle()
        for r in self.running:
            self._release(r)
        self.running, self.waiting = [], deque()
        self._finalizer.detach()
        self.client.detach()
        self.closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The store's figures (`KVStoreClient.stats`) plus the queue: waiting and running requests."""
        s = self.client.stats()
        s.update(waiting=len(self.waiting), running=len(self.running))
        return s
