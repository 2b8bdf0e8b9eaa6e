"""Hugging Face adapter: serve a transformers causal LM's attention from a KVStore.

It uses transformers' own extension points and copies no modeling code:

* an attention function registered with `AttentionInterface` under a name unique to the
  client, which the model's attention modules call with post-RoPE q, k, v;
* a mask function registered with `AttentionMaskInterface` under the same name, which hands
  the 2D padding mask through unchanged (the store tracks causality and padding itself);
* `KVStoreCache`, a `Cache` subclass that stands in for the model's dense cache: it keeps the
  sequence bookkeeping transformers expects and plans each decode step once, at layer 0;
* a forward pre-hook that swaps an empty cache (the one `generate()` makes, or none) for a
  `KVStoreCache`;
* where the store runs Triton on a GPU, the RMSNorm modules' forward as one kernel
  (gpu_kernels/rms_norm.py: eight launches each otherwise), an instance attribute (`fuse_norms`).

The attention implementation is named in the config, and models built from one config object
share it; so the attached model gets its own copy of its config (every module that held the
original holds the copy), and only the copy names kvstore's implementation. Other models that
share the original keep working. One adapter serves a model at a time (`attached_owner`).

`detach()` undoes all of it: the modules get their original config objects and forwards back.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from typing import TYPE_CHECKING, Any

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvstore.geometry import ModelGeometry, use_triton
from kvstore.prefill_attention import prefill_attention

if TYPE_CHECKING:
    from kvstore.plan import DecodePlan
    from kvstore.store import KVStore

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: the RMSNorm classes of those families (one formula: transformers' LlamaRMSNorm) that `fuse_norms` runs as a kernel
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fuse_norms(model: Any) -> list[Any]:
    """Give each RMSNorm module of `model` (`RMS_NORMS`, its class's own forward) a forward that is one
    Triton launch (`gpu_kernels.rms_norm`), as an instance attribute; returns the modules changed, which
    `unfuse_norms` restores. Modules whose forward was already replaced are left alone."""
    from gpu_kernels.rms_norm import rms_norm

    changed = []
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and "forward" not in vars(module) and \
                hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
            module.forward = _fused_norm_forward(module, rms_norm)
            changed.append(module)
    return changed


def _fused_norm_forward(module: Any, rms_norm: Any) -> Any:
    ref = weakref.ref(module)  # no cycle through the instance attribute

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        m = ref()
        return rms_norm(hidden_states, m.weight, m.variance_epsilon)

    return forward


def unfuse_norms(modules: list[Any]) -> None:
    """Undo `fuse_norms`: the modules' class forward again."""
    for module in modules:
        vars(module).pop("forward", None)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cache_arg(forward: Any) -> str:
    """The name a model's forward takes its cache by: `cache` from transformers 5.24 on
    (`past_key_values` stays a deprecated alias until 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


#: This transformers' name for the cache, as a forward argument and an output field.
CACHE_ARG = cache_arg(LlamaForCausalLM.forward)


def model_cache(output: Any) -> Any:
    """The cache a forward or generate() output carries (whatever this transformers calls the field)."""
    return getattr(output, CACHE_ARG)


class UnsupportedModelError(ValueError):
    """The engine cannot be served by kvstore; the message says what is unsupported."""


def check_config(config: Any) -> None:
    """Check that a model of this config (a transformers PretrainedConfig) can be served, before
    any weights are loaded. Raises UnsupportedModelError naming what is unsupported (family,
    sliding-window layers, MLA, encoder-decoder)."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"encoder-decoder models ({model_type}) are not supported: kvstore serves decoder-only causal LMs")
    if getattr(config, "kv_lora_rank", None) is not None or getattr(config, "q_lora_rank", None) is not None:
        raise UnsupportedModelError(f"multi-head latent attention (MLA, {model_type}) is not supported")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(config, "sliding_window", None) is not None and (
        model_type == "mistral" or getattr(config, "use_sliding_window", False)
    ):
        raise UnsupportedModelError(
            f"sliding-window attention layers ({model_type}, sliding_window={getattr(config, 'sliding_window', None)}) "
            "are not supported: every layer must be full attention (for Mistral v0.2+ checkpoints set "
            "config.sliding_window = None)"
        )


def model_geometry(model: Any) -> ModelGeometry:
    """Check that `model` can be served and return its attention geometry.

    Raises UnsupportedModelError naming what is unsupported (family, sliding-window layers,
    MLA, encoder-decoder, mixed devices or dtypes).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face model (no .config)")
    check_config(config)
    if not hasattr(model, "generate") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a causal LM (no lm_head/generate)")
    params = list(model.parameters())
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(devices) != 1:
        raise UnsupportedModelError(f"the model is spread over devices {sorted(map(str, devices))}; kvstore needs one device")
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"model dtypes {sorted(map(str, dtypes))} unsupported; use one of float32, float16, bfloat16")
    num_q = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        dtype=next(iter(dtypes)),
        device=next(iter(devices)),
    )


class _StoreLayer(CacheLayerMixin):
    """Per-layer bookkeeping transformers reads (lengths for masks and positions); no tensors."""

    is_compileable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("KVStoreCache cannot be reset in place; start a new generation instead")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported with kvstore: use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVStoreCache cannot be cropped (assisted/speculative decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("expanding a KVStoreCache (beam search, num_return_sequences>1 after prefill) is not supported")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("selecting batch rows of a KVStoreCache is not supported")


class KVStoreCache(Cache):
    """The model-facing cache: one batch of sequences in a KVStore.

    transformers calls `update()` once per layer with the new K/V; the attention function then
    calls `attend()`. Layer 0's update of a one-token step builds the step's plan. When the
    cache is garbage-collected (or `release()` is called) its sequences' pages are freed.
    """

    def __init__(self, store: "KVStore", prompt_lengths: torch.Tensor | None = None, prompt_width: int | None = None):
        super().__init__(layers=[_StoreLayer() for _ in range(store.geometry.num_layers)])
        self.store = store
        #: valid tokens of each prompt, when known before the first forward (generate() knows them);
        #: lets a chunked prefill serve the policies that decide from the whole prompt
        self.prompt_lengths = prompt_lengths
        #: columns of the (padded) prompt, when known (generate()): a one-token chunk of a chunked
        #: prefill is prefill, not a decode step (unknown: every one-token forward after the first is)
        self.prompt_width = prompt_width
        self.seq_ids: torch.Tensor | None = None
        self.plan: "DecodePlan | None" = None
        self.decoding = False
        self._finalizer: weakref.finalize | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            batch, q_len = key_states.shape[0], key_states.shape[-2]
            if self.seq_ids is None:
                lengths = self.prompt_lengths if self.prompt_lengths is not None and len(self.prompt_lengths) == batch else None
                self.seq_ids = self.store.add_sequences(batch, lengths)
                self._finalizer = weakref.finalize(self, _release, weakref.ref(self.store), self.seq_ids)
            elif batch != self.seq_ids.numel():
                raise ValueError(
                    f"this KVStoreCache holds {self.seq_ids.numel()} sequences but got a batch of {batch}; "
                    "start a new generation for a new batch"
                )
            seen = self.layers[0].seen
            prefilling = self.prompt_width is not None and seen < self.prompt_width
            self.decoding = q_len == 1 and seen > 0 and not prefilling
            self.plan = self.store.plan(self.seq_ids) if self.decoding else None
        return self.layers[layer_idx].update(key_states, value_states)

    def attend(self, layer_idx: int, q, k, v, padding_mask, scale: float) -> torch.Tensor:
        """q [B, Hq, T, d], k/v [B, Hkv, T, d]; padding_mask bool [B, kv_len] or None. -> [B, Hq, T, d]."""
        if self.decoding:
            return self.store.decode(layer_idx, self.plan, q, k, v, scale)
        T = q.shape[2]
        valid = (
            padding_mask[:, -T:].to(device=q.device, dtype=torch.bool)
            if padding_mask is not None
            else torch.ones(q.shape[0], T, dtype=torch.bool, device=q.device)
        )
        return self.store.prefill(layer_idx, self.seq_ids, q, k, v, valid, scale)

    def release(self) -> None:
        """Free this cache's sequences now (otherwise when it is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def is_compileable(self) -> bool:
        return False


def _release(store_ref: "weakref.ref[KVStore]", seq_ids: torch.Tensor) -> None:
    store = store_ref()
    if store is not None:
        store.release(seq_ids)


#: model -> the adapter attached to it (a weak reference: the model's hooks keep the adapter alive
#: until detach)
_ADAPTERS: "weakref.WeakKeyDictionary[Any, weakref.ref[HFAdapter]]" = weakref.WeakKeyDictionary()


def attached_owner(model: Any) -> Any | None:
    """The owner (the KVStoreClient) of the adapter attached to `model`, or None if none is."""
    ref = _ADAPTERS.get(model)
    adapter = ref() if ref is not None else None
    return adapter.owner if adapter is not None else None


class HFAdapter:
    """Attaches one KVStore to one Hugging Face model; `detach()` restores it exactly.

    `owner` is whoever attached it (the KVStoreClient): `attached_owner(model)` returns it, so a
    second attach can be refused by name. The caller checks that the model is not attached.
    """

    def __init__(self, model: Any, store: "KVStore", owner: Any = None):
        self.model = model
        self.store = store
        self.owner = owner
        self.name = f"kvstore_{id(self):x}"
        self.active_cache: KVStoreCache | None = None
        self._prompt_lengths: torch.Tensor | None = None  # of the generate() call in progress
        self._prompt_width: int | None = None  # its prompt's columns (padding included)
        self._call_caches: list[KVStoreCache] | None = None  # caches the generate() call in progress made
        self.caches: "weakref.WeakSet[KVStoreCache]" = weakref.WeakSet()
        ALL_ATTENTION_FUNCTIONS.register(self.name, self._attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, _padding_mask)
        self._orig_configs = self._own_configs()
        for module, _ in self._orig_configs:
            module.config._attn_implementation = self.name
        self._cache_kw = cache_arg(model.forward)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._post_hook = model.register_forward_hook(self._post_forward)
        # generate() gets a wrapper (an instance attribute, removed by detach) that sizes the
        # store for the batch and chunks long prompts (`_generate`)
        self._own_generate = "generate" in vars(model)
        self._orig_generate = model.generate
        model.generate = self._generate
        # RMSNorm as one kernel where the store runs Triton on a GPU (on a CPU the interpreter would only slow it)
        dev = store.geometry.device
        self._fused_norms = fuse_norms(model) if dev.type == "cuda" and use_triton(store.config, dev) else []
        _ADAPTERS[model] = weakref.ref(self)
        self.attached = True

    def _own_configs(self) -> list[tuple[Any, PreTrainedConfig]]:
        """Give every module that holds a config its own deep copy; return (module, original) pairs.

        One memo for all copies: modules that shared a config (the model, its base model, each
        attention layer, the rotary embedding) share its copy, and a module holding a sub-config
        gets the sub-config of that copy. The originals are never written to.
        """
        memo: dict = {}
        originals = []
        for module in self.model.modules():
            cfg = getattr(module, "config", None)
            if isinstance(cfg, PreTrainedConfig):
                originals.append((module, cfg))
                module.config = copy.deepcopy(cfg, memo)
        return originals

    def detach(self) -> None:
        """Undo everything __init__ did; a second call does nothing."""
        if not self.attached:
            return
        self.attached = False
        _ADAPTERS.pop(self.model, None)
        if self._own_generate:
            self.model.generate = self._orig_generate
        else:
            vars(self.model).pop("generate", None)
        self._hook.remove()
        self._post_hook.remove()
        unfuse_norms(self._fused_norms)
        for module, cfg in self._orig_configs:
            module.config = cfg
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(self.name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(self.name, None)
        for cache in list(self.caches):
            cache.release()
        self.active_cache = None

    # ---- generate ------------------------------------------------------------------------------
    def _generate(self, *args, **kwargs):
        """`model.generate` while attached: the model's own, after two things it cannot do itself.

        * The store reserves the batch's pages at once (prompt + max_new_tokens; `KVStore.reserve`),
          so the pool is sized once rather than grown (and copied) step by step.
        * With `KVStoreConfig.chunked_prefill`, a prompt longer than `prefill_chunk_tokens` goes
          through the model in even chunks of at most that size (transformers' `prefill_chunk_size`,
          unless the call sets one): activations of one chunk instead of the whole prompt. Each
          chunk attends to what the store holds of the earlier ones (`KVStore.prefill`); the
          prompt lengths (from the attention mask) go to the store with the cache, for the
          policies that decide from the whole prompt.

        A generation that raises (OutOfPagesError from a capped hot tier, ColdTierMemoryError, ...)
        releases the sequences it started before the error propagates: nothing stays held.
        """
        config = self.store.config
        inputs = kwargs.get("input_ids", args[0] if args else None)
        gen_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
            B, T = inputs.shape
            new = kwargs.get("max_new_tokens", getattr(gen_config, "max_new_tokens", None))
            if new is None:  # max_length counts the prompt
                new = max(0, (kwargs.get("max_length", getattr(gen_config, "max_length", None) or T)) - T)
            mask = kwargs.get("attention_mask")
            self._prompt_lengths = (mask.sum(1) if isinstance(mask, torch.Tensor) and mask.dim() == 2
                                    else torch.full((B,), T, dtype=torch.int64))
            self._prompt_width = T
            chunk = config.prefill_chunk_tokens
            chunked = (config.chunked_prefill and T > chunk and "prefill_chunk_size" not in kwargs
                       and getattr(gen_config, "prefill_chunk_size", None) is None)
            if chunked:  # even chunks: the last is nearly full (LeanKV scores with its last queries)
                pieces = -(-T // chunk)
                kwargs["prefill_chunk_size"] = -(-T // pieces)
                logger.debug("generate: prefill of %d tokens in %d chunks of %d", T, pieces, kwargs["prefill_chunk_size"])
            self.store.reserve(B, T, int(new), chunked=chunked)
        self._call_caches = []
        try:
            return self._orig_generate(*args, **kwargs)
        except BaseException:
            # the caller has no handle on this call's cache: free its sequences now (the pre-hook's
            # reference, `active_cache`, would otherwise hold them until the next forward)
            self.active_cache = None
            for cache in self._call_caches:
                cache.release()
            raise
        finally:
            self._prompt_lengths = self._prompt_width = None
            self._call_caches = None

    # ---- hooks -----------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        # transformers >= 5.24 names the cache argument `cache` (`past_key_values` is a deprecated alias
        # until 5.40); the cache goes in under the name this model's forward takes, never under both.
        key = self._cache_kw
        past = kwargs.get(key)
        if key != "past_key_values" and kwargs.get("past_key_values") is not None:
            legacy = kwargs.pop("past_key_values")
            if past is not None and past is not legacy:
                raise ValueError("both `cache` and `past_key_values` were given: pass one")
            past = legacy
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        if isinstance(past, KVStoreCache):
            if past.store is not self.store:
                raise ValueError("past_key_values belongs to another KVStoreClient")
        elif past is None and not use_cache:
            self.active_cache = None
            return args, kwargs
        elif past is None or (isinstance(past, DynamicCache) and past.get_seq_length() == 0):
            past = KVStoreCache(self.store, self._prompt_lengths, self._prompt_width)
            self._prompt_lengths = self._prompt_width = None
            self.caches.add(past)
            if self._call_caches is not None:
                self._call_caches.append(past)
            kwargs["use_cache"] = True
        else:
            raise ValueError(
                f"past_key_values of type {type(past).__name__} with {past.get_seq_length()} tokens was not built by "
                "kvstore; while attached, start generation without a cache (or pass the KVStoreCache you got back)"
            )
        kwargs[key] = past
        self.active_cache = past
        return args, kwargs

    def _post_forward(self, module, args, output):
        self.active_cache = None  # the caller holds the cache; dropping it frees its pages
        return output

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        geo = self.store.geometry
        if query.dtype != geo.dtype or query.device != geo.device:
            raise ValueError(
                f"attention got {query.dtype} on {query.device} but the store was attached for {geo.dtype} on "
                f"{geo.device}; after moving or casting the model, detach() and attach() again"
            )
        cache = self.active_cache
        if cache is None:  # use_cache=False: plain causal attention, nothing stored
            B, T = query.shape[0], query.shape[2]
            valid = attention_mask[:, -T:] if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=query.device)
            out = prefill_attention(query, key, value, valid.bool(), scale)
        else:
            out = cache.attend(module.layer_idx, query, key, value, attention_mask, scale)
        return out.transpose(1, 2).contiguous(), None


def _padding_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """Mask function for the registered name: the 2D padding mask [B, kv_length] (bool) or None."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].bool()
