"""Shared fixtures: tiny random Hugging Face models of every supported family."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in the interpreter on CPU

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A random-weight causal LM of `family` with a tiny config (eval mode)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval().to(dtype)


def left_padded_batch(batch: int = 3, length: int = 20, pads=(5, 2, 0), vocab: int = 128, seed: int = 1):
    """input_ids, attention_mask with left padding (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads[:batch]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def pages_all_free_after_each_test():
    """Page accounting returns to all-free once a test's sequences are gone."""
    yield
    import gc

    from kvstore.store import LIVE_STORES

    gc.collect()
    for store in list(LIVE_STORES):
        assert not store.active, f"{len(store.active)} sequences still live after the test"
        assert store.hot.pool.all_free(), f"{store.hot.pool.num_used} pages leaked"
