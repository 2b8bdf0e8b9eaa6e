"""The model a store serves: its attention shape and device (`ModelGeometry`), and whether the
Triton kernels run there (`use_triton`). Both wings read them: the hot tier (kvstore/hot/) and
the cold path (kvstore/cold/)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvstore.config import KVStoreConfig


@dataclass(frozen=True)
class ModelGeometry:
    """The attention shape of the model a store serves."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def dense_bytes_per_token(self) -> int:
        """Bytes the model's own dense cache spends on one token, all layers and KV heads."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def use_triton(config: KVStoreConfig, device: torch.device) -> bool:
    """Whether the Triton kernels run: "always", or "auto" on CUDA; otherwise the torch references.
    "always" off CUDA needs Triton's interpreter (TRITON_INTERPRET=1): ValueError otherwise."""
    on_cuda = torch.device(device).type == "cuda"
    if config.use_triton == "always" and not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"use_triton='always' on a {torch.device(device).type} store needs TRITON_INTERPRET=1 "
                         "(compiled Triton kernels take CUDA tensors only); use 'auto' for the torch paths")
    return config.use_triton == "always" or (config.use_triton == "auto" and on_cuda)


def pow2(n: int) -> bool:
    """n is a power of two (a Triton block's size: kernels take such head dims, groups, centroid counts)."""
    return n > 0 and not n & (n - 1)
