"""gpu_kernels/reference.py holds the naive versions tests compare against; the store's GPU path never
calls it. The GPU path is what runs with the Triton kernels on (`use_triton="always"`, here through the
interpreter): every preset generates with each reference function replaced by one that records its call."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import left_padded_batch, tiny_model
from gpu_kernels import reference
from kvstore import KVStoreClient, KVStoreConfig

#: small pages for every preset; the selection and LeanKV fields only where the preset uses them
#: (a field a configuration ignores is refused or warned about)
SMALL = dict(page_size=4, use_triton="always")
SELECTION = dict(kmeans_iters=4, sink_tokens=4, window_tokens=8, token_budget=8, pq_trainer="device")
LEANKV = dict(immune_tokens=4, score_queries=8)


@pytest.mark.parametrize("preset", ["full", "quant", "leankv", "pqcache", "tiered", "oracle"])
def test_the_kernel_path_calls_nothing_from_reference(preset, monkeypatch):
    called = []
    for name, fn in inspect.getmembers(reference, inspect.isfunction):
        if fn.__module__ == reference.__name__:
            monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: called.append(_n))
    model = tiny_model("llama")
    ids, mask = left_padded_batch(2, 40, pads=(6, 0))
    base = KVStoreConfig.preset(preset)
    overrides = {**SMALL, **(SELECTION if base.selector != "none" else {}),
                 **(LEANKV if base.hot_policy == "leankv" else {})}
    if base.selector not in ("none", "pq"):
        overrides.pop("kmeans_iters"), overrides.pop("pq_trainer")
    with KVStoreClient(KVStoreConfig.preset(preset, **overrides)).attach(model):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 43)
    assert called == [], f"{preset}: the kernel path called gpu_kernels.reference.{sorted(set(called))}"
