"""KVStoreConfig: one frozen dataclass that says what the store keeps where.

Presets (see the README's table) are named configs; adjust one with `dataclasses.replace`,
which re-runs the validation in `__post_init__`::

    config = dataclasses.replace(KVStoreConfig.preset("tiered"), token_budget=2048)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

logger = logging.getLogger(__name__)

HOT_POLICIES = ("all", "window", "leankv")
SELECTORS = ("none", "pq", "exact", "streaming", "h2o", "snapkv", "quest")
#: LeanKV reads every hot token's attention logits from the quantized paged decode (reference and
#: kernel); neither has a 16-bit page layout, so LeanKV needs key_bits < 16
LEANKV_UNQUANTIZED = "hot_policy='leankv' over an unquantized hot tier (key_bits=16; use key_bits=8, value_bits=4)"
KEY_BITS = (16, 8, 4, 2)


@dataclass(frozen=True)
class KVStoreConfig:
    """Everything the store needs to know, validated once.

    Hot tier (GPU pages)
      hot_policy: "all" keeps every token; "window" keeps sinks + the recent window (the rest
        lives only in the cold tier); "leankv" keeps what LeanKV's per-head score thresholds keep.
      key_bits / value_bits: precision of the high tier (16 = the model's dtype, unquantized).
      low_key_bits / low_value_bits: precision of LeanKV's low tier.
      quant_groups: scale/zero groups along the head dim (1..4).
      page_size: tokens per page at the high tier; the page *byte* size derives from it and is
        the same for every tier (unified paging).
      hot_tier_bytes: hard cap on the page pool; None grows the pool between steps as needed. A
        cap below one token of one sequence (the null page plus one page per layer and KV head,
        known once the model is: `KVStoreClient.attach`) is refused with that minimum.
      max_batch_size: sequence slots allocated up front (grows between steps when exceeded).
      prefill_chunk_tokens: `generate()` runs a longer prompt through the model in chunks of at
        most this many tokens (transformers' `prefill_chunk_size`), each attending what the store
        holds, so a prefill's activations are one chunk's; None runs every prompt in one pass.
        Chunking applies to the presets without a cold tier (full, quant, leankv); the cold-tier
        presets (pqcache, tiered) prefill in one pass for now (see `chunked_prefill`).
      alpha_prune / alpha_quant: LeanKV thresholds relative to uniform attention 1/n.
      immune_tokens: the most recent tokens LeanKV never prunes or demotes.
      score_queries: prompt queries whose attention seeds LeanKV's scores at prefill.

    Selection at decode (beyond sinks + window)
      selector: "none" attends the whole hot tier; "pq" retrieves top-k by PQ codes from the
        cold tier; "exact" is the oracle top-k over full keys; the rest are baselines.
      sink_tokens: always attended, never coded.
      window_tokens: fixed window; None derives it from budget_fraction * window_share.
      token_budget: top-k tokens per (sequence, layer, KV head); None derives it from
        budget_fraction * (1 - window_share) * (n - sink_tokens), as PQCache does.
      budget_fraction / window_share: PQCache's c and r.
      pq_subspaces / pq_bits: PQ's m and b (codes are uint8 when b <= 8).
      pq_trainer: who trains the codebooks. "auto": torch on the store's device when it is CUDA
        (`kvstore.cold.kmeans`: batched, synchronous after each layer's prefill, stopped by the
        convergence rule), FAISS on host threads otherwise; "device" or "faiss" force one.
      kmeans_iters: FAISS trainer: Lloyd iterations, a fixed count (FAISS's default 25). Never
        chosen from a clock (PQCache sizes it to the prefill time: results then depend on load).
      kmeans_min_iters / kmeans_max_iters / kmeans_tol: device trainer: Lloyd stops once at most
        `kmeans_tol` of a problem's points change centroid, within [min, max] iterations.
      kmeans_points_per_centroid: both trainers train on a seeded sample of at most this many
        candidates a centroid (FAISS's default 256, as PQCache's FAISS k-means: 16K points at
        K=64, against 128K candidates at 128K); every token is encoded. None: all candidates.
      gpu_cache_tokens: GPU cache slots of retrieved tokens per (sequence, layer, KV head).
      retrieval_attention: how the retrieved tokens are attended. "merge" (default): a separate
        attention over them, merged with the hot tier's by log-sum-exp. "kernel": in the hot
        tier's decode-kernel launch, as pool pages of its format (one launch, no merge); it needs
        the Triton kernel, a quantized cold tier in the hot tier's high format (K8V4 in tiered)
        and one scale group; otherwise the store logs why and merges. Not yet the default: its
        speed on a GPU is unmeasured.
      prefetch_next_layer: speculative prefetch (InfiniGen's idea): at each decode layer, layer
        l + 1's selection is predicted from layer l's query (its PQ codes or keys scored with
        it), and that selection's GPU-cache misses are fetched while layer l computes, then
        admitted into layer l + 1's GPU cache before its own lookup, so a good prediction turns
        its misses into hits. Outputs are unchanged (a hit reads the bytes a fetch brings);
        only where the bytes come from changes. Selectors "pq" and "exact" (scoring without
        side effects). Off by default: its effect on a GPU step is unmeasured.

    Cold tier (host memory)
      cold_tier: keep every token's K/V in pinned host memory.
      cold_key_bits / cold_value_bits: 16/16 stores the model's dtype; 8/4 (the PQ presets' default)
        or 8/8 quantize per token and KV head as the hot tier does (K8V4: 200 B a token and KV head
        at d = 128 against 512 B at bf16, for host memory and for the PCIe bytes of a fetch).
      host_tier_bytes: hard cap on host memory; None: no cap beyond what the host has. A cap below
        one cold-tier chunk (256 tokens of every layer's K and V) is refused with that minimum.

    Execution
      use_triton: "auto" uses the Triton kernels on CUDA and the torch references elsewhere;
        "always" forces the kernels (the interpreter on CPU with TRITON_INTERPRET=1); "never".

    Fields this configuration ignores. A field counts only when its value differs from the
    field's default (presets set some fields to their defaults; those never count) and the rest
    of the configuration does not read it:
      ValueError (at construction, naming the field) when the field says WHICH tokens are kept
        or attended and the configuration cannot apply it, so the setting can only be a mistake:
        token_budget without a selector; window_tokens, budget_fraction, window_share without a
        window (hot_policy "window") or a selector (e.g. `full`/`quant`/`leankv` with a budget:
        they attend every token they keep); sink_tokens under hot_policy "leankv" without a
        selector (LeanKV may prune the sinks; only retrieval protects them); alpha_prune without
        hot_policy "leankv" (nothing prunes).
      One logged warning (logger "kvstore.config", once per distinct config, when a store is
        built) when the field only tunes HOW a part works and that part is absent, or when
        other fields decide instead; the store then does what the rest of the configuration
        says: quant_groups at key_bits=16; low_key_bits / low_value_bits / alpha_quant without
        LeanKV's low tier; immune_tokens / score_queries without hot_policy "leankv"; sink_tokens
        under hot_policy "all" without a selector (every token stays); gpu_cache_tokens without a
        selector; pq_subspaces / pq_bits / pq_trainer / kmeans_* without selector "pq", and the
        other trainer's knobs (kmeans_iters under the device trainer; kmeans_min_iters,
        kmeans_max_iters, kmeans_tol under FAISS); cold_key_bits / cold_value_bits /
        host_tier_bytes without cold_tier; prefill_chunk_tokens with cold_tier (one pass for
        now); budget_fraction / window_share when window_tokens and token_budget (or no
        selector) fix both sizes; window_tokens above immune_tokens under LeanKV with retrieval
        (the store caps the window at immune_tokens). `ignored_fields()` lists these.
    """

    name: str = "custom"
    # hot tier
    hot_policy: str = "all"
    key_bits: int = 16
    value_bits: int = 16
    low_key_bits: int = 4
    low_value_bits: int = 2
    quant_groups: int = 1
    page_size: int = 32
    hot_tier_bytes: int | None = None
    max_batch_size: int = 16
    prefill_chunk_tokens: int | None = 8192
    alpha_prune: float = 0.02
    alpha_quant: float = 1.0
    immune_tokens: int = 64
    score_queries: int = 64
    # selection
    selector: str = "none"
    sink_tokens: int = 32
    window_tokens: int | None = None
    token_budget: int | None = None
    budget_fraction: float = 0.2
    window_share: float = 0.5
    pq_subspaces: int = 2
    pq_bits: int = 6
    kmeans_iters: int = 25
    kmeans_min_iters: int = 3
    kmeans_max_iters: int = 300
    pq_trainer: str = "auto"
    kmeans_tol: float = 1e-2
    kmeans_points_per_centroid: int | None = 256
    gpu_cache_tokens: int = 4096
    retrieval_attention: str = "merge"
    prefetch_next_layer: bool = False
    # cold tier
    cold_tier: bool = False
    cold_key_bits: int = 16
    cold_value_bits: int = 16
    host_tier_bytes: int | None = None
    # execution
    use_triton: str = "auto"

    _PRESETS: ClassVar[dict[str, dict]] = {}

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"KVStoreConfig.{field}={getattr(self, field)!r}: {why}")

        if self.hot_policy not in HOT_POLICIES:
            raise bad("hot_policy", f"must be one of {HOT_POLICIES}")
        if self.selector not in SELECTORS:
            raise bad("selector", f"must be one of {SELECTORS}")
        if self.hot_policy == "leankv" and self.key_bits == 16:
            raise NotImplementedError(f"KVStoreConfig.key_bits=16 with hot_policy='leankv': {LEANKV_UNQUANTIZED} "
                                      "is not built")
        for f in ("key_bits", "value_bits", "low_key_bits", "low_value_bits"):
            if getattr(self, f) not in KEY_BITS:
                raise bad(f, f"must be one of {KEY_BITS}")
        if self.value_bits > self.key_bits:
            raise bad("value_bits", "keys never get fewer bits than values (K2V4 collapses accuracy)")
        if self.has_low_tier and self.low_value_bits > self.low_key_bits:
            raise bad("low_value_bits", "keys never get fewer bits than values")
        if self.has_low_tier and (self.low_key_bits > self.key_bits or self.low_value_bits > self.value_bits):
            raise bad("low_key_bits", f"the low tier cannot have more bits than the high tier (K{self.key_bits}"
                                      f"V{self.value_bits}): lower low_key_bits / low_value_bits")
        if (self.key_bits == 16) != (self.value_bits == 16):
            raise bad("value_bits", "16 bits (unquantized) applies to keys and values together")
        if not 1 <= self.quant_groups <= 4:
            raise bad("quant_groups", "must be in 1..4")
        if self.page_size < 1:
            raise bad("page_size", "must be >= 1")
        if self.hot_tier_bytes is not None and self.hot_tier_bytes <= 0:
            raise bad("hot_tier_bytes", "must be positive or None")
        if self.host_tier_bytes is not None and self.host_tier_bytes <= 0:
            raise bad("host_tier_bytes", "must be positive or None")
        if self.max_batch_size < 1:
            raise bad("max_batch_size", "must be >= 1")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise bad("prefill_chunk_tokens", "must be >= 1 or None")
        if self.alpha_prune < 0 or self.alpha_quant < 0:
            raise bad("alpha_prune", "thresholds must be >= 0")
        if self.immune_tokens < 0:
            raise bad("immune_tokens", "must be >= 0")
        if self.score_queries < 1:
            raise bad("score_queries", "must be >= 1")
        if self.sink_tokens < 0:
            raise bad("sink_tokens", "must be >= 0")
        if self.window_tokens is not None and self.window_tokens < 1:
            raise bad("window_tokens", "must be >= 1 or None")
        if self.token_budget is not None and self.token_budget < 1:
            raise bad("token_budget", "must be >= 1 or None")
        if not 0 < self.budget_fraction <= 1:
            raise bad("budget_fraction", "must be in (0, 1]")
        if not 0 <= self.window_share < 1:
            raise bad("window_share", "must be in [0, 1)")
        if self.pq_subspaces < 1:
            raise bad("pq_subspaces", "must be >= 1")
        if not 1 <= self.pq_bits <= 8:
            raise bad("pq_bits", "must be in 1..8 (codes are uint8)")
        if self.kmeans_iters < 1:
            raise bad("kmeans_iters", "must be >= 1")
        if not 1 <= self.kmeans_min_iters <= self.kmeans_max_iters:
            raise bad("kmeans_min_iters", "need 1 <= kmeans_min_iters <= kmeans_max_iters")
        if self.pq_trainer not in ("auto", "device", "faiss"):
            raise bad("pq_trainer", "must be 'auto', 'device' or 'faiss'")
        if not 0 <= self.kmeans_tol < 1:
            raise bad("kmeans_tol", "must be in [0, 1)")
        if self.kmeans_points_per_centroid is not None and (
                not isinstance(self.kmeans_points_per_centroid, int) or self.kmeans_points_per_centroid < 1):
            raise bad("kmeans_points_per_centroid", "must be an int >= 1, or None (train on every candidate)")
        if self.gpu_cache_tokens < 0:
            raise bad("gpu_cache_tokens", "must be >= 0")
        if self.retrieval_attention not in ("merge", "kernel"):
            raise bad("retrieval_attention", "must be 'merge' or 'kernel'")
        if self.prefetch_next_layer and self.selector not in ("pq", "exact"):
            raise bad("prefetch_next_layer", f"predicts with selector 'pq' or 'exact' (scoring without side "
                                             f"effects), not {self.selector!r}")
        if (self.cold_key_bits, self.cold_value_bits) not in ((16, 16), (8, 8), (8, 4)):
            raise bad("cold_key_bits", "the cold tier stores K16V16, K8V8 or K8V4 (cold_key_bits/cold_value_bits)")
        if self.use_triton not in ("auto", "always", "never"):
            raise bad("use_triton", "must be 'auto', 'always' or 'never'")
        if self.selector != "none" and not self.cold_tier:
            raise bad("selector", "every selector needs cold_tier=True: the tokens it selects are read from host "
                                  "memory (the baselines' too)")
        if self.hot_policy == "window" and self.selector == "none" and not self.cold_tier:
            raise bad("hot_policy", "'window' without a selector or cold tier would drop tokens for good")
        for f, why in self._unappliable():
            default = _DEFAULTS[f]
            if getattr(self, f) != default:
                raise bad(f, f"has no effect here: {why}; leave it at its default ({default!r})")

    # ---- fields a configuration ignores (see the class docstring) -------------------------------
    def _unappliable(self) -> list[tuple[str, str]]:
        """(field, why) for the fields that say which tokens are kept or attended and that this
        configuration cannot apply (a value other than the default is refused)."""
        out = []
        window = self.hot_policy == "window" or self.retrieves
        if not self.retrieves:
            out.append(("token_budget", "only a selector retrieves a budget of tokens and selector='none' "
                                        "(use a preset with one: pqcache, tiered, oracle)"))
        if not window:
            why = (f"hot_policy={self.hot_policy!r} with selector='none' has no window and no budget: decode "
                   "attends every token the hot tier keeps (use a preset with a selector: pqcache, tiered, oracle)")
            out += [(f, why) for f in ("window_tokens", "budget_fraction", "window_share")]
        if self.hot_policy == "leankv" and not self.retrieves:
            out.append(("sink_tokens", "LeanKV without a selector may prune the first tokens (only retrieval "
                                       "protects sinks; immune_tokens protects the most recent ones)"))
        if self.hot_policy != "leankv":
            out.append(("alpha_prune", f"only hot_policy='leankv' prunes (hot_policy={self.hot_policy!r})"))
        return out

    def ignored_fields(self, device: str | None = None) -> list[str]:
        """One line per field set away from its default that this configuration ignores harmlessly
        (it only tunes a part that is absent, or other fields decide): the store warns about them
        once (`warn_ignored`). `device` ("cuda", "cpu") resolves pq_trainer="auto"; without it the
        trainers' knobs are not judged."""
        rules: list[tuple[tuple[str, ...], str]] = []
        if not self.quantized:
            rules.append((("quant_groups",), "the hot tier is not quantized (key_bits=16)"))
        if not self.has_low_tier:
            rules.append((("low_key_bits", "low_value_bits", "alpha_quant"),
                          "there is no low tier (only hot_policy='leankv' with key_bits < 16 has one)"))
        if self.hot_policy != "leankv":
            rules.append((("immune_tokens", "score_queries"), f"only hot_policy='leankv' scores and prunes tokens "
                                                              f"(hot_policy={self.hot_policy!r})"))
        if self.hot_policy == "all" and not self.retrieves:
            rules.append((("sink_tokens",), "hot_policy='all' keeps every token, the first ones included"))
        if not self.retrieves:
            rules.append((("gpu_cache_tokens",), "the GPU cache holds retrieved tokens and selector='none'"))
            rules.append((("retrieval_attention",), "nothing is retrieved (selector='none')"))
        if self.selector != "pq":
            rules.append((("pq_subspaces", "pq_bits", "pq_trainer", "kmeans_iters", "kmeans_min_iters",
                           "kmeans_max_iters", "kmeans_tol", "kmeans_points_per_centroid"),
                          f"no PQ index is built (selector={self.selector!r})"))
        elif self.pq_trainer != "auto" or device is not None:
            on_device = self.pq_trainer == "device" or (self.pq_trainer == "auto" and device == "cuda")
            if on_device:
                rules.append((("kmeans_iters",), "the device trainer stops by kmeans_tol within "
                                                 "[kmeans_min_iters, kmeans_max_iters]"))
            else:
                rules.append((("kmeans_min_iters", "kmeans_max_iters", "kmeans_tol"),
                              "the FAISS trainer runs kmeans_iters iterations"))
        if not self.cold_tier:
            rules.append((("cold_key_bits", "cold_value_bits", "host_tier_bytes"), "cold_tier=False"))
        elif self.prefill_chunk_tokens is not None:
            rules.append((("prefill_chunk_tokens",), "a cold tier takes a prompt in one pass for now"))
        window = self.hot_policy == "window" or self.retrieves
        if window and self.window_tokens is not None and (self.token_budget is not None or not self.retrieves):
            rules.append((("budget_fraction", "window_share"),
                          "window_tokens and token_budget fix both sizes" if self.retrieves else
                          "window_tokens fixes the window and there is no selector (no budget)"))
        out = []
        for fields, why in rules:
            for f in fields:
                if getattr(self, f) != _DEFAULTS[f]:
                    out.append(f"KVStoreConfig.{f}={getattr(self, f)!r} has no effect: {why}")
        if (self.hot_policy == "leankv" and self.retrieves and self.window_tokens is not None
                and self.window_tokens > max(1, self.immune_tokens)):
            out.append(f"KVStoreConfig.window_tokens={self.window_tokens!r} is capped at immune_tokens="
                       f"{self.immune_tokens}: under LeanKV with retrieval the window is LeanKV's immune window")
        return out

    def warn_ignored(self, device: str | None = None) -> None:
        """Log `ignored_fields` as one warning, once per distinct configuration (the store calls
        this when it is built)."""
        key = (self, device)
        if key in _WARNED:
            return
        _WARNED.add(key)
        lines = self.ignored_fields(device)
        if lines:
            logger.warning("config %r sets fields it ignores: %s", self.name, "; ".join(lines))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether the hot tier stores quantized pages."""
        return self.key_bits < 16

    @property
    def has_low_tier(self) -> bool:
        return self.hot_policy == "leankv" and self.quantized

    @property
    def pq_centroids(self) -> int:
        return 1 << self.pq_bits

    @property
    def retrieves(self) -> bool:
        """Whether decode selects tokens beyond the hot tier's resident ones."""
        return self.selector != "none"

    @property
    def chunked_prefill(self) -> bool:
        """Whether `generate()` prefills long prompts in chunks of `prefill_chunk_tokens`: every
        preset without a cold tier (the cold tier and the PQ index take a prompt in one piece).
        Under LeanKV (and the window policy) the hot tier holds the earlier chunks in full and the
        policy decides at the last chunk, over the whole prompt (KVStore._whole_prompt_keep)."""
        return self.prefill_chunk_tokens is not None and not self.cold_tier

    def window_for(self, num_tokens: int) -> int:
        """Window size for a prompt of `num_tokens` (PQCache: int((n - S) * c * r), >= 1)."""
        if self.window_tokens is not None:
            return self.window_tokens
        return max(1, int((num_tokens - self.sink_tokens) * self.budget_fraction * self.window_share))

    def topk_for(self, num_tokens: int) -> int:
        """Retrieved tokens per (sequence, layer, KV head) for a prompt of `num_tokens`."""
        if self.token_budget is not None:
            return self.token_budget
        return max(1, int((num_tokens - self.sink_tokens) * self.budget_fraction * (1 - self.window_share)))

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def register_preset(cls, name: str, **fields) -> None:
        """Register a named preset (fields are validated when it is built)."""
        cls._PRESETS[name] = dict(fields)

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(cls._PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "KVStoreConfig":
        """Build the named preset, optionally overriding fields."""
        if name not in cls._PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(cls.preset_names())}")
        return cls(name=name, **{**cls._PRESETS[name], **overrides})

    def replace(self, **changes) -> "KVStoreConfig":
        return dataclasses.replace(self, **changes)


#: every field's default (an ignored field counts only when it differs from its default)
_DEFAULTS: dict = {f.name: f.default for f in dataclasses.fields(KVStoreConfig)}
#: (config, device) pairs already warned about (`KVStoreConfig.warn_ignored`)
_WARNED: set = set()

# DESIGN.md's preset table.
KVStoreConfig.register_preset("full")
KVStoreConfig.register_preset("quant", key_bits=8, value_bits=4)
KVStoreConfig.register_preset(
    "leankv", hot_policy="leankv", key_bits=8, value_bits=4, low_key_bits=4, low_value_bits=2,
    alpha_prune=0.02, alpha_quant=1.0,
)
KVStoreConfig.register_preset(
    "pqcache", hot_policy="window", selector="pq", cold_tier=True, sink_tokens=32,
    budget_fraction=0.2, window_share=0.5, pq_subspaces=2, pq_bits=6, cold_key_bits=8, cold_value_bits=4,
)
KVStoreConfig.register_preset(
    "pqcache-retrieval", hot_policy="window", selector="pq", cold_tier=True, sink_tokens=32,
    budget_fraction=0.2, window_share=0.5, pq_subspaces=4, pq_bits=8, cold_key_bits=8, cold_value_bits=4,
)
# tiered: the hot tier's never-pruned recent tokens are LeanKV's immune ones, so the window
# (never a retrieval candidate) is the immune window; the store caps it at immune_tokens
# (kvstore/cold/path.py, ColdPath._candidate_window); candidates are the tokens LeanKV pruned.
# LeanKV's thresholds retuned for a hot tier whose pruned tokens can be recalled: prune below
# uniform attention (1/n, the paper's Llama-3-8B setting prunes below 0.02/n), K4V2 below 8/n
# (paper: 1/n). Probe, 4K/8K, 4 retrieval tasks x 40 samples, H200, budget 1/20: accuracy 0.988
# against full's 0.997 with 10.2x less GPU KV than dense (the paper's thresholds: 3.4x);
# results/h200_cold/ has the sweep.
KVStoreConfig.register_preset(
    "tiered", hot_policy="leankv", key_bits=8, value_bits=4, low_key_bits=4, low_value_bits=2,
    alpha_prune=1.0, alpha_quant=8.0,
    selector="pq", cold_tier=True, budget_fraction=0.2, window_share=0.5, window_tokens=64, immune_tokens=64,
    cold_key_bits=8, cold_value_bits=4,
)
KVStoreConfig.register_preset(
    "oracle", hot_policy="window", selector="exact", cold_tier=True, sink_tokens=32,
    budget_fraction=0.2, window_share=0.5,
)
