"""Move sequences between stores: record what the store received, then rebuild it without the model.

This is for the compatible path's sequences (a `KVStoreCache` under `model.generate()` or a
forward loop over `past_key_values`): the model never runs again over tokens it already saw. The
engine's own requests move the same way through `Engine(recorder=...)` and `Engine.restore`,
which replay the calls the engine makes (each prompt alone, in its chunks): the cluster layer
(cluster/worker.py) uses those; the padded timeline layout below is shared.

* `TapCache`: a `KVStoreCache` that hands every layer's attention inputs (post-RoPE q, k, v and
  the softmax scale: exactly what the store receives) to a callback, so a caller can mirror them
  to host memory as they are produced.
* `import_batch(store, kv)`: a fresh `KVStoreCache` holding `kv`'s tokens, built by one store
  prefill call per layer over the K/V (queries are zeros). Exact where the store's state depends
  neither on queries nor on where the prefill ended: hot policy "all" with no selector (`full`,
  `quant`). Cheapest: no queries need to be kept.
* `replay_batch(store, trace)`: the general path. It replays the store calls the model made
  (prefill over the prompt columns, then plan + decode per later column) with the recorded
  q/k/v, so every piece of store state (window, LeanKV scores, PQ codebooks and codes, caches)
  is rebuilt as the original run built it. It costs the store's own work, not the model's.
* `export_batch(cache)`: every token's K/V read back from the hot tier (exact only while the hot
  tier keeps every token at the model's dtype).

Padded timeline layout (what a left-padded HF batch looks like after T tokens were fed)::

      column:      0   1   2   3   4   5        valid[b, t]: token t of row b exists
      row 0:       .   .   a0  a1  a2  a3       keys[l, b, h, t]: its post-RoPE key at layer l
      row 1:       b0  b1  b2  b3  b4  b5       positions of row b: 0 .. n_b - 1 from the left
                   |-- prefill ----|- decode -|  (replay: columns < prefill_columns were one prefill)

Padding columns hold arbitrary values and are never read.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from kvstore.adapters.hf import KVStoreCache, _release

if TYPE_CHECKING:
    from kvstore.store import KVStore

logger = logging.getLogger(__name__)


@dataclass
class BatchKV:
    """K/V of a batch of sequences in the padded timeline layout.

    keys, values: [L, B, Hkv, T, d] post-RoPE, at the model's dtype (padding columns arbitrary).
    valid: bool [B, T]; each row's valid columns are contiguous and end at column T - 1.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 5 or self.keys.shape != self.values.shape:
            raise ValueError(
                f"BatchKV.keys/values must both be [L, B, Hkv, T, d]; got {tuple(self.keys.shape)} and "
                f"{tuple(self.values.shape)}"
            )
        L, B, H, T, d = self.keys.shape
        if self.valid.shape != (B, T):
            raise ValueError(f"BatchKV.valid must be [B, T] = [{B}, {T}], got {tuple(self.valid.shape)}")

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [B] valid tokens per row."""
        return self.valid.sum(dim=1)


@dataclass
class BatchTrace(BatchKV):
    """BatchKV plus the queries and where the prefill ended: enough to replay the store exactly.

    queries: [L, B, Hq, T, d] post-RoPE; prefill_columns: columns 0 .. P-1 were one prefill call,
    each later column one decode step (every row has a token there); scale: the softmax scale.
    """

    queries: torch.Tensor | None = None
    prefill_columns: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        L, B, H, T, d = self.keys.shape
        q = self.queries
        if q is None or q.dim() != 5 or q.shape[:2] != (L, B) or q.shape[3:] != (T, d):
            raise ValueError(
                f"BatchTrace.queries must be [L, B, Hq, T, d] = [{L}, {B}, Hq, {T}, {d}], "
                f"got {None if q is None else tuple(q.shape)}"
            )
        if not 1 <= self.prefill_columns <= T:
            raise ValueError(f"BatchTrace.prefill_columns={self.prefill_columns} must be in 1..{T}")
        if not bool(self.valid[:, self.prefill_columns:].all()):
            raise ValueError("BatchTrace.valid: every row must have a token in every decode column")


class TapCache(KVStoreCache):
    """A KVStoreCache that hands each layer's attention inputs to `on_attend` before the store runs.

    on_attend(layer, q, k, v, scale): q [B, Hq, T, d], k/v [B, Hkv, T, d] post-RoPE at the model's
    dtype (T = prompt length at prefill, 1 at decode; padding columns included). The callback
    must copy what it keeps.
    """

    def __init__(self, store: "KVStore",
                 on_attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]):
        super().__init__(store)
        self.on_attend = on_attend

    def attend(self, layer_idx: int, q, k, v, padding_mask, scale: float) -> torch.Tensor:
        self.on_attend(layer_idx, q, k, v, scale)
        return super().attend(layer_idx, q, k, v, padding_mask, scale)


def exportable(store: "KVStore") -> bool:
    """Whether `export_batch` reads this store's sequences exactly and `import_batch` rebuilds them exactly."""
    return store.config.hot_policy == "all" and not store.config.quantized and not store.config.retrieves


