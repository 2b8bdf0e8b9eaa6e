"""Move sequences between stores: export their K/V, import it so decoding goes on without prefill.

The cluster layer (cluster/) uses this to hand a sequence from a dead worker to a new one. It
needs three things from the store, all built here on the store's public entry points:

* `TapCache`: a `KVStoreCache` that also hands every layer's new post-RoPE K/V (exactly what the
  store receives) to a callback, so a caller can mirror it to host memory as it is produced.
* `export_batch(cache)`: the K/V of every token of every layer of a cache's sequences, as dense
  tensors in the padded timeline layout below. It reads the hot tier, which is exact only while
  the hot tier keeps every token at the model's dtype (the `full` preset); otherwise it raises.
* `import_batch(store, kv)`: a fresh `KVStoreCache` holding `kv`'s tokens. It runs the store's
  own prefill entry point per layer on the given K/V (queries are zeros, so the hot policy sees
  no attention mass), which puts the tokens exactly where a model prefill would have put them
  under policies that do not score by attention ("all", "window"). The model itself never runs.

Padded timeline layout (what a left-padded HF batch looks like after T tokens were fed)::

      column:      0   1   2   3   4   5        valid[b, t]: token t of row b exists
      row 0:       .   .   a0  a1  a2  a3       keys[l, b, h, t]: its post-RoPE key at layer l
      row 1:       b0  b1  b2  b3  b4  b5       positions of row b: 0 .. n_b - 1 from the left

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


class TapCache(KVStoreCache):
    """A KVStoreCache that hands each layer's new K/V to `on_kv(layer, k, v)` before storing it.

    k, v: [B, Hkv, T, d] post-RoPE at the model's dtype (T = prompt length at prefill, 1 at
    decode; padding columns included). The callback must not keep references it mutates.
    """

    def __init__(self, store: "KVStore", on_kv: Callable[[int, torch.Tensor, torch.Tensor], None]):
        super().__init__(store)
        self.on_kv = on_kv

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.on_kv(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def exportable(store: "KVStore") -> bool:
    """Whether `export_batch` can read this store's sequences exactly from the hot tier."""
    return store.config.hot_policy == "all" and not store.config.quantized


def export_batch(cache: KVStoreCache) -> BatchKV:
    """Every token's K/V of a cache's sequences (all layers), in the padded timeline layout.

    Reads the hot tier; raises ValueError when the hot tier does not hold every token exactly
    (mirror the K/V as it is produced with `TapCache` instead). Not a decode-path operation: it
    gathers every page and syncs the host.
    """
    store = cache.store
    if not exportable(store):
        raise ValueError(
            f"export_batch reads the hot tier, which under preset {store.config.name!r} "
            f"(hot_policy={store.config.hot_policy!r}, key_bits={store.config.key_bits}) does not hold every token "
            "exactly; mirror the K/V with TapCache as it is produced"
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


def import_batch(store: "KVStore", kv: BatchKV, cache: KVStoreCache | None = None) -> KVStoreCache:
    """Put `kv`'s sequences into `store` as new sequences; returns the cache to decode on.

    `cache`: an empty cache of `store` to fill (e.g. a `TapCache`); a new one by default.

    The returned cache continues exactly like the one the K/V came from: pass it as
    `past_key_values` with the next token, an attention mask of T + 1 columns and explicit
    position_ids. Nothing of the model runs here.
    """
    geo = store.geometry
    L, B, H, T, d = kv.keys.shape
    if (L, H, d) != (geo.num_layers, geo.num_kv_heads, geo.head_dim):
        raise ValueError(
            f"BatchKV has [L, Hkv, d] = [{L}, {H}, {d}] but the store serves [{geo.num_layers}, "
            f"{geo.num_kv_heads}, {geo.head_dim}]"
        )
    keys = kv.keys.to(device=geo.device, dtype=geo.dtype)
    values = kv.values.to(device=geo.device, dtype=geo.dtype)
    valid = kv.valid.to(device=geo.device, dtype=torch.bool)
    if cache is None:
        cache = KVStoreCache(store)
    if cache.store is not store or cache.seq_ids is not None:
        raise ValueError("import_batch needs an empty KVStoreCache of the same store")
    cache.seq_ids = store.add_sequences(B)
    cache._finalizer = weakref.finalize(cache, _release, weakref.ref(store), cache.seq_ids)
    q = torch.zeros(B, geo.num_q_heads, T, d, dtype=geo.dtype, device=geo.device)
    scale = d ** -0.5
    with torch.no_grad():
        for layer in range(L):  # one prefill call per layer, as the model's forward would make
            store.prefill(layer, cache.seq_ids, q, keys[layer], values[layer], valid, scale)
    for layer_cache in cache.layers:
        layer_cache.seen = T
    logger.debug("imported %d sequences of up to %d tokens", B, T)
    return cache
