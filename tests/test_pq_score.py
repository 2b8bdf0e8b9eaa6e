"""gpu_kernels/pq_score.py: Triton scores equal the torch reference, which equals FAISS's asymmetric
distances with PQCache's GQA aggregation; the selected top-k equals the CPU retrieval service's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gpu_kernels import reference
from gpu_kernels.pq_score import pq_scores, pq_tables, pq_topk
from retrieval.codebook import train_codebook
from retrieval.exact import group_scores
from retrieval.service import RetrievalService, SearchRequest, adc_scores


#: where the kernels of the newer tests run: the GPU where Triton compiles, else the CPU (interpreter)
_DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def _inputs(B=2, Hq=8, Hkv=2, d=16, m=2, bits=6, S=5, cap=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = 1 << bits
    q = torch.randn(B, Hq, d, generator=g)
    cen = torch.randn(B, Hkv, m, K, d // m, generator=g)
    codes = torch.randint(0, K, (S, Hkv, cap, m), generator=g, dtype=torch.uint8)
    return q, cen, codes


@pytest.mark.parametrize("Hq,Hkv,m,bits,block", [(8, 2, 2, 6, 64), (4, 4, 4, 8, 32), (6, 2, 2, 4, 128)])
def test_triton_matches_reference(Hq, Hkv, m, bits, block):
    q, cen, codes = _inputs(Hq=Hq, Hkv=Hkv, m=m, bits=bits)
    table = reference.pq_tables(q, cen, 0.25).contiguous()
    seq_ids = torch.tensor([3, 0])
    lo, hi = torch.tensor([4, 4]), torch.tensor([250, 37])
    want = reference.pq_scores(table, codes, seq_ids, lo, hi, 250)
    got = pq_scores(table, codes, seq_ids, lo, hi, 250, block_n=block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[:, :, :4] == -1).all() and (got[1, :, 37:] == -1).all()
    torch.testing.assert_close(got[0, :, 4:250].sum(-1), torch.full((Hkv,), Hq / Hkv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,m,bits", [(8, 2, 2, 6), (6, 2, 4, 4), (4, 4, 1, 5)])
def test_table_kernel_matches_reference(Hq, Hkv, m, bits):
    """The ADC tables in one launch, from fp16 centroids read by sequence slot (a group of 3 pads to 4)."""
    d, S = 32, 5
    g = torch.Generator().manual_seed(Hq + m)
    q = torch.randn(3, Hq, d, generator=g).to(torch.bfloat16)
    cen = torch.randn(S, Hkv, m, 1 << bits, d // m, generator=g).to(torch.float16)
    seq_ids = torch.tensor([4, 0, 2])
    want = reference.pq_tables(q.float(), cen[seq_ids].float(), 0.3)
    q, cen, seq_ids = q.to(_DEV), cen.to(_DEV), seq_ids.to(_DEV)
    got = pq_tables(q, cen, seq_ids, 0.3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    out = torch.empty_like(got)
    assert pq_tables(q, cen, seq_ids, 0.3, out=out) is out and torch.equal(out, got)
    with pytest.raises(ValueError, match="fp16 centroids"):
        pq_tables(q, cen.float(), seq_ids, 0.3)


def test_excluded_tokens_score_minus_one_and_stay_in_the_denominators():
    """tiered's residency rows ([L, S, Hkv, cap + 1], one layer's view by sequence slot): the kernel's second
    pass scores the excluded tokens -1; the others keep the scores they have without the exclusion."""
    q, cen, codes = _inputs(Hq=8, Hkv=2, m=2, bits=6)
    table = reference.pq_tables(q, cen, 0.25).contiguous()
    seq_ids, lo, hi = torch.tensor([3, 0]), torch.tensor([4, 4]), torch.tensor([250, 37])
    resident = torch.rand(2, 5, 2, 301, generator=torch.Generator().manual_seed(1)) < 0.3  # [L, S, Hkv, cap + 1]
    excl = resident[1]
    plain = reference.pq_scores(table, codes, seq_ids, lo, hi, 250)
    want = reference.pq_scores(table, codes, seq_ids, lo, hi, 250, exclude=excl)
    got = pq_scores(*(t.to(_DEV) for t in (table, codes, seq_ids, lo, hi)), 250, block_n=64,
                    exclude=excl.to(_DEV)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    hit = excl[seq_ids][:, :, :250]
    assert hit.any() and (got[hit] == -1).all()
    torch.testing.assert_close(got[~hit], plain[~hit], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exclude"):
        pq_scores(table, codes, seq_ids, lo, hi, 250, exclude=excl[:, :, :100])


def test_empty_candidates_and_bad_input():
    q, cen, codes = _inputs()
    table = reference.pq_tables(q, cen, 1.0).contiguous()
    out = pq_scores(table, codes, torch.tensor([1, 2]), torch.tensor([5, 5]), torch.tensor([5, 5]), 20, block_n=16)
    assert (out == -1).all()
    with pytest.raises(ValueError, match="codes"):
        pq_scores(table, codes.long(), torch.tensor([1, 2]), torch.tensor([5, 5]), torch.tensor([5, 5]), 20)
    with pytest.raises(ValueError, match="cap"):
        pq_scores(table, codes, torch.tensor([1, 2]), torch.tensor([5, 5]), torch.tensor([5, 5]), 301)


def test_scores_equal_faiss_asymmetric_distances():
    """The GPU path's logits are FAISS's ADC inner products for the same codebooks and codes."""
    rng = np.random.default_rng(0)
    Hq, Hkv, d, n = 4, 2, 16, 400
    keys = rng.normal(size=(Hkv, n, d)).astype(np.float32)
    cb = train_codebook(keys, n, m=2, bits=6, iters=5)
    q = rng.normal(size=(Hq, d)).astype(np.float32)
    scale = d ** -0.5
    codes = torch.from_numpy(cb.codes).unsqueeze(0)  # [1, Hkv, n, m]
    table = reference.pq_tables(torch.from_numpy(q)[None], torch.from_numpy(cb.centroids)[None], scale).contiguous()
    got = pq_scores(table, codes, torch.tensor([0]), torch.tensor([0]), torch.tensor([n]), n, block_n=128)[0]
    G = Hq // Hkv
    for h in range(Hkv):
        faiss_logits = adc_scores(cb.centroids[h], cb.codes[h], q[h * G:(h + 1) * G]) * scale  # [G, n]
        want = group_scores(faiss_logits)
        np.testing.assert_allclose(got[h].numpy(), want, rtol=1e-4, atol=1e-6)


def test_gpu_topk_equals_retrieval_service():
    rng = np.random.default_rng(1)
    Hq, Hkv, d, n, S, k = 8, 2, 32, 600, 4, 40
    keys = rng.normal(size=(Hkv, n, d)).astype(np.float32)
    cb = train_codebook(keys[:, S:], n - S, m=4, bits=8, iters=5)
    q = rng.normal(size=(Hq, d)).astype(np.float32)
    codes = torch.zeros(1, Hkv, n, 4, dtype=torch.uint8)
    codes[0, :, S:] = torch.from_numpy(cb.codes)
    table = reference.pq_tables(torch.from_numpy(q)[None], torch.from_numpy(cb.centroids)[None], 0.2).contiguous()
    scores = pq_scores(table, codes, torch.tensor([0]), torch.tensor([S]), torch.tensor([n]), n, block_n=256)
    _, idx = pq_topk(scores, k)
    with RetrievalService(2) as svc:
        want = svc.submit([SearchRequest(cb.centroids, cb.codes, q, S, n, k, 0.2, start=S)]).result()[0]
    for h in range(Hkv):
        assert set(idx[0, h].tolist()) == set(want[h].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_reference():
    q, cen, codes = _inputs(B=3, Hq=32, Hkv=8, d=128, m=2, bits=6, S=4, cap=5000, seed=2)
    table = reference.pq_tables(q, cen, 128 ** -0.5).contiguous()
    seq_ids, lo, hi = torch.tensor([3, 0, 2]), torch.tensor([32, 32, 0]), torch.tensor([4900, 1000, 5000])
    want = reference.pq_scores(table, codes, seq_ids, lo, hi, 5000)
    got = pq_scores(table.cuda(), codes.cuda(), seq_ids.cuda(), lo.cuda(), hi.cuda(), 5000)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
