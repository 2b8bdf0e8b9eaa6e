"""gpu_kernels/pq_encode.py: the new token's PQ coding in one launch, against the torch reference (interpreter on
CPU), and through the store's selector (kernel path vs torch path)."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.pq_encode import pq_encode


def _device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _near_tie(k_new, centroids, seq_ids, rel=1e-5):
    """bool [B, H, m]: the two nearest centroids within `rel` of each other (either code is right there)."""
    B, H, d = k_new.shape
    m, dsub = centroids.shape[2], centroids.shape[4]
    dist = (k_new.float().view(B, H, m, 1, dsub) - centroids[seq_ids].float()).pow(2).sum(-1)
    two = dist.topk(2, -1, largest=False).values
    return (two[..., 1] - two[..., 0]) <= rel * two[..., 1].abs()


@pytest.mark.parametrize("m,K,dsub,dtype", [(2, 64, 64, torch.bfloat16), (4, 16, 8, torch.float16),
                                            (1, 256, 16, torch.float32)])
def test_the_kernel_codes_as_the_reference_does(m, K, dsub, dtype):
    dev = _device()
    g = torch.Generator().manual_seed(m * K + dsub)
    S, H, cap, B = 5, 3, 40, 3
    centroids = torch.randn(S, H, m, K, dsub, generator=g).half()
    seq_ids = torch.tensor([4, 0, 2])
    positions = torch.tensor([7, 39, 0])
    # keys near a centroid (a clear nearest one) or random (the usual case)
    k_new = torch.randn(B, H, m * dsub, generator=g).to(dtype)
    k_new[0] = centroids[4, :, :, 5].float().reshape(H, m * dsub).to(dtype)
    codes = torch.randint(0, K, (S, H, cap, m), generator=g, dtype=torch.uint8)
    want = codes.clone()
    reference.pq_encode(k_new, centroids, seq_ids, positions, want)
    got = codes.clone().to(dev)
    pq_encode(k_new.to(dev), centroids.to(dev), seq_ids.to(dev), positions.to(dev), got)
    got = got.cpu()
    assert not torch.equal(want, codes)  # the reference wrote the new codes
    tie = _near_tie(k_new, centroids, seq_ids)
    new_got, new_want = got[seq_ids, :, positions], want[seq_ids, :, positions]  # [B, H, m]
    assert torch.equal(new_got[~tie], new_want[~tie])
    assert (new_got[0] == 5).all()  # the key that is centroid 5 of every sub-space
    strided = codes.clone().to(dev)  # keys read at their strides: a [H, B, d] buffer seen as [B, H, d]
    pq_encode(k_new.transpose(0, 1).contiguous().transpose(0, 1).to(dev), centroids.to(dev), seq_ids.to(dev),
              positions.to(dev), strided)
    assert torch.equal(strided.cpu(), got)
    keep = torch.ones(S, H, cap, dtype=torch.bool)
    keep[seq_ids, :, positions] = False
    assert torch.equal(got[keep], codes[keep])  # nothing else touched


def test_bad_shapes_are_refused():
    cen = torch.zeros(2, 2, 2, 16, 8, dtype=torch.float16)
    codes = torch.zeros(2, 2, 10, 2, dtype=torch.uint8)
    seq, pos = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="disagree"):
        pq_encode(torch.zeros(1, 2, 12), cen, seq, pos, codes)
    with pytest.raises(ValueError, match="fp16"):
        pq_encode(torch.zeros(1, 2, 16), cen.float(), seq, pos, codes)


def test_the_selector_codes_the_same_through_the_kernel_and_torch():
    """pqcache's decode through `PQCacheSelector.append` with Triton (the kernel) and without (nine torch ops):
    the same codes after a few steps (random keys: no near ties at this size), and the kernel path's workspace
    has no torch-coding buffers."""
    from kvstore import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    def run(use_triton):
        L, Hq, Hkv, d, dtype = 1, 4, 2, 32, torch.float32
        config = KVStoreConfig.preset("pqcache", use_triton=use_triton, page_size=16, kmeans_iters=4, sink_tokens=4,
                                      window_tokens=16, budget_fraction=0.25, gpu_cache_tokens=32)
        dev = torch.device(_device())  # compiled kernels on a GPU, the interpreter on a CPU
        store = KVStore(config, ModelGeometry(L, Hq, Hkv, d, dtype, dev))
        store.cold_path.async_fetch = False
        g = torch.Generator().manual_seed(3)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(dev)

        T = 160
        ids = store.add_sequences(2)
        valid = torch.ones(2, T, dtype=torch.bool, device=dev)
        with torch.no_grad():
            store.prefill(0, ids, randn(2, Hq, T, d), randn(2, Hkv, T, d), randn(2, Hkv, T, d), valid, d ** -0.5)
            for _ in range(3):
                plan = store.plan(ids)
                store.decode(0, plan, randn(2, Hq, 1, d), randn(2, Hkv, 1, d), randn(2, Hkv, 1, d), d ** -0.5)
        sel = store.cold_path.selector
        return sel.codes[0, ids, :, T:T + 3].cpu(), sel._pq_kernels, plan.selection.ws

    got, kernel, ws = run("always")
    want, torch_path, _ = run("never")
    assert kernel and not torch_path and "diff" not in ws
    assert torch.equal(got, want)