def export_batch(cache: KVStoreCache) -> BatchKV:
    """Every token's K/V of a cache's sequences (all layers), in the padded timeline layout.

    Reads the hot tier; raises ValueError when the hot tier does not hold every token exactly
    (record the inputs with `TapCache` instead). Not a decode-path operation: it gathers every
    page and syncs the host.
    """
    store = cache.store
    if not exportable(store):
        raise ValueError(
            f"export_batch reads the hot tier, which under preset {store.config.name!r} "
            f"(hot_policy={store.config.hot_policy!r}, key_bits={store.config.key_bits}) does not hold every token "
            "exactly; record the attention inputs with TapCache as they are produced"
        )
    if cache.seq_ids is None:
        raise ValueError("this KVStoreCache holds no sequences yet (nothing was fed through it)")
    geo = store.geometry
    seq_ids = cache.seq_ids
    lengths = store.seq_len[seq_ids]  # [B]
    T = int(cache.layers[0].seen)
    B = seq_ids.numel()
    keys = torch.zeros(geo.num_layers, B, geo.num_kv_heads, T, geo.head_dim, dtype=geo.dtype, device=geo.device)
    values = torch.zeros_like(keys)
    num_pages = store.hot.pages_in_use(seq_ids)
    pad = (T - lengths).view(B, 1, 1)
    for layer in range(geo.num_layers):  # export is host-driven bookkeeping, not the decode path
        k, v, pos = store.hot.gather(layer, seq_ids, num_pages)  # [B, H, N, d], pos [B, H, N]
        ok = pos >= 0
        col = (pos.long() + pad).clamp(0, T - 1)
        b, h, n = ok.nonzero(as_tuple=True)
        keys[layer, b, h, col[b, h, n]] = k[b, h, n].to(geo.dtype)
        values[layer, b, h, col[b, h, n]] = v[b, h, n].to(geo.dtype)
    cols = torch.arange(T, device=geo.device)
    valid = cols.view(1, T) >= (T - lengths).view(B, 1)
    return BatchKV(keys, values, valid)


def _check_geometry(store: "KVStore", shape: tuple, num_q_heads: int | None = None) -> None:
    geo = store.geometry
    L, B, H, T, d = shape
    want = (geo.num_layers, geo.num_kv_heads, geo.head_dim, geo.num_q_heads)
    got = (L, H, d, num_q_heads if num_q_heads is not None else geo.num_q_heads)
    if got != want:
        raise ValueError(f"the batch has [L, Hkv, d, Hq] = {list(got)} but the store serves {list(want)}")


def _fresh_cache(store: "KVStore", batch: int, cache: KVStoreCache | None) -> KVStoreCache:
    if cache is None:
        cache = KVStoreCache(store)
    if cache.store is not store or cache.seq_ids is not None:
        raise ValueError("importing needs an empty KVStoreCache of the same store")
    cache.seq_ids = store.add_sequences(batch)
    cache._finalizer = weakref.finalize(cache, _release, weakref.ref(store), cache.seq_ids)
    return cache


def import_batch(store: "KVStore", kv: BatchKV, cache: KVStoreCache | None = None) -> KVStoreCache:
    """Put `kv`'s sequences into `store` as new sequences; returns the cache to decode on.

    `cache`: an empty cache of `store` to fill (e.g. a `TapCache`); a new one by default.
    The returned cache continues like the one the K/V came from (exactly when
    `exportable(store)`): pass it as `past_key_values` with the next token, an attention mask of
    T + 1 columns and explicit position_ids. Nothing of the model runs here.
    """
    geo = store.geometry
    _check_geometry(store, tuple(kv.keys.shape))
    L, B, H, T, d = kv.keys.shape
    keys = kv.keys.to(device=geo.device, dtype=geo.dtype)
    values = kv.values.to(device=geo.device, dtype=geo.dtype)
    valid = kv.valid.to(device=geo.device, dtype=torch.bool)
    cache = _fresh_cache(store, B, cache)
    q = torch.zeros(B, geo.num_q_heads, T, d, dtype=geo.dtype, device=geo.device)
    scale = d ** -0.5
    with torch.no_grad():
        for layer in range(L):  # one prefill call per layer, as the model's forward would make
            store.prefill(layer, cache.seq_ids, q, keys[layer], values[layer], valid, scale)
    for layer_cache in cache.layers:
        layer_cache.seen = T
    logger.debug("imported %d sequences of up to %d tokens", B, T)
    return cache


def replay_batch(store: "KVStore", trace: BatchTrace, cache: KVStoreCache | None = None) -> KVStoreCache:
    """Rebuild `trace`'s sequences in `store` by replaying the store calls the model made.

    One prefill call per layer over columns 0 .. prefill_columns-1, then per later column one
    `plan` and one `decode` per layer, with the recorded q/k/v: the store ends in the state the
    original run left it in (bit for bit where the store is deterministic), whatever the preset.
    The model never runs. Returns the cache to go on decoding with (as `import_batch`).
    """
    geo = store.geometry
    _check_geometry(store, tuple(trace.keys.shape), trace.queries.shape[2])
    L, B, H, T, d = trace.keys.shape
    dev = dict(device=geo.device, dtype=geo.dtype)
    q, k, v = trace.queries.to(**dev), trace.keys.to(**dev), trace.values.to(**dev)
    valid = trace.valid.to(device=geo.device, dtype=torch.bool)
    P = trace.prefill_columns
    cache = _fresh_cache(store, B, cache)
    with torch.no_grad():
        for layer in range(L):
            store.prefill(layer, cache.seq_ids, q[layer, :, :, :P], k[layer, :, :, :P], v[layer, :, :, :P],
                          valid[:, :P], trace.scale)
        for t in range(P, T):  # recovery replays each step the original run took (store work only)
            plan = store.plan(cache.seq_ids)
            c = slice(t, t + 1)
            for layer in range(L):
                store.decode(layer, plan, q[layer, :, :, c], k[layer, :, :, c], v[layer, :, :, c], trace.scale)
    for layer_cache in cache.layers:
        layer_cache.seen = T
    logger.debug("replayed %d sequences: prefill of %d columns + %d decode steps", B, P, T - P)
    return cache
