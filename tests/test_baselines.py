"""Baseline selectors (StreamingLLM, H2O, SnapKV, Quest) against small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.baselines import (
    attention_probs,
    h2o_prefill_scores,
    h2o_update,
    quest_page_bounds,
    quest_page_scores,
    quest_select,
    select_topk,
    snapkv_scores,
    streaming_keep,
    streaming_scores,
)


def test_select_topk_ties_masks_and_short_rows():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5]])
    assert select_topk(scores, 2).tolist() == [[1, 3]]  # tie: lower index first
    cand = torch.tensor([[True, False, True, True]])
    assert select_topk(scores, 2, cand).tolist() == [[3, 2]]
    assert select_topk(scores, 5, cand).tolist() == [[3, 2, 0, -1, -1]]
    assert select_topk(scores, 0).shape == (1, 0)
    with pytest.raises(ValueError, match="k must be"):
        select_topk(scores, -1)


def test_streaming_keeps_sinks_and_window_and_extends_the_window_under_a_budget():
    keep = streaming_keep(torch.tensor([10, 4]), sink_tokens=2, window_tokens=3, max_tokens=10)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    pos = torch.arange(10)
    # candidates: neither sink nor window; the budget goes to the most recent of them
    cand = ~keep[0]
    assert select_topk(streaming_scores(pos), 2, cand).tolist() == [6, 5]


def test_attention_probs_hand_case():
    q = torch.tensor([[[1.0, 0.0]]])  # B=1, Hq=1, d=2
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 5.0]]]])  # B=1, Hkv=1, N=2
    p = attention_probs(q, k, scale=1.0)
    torch.testing.assert_close(p, torch.tensor([[[0.25, 0.75]]]))
    p = attention_probs(q, k, 1.0, valid=torch.tensor([[[True, False]]]))
    torch.testing.assert_close(p, torch.tensor([[[1.0, 0.0]]]))


def test_h2o_accumulates_over_steps_and_the_gqa_group():
    acc = torch.zeros(1, 1, 3)
    step1 = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]])  # Hq=2 in one KV head
    step2 = torch.tensor([[[0.2, 0.2, 0.6], [0.2, 0.2, 0.6]]])
    acc = h2o_update(acc, step1)
    torch.testing.assert_close(acc, torch.tensor([[[0.6, 1.05, 0.35]]]))
    assert select_topk(acc, 1).tolist() == [[[1]]]
    acc = h2o_update(acc, step2)
    torch.testing.assert_close(acc, torch.tensor([[[1.0, 1.45, 1.55]]]))
    assert select_topk(acc, 2).tolist() == [[[2, 1]]]


def test_h2o_prefill_is_causal():
    # query 0 sees only key 0 -> [1, 0]; query 1 -> softmax([0, ln 3]) = [1/4, 3/4]
    q = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
    torch.testing.assert_close(h2o_prefill_scores(q, k, 1.0), torch.tensor([[[1.25, 0.75]]]))


def test_snapkv_votes_pools_and_sums_the_group():
    # one window query (W=1) at position 5 over keys with logits [0, 0, ln 4, 0, 0, 0]:
    # exp = [1, 1, 4, 1, 1, 1] / 9; prefix (first 5) = [1, 1, 4, 1, 1] / 9
    k = torch.tensor([0.0, 0.0, math.log(4.0), 0.0, 0.0, 0.0]).view(1, 1, 6, 1)
    q = torch.ones(1, 1, 1, 1)
    ninth = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0]) / 9
    torch.testing.assert_close(snapkv_scores(q, k, 1.0, kernel_size=1)[0, 0], ninth)
    pooled = torch.tensor([1.0, 4.0, 4.0, 4.0, 1.0]) / 9
    torch.testing.assert_close(snapkv_scores(q, k, 1.0, kernel_size=3)[0, 0], pooled)
    # two query heads in one KV head: votes add up
    q2 = torch.ones(1, 2, 1, 1)
    torch.testing.assert_close(snapkv_scores(q2, k, 1.0, kernel_size=1)[0, 0], 2 * ninth)


def test_snapkv_window_queries_attend_causally():
    # N=3, W=2. Query at position 1 sees keys 0,1: [1/2, 1/2]; prefix share of key 0 = 1/2.
    # Query at position 2 sees keys 0..2 with logits [0, 0, ln 2]: [1/4, 1/4, 1/2] -> 1/4.
    k = torch.tensor([0.0, 0.0, math.log(2.0)]).view(1, 1, 3, 1)
    q = torch.ones(1, 1, 2, 1)
    torch.testing.assert_close(snapkv_scores(q, k, 1.0, kernel_size=1), torch.tensor([[[0.75]]]))
    with pytest.raises(ValueError, match="odd"):
        snapkv_scores(q, k, 1.0, kernel_size=2)
    with pytest.raises(ValueError, match="observation window"):
        snapkv_scores(torch.ones(1, 1, 4, 1), k, 1.0)


def _quest_keys():
    # 5 tokens, d=2, pages of 2: [k0 k1] [k2 k3] [k4]
    return torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.5, 0.5], [2.0, -2.0], [1.0, 1.0]]).view(1, 1, 5, 2)


def test_quest_bounds_and_scores_hand_case():
    kmin, kmax = quest_page_bounds(_quest_keys(), page_size=2)
    assert kmin[0, 0].tolist() == [[-2.0, -1.0], [0.5, -2.0], [1.0, 1.0]]
    assert kmax[0, 0].tolist() == [[1.0, 3.0], [2.0, 0.5], [1.0, 1.0]]
    # q=[1,1]: page0 max(-2,1)+max(-1,3)=4; page1 max(.5,2)+max(-2,.5)=2.5; page2 2
    s = quest_page_scores(torch.tensor([[[1.0, 1.0]]]), kmin, kmax)
    assert s[0, 0].tolist() == [4.0, 2.5, 2.0]
    # q=[-1,2]: page0 2+6=8; page1 -0.5+1=0.5; page2 -1+2=1. Group of both heads: max per page.
    s = quest_page_scores(torch.tensor([[[1.0, 1.0], [-1.0, 2.0]]]), kmin, kmax)
    assert s[0, 0].tolist() == [8.0, 2.5, 2.0]
    q = torch.tensor([[[-1.0, 2.0]]])
    assert quest_select(q, kmin, kmax, page_size=2, budget=4, num_tokens=5).tolist() == [[[0, 1, 4, -1]]]
    assert quest_select(q, kmin, kmax, page_size=2, budget=2, num_tokens=5).tolist() == [[[0, 1]]]


def test_quest_bound_is_an_upper_bound_and_empty_pages_never_win():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 37, 8, generator=g)
    q = torch.randn(2, 4, 8, generator=g)
    valid = torch.ones(2, 2, 37, dtype=torch.bool)
    valid[:, :, 32:] = False  # the last page holds no valid token
    kmin, kmax = quest_page_bounds(k, 4, valid)
    bound = quest_page_scores(q, kmin, kmax)  # [2, 2, 10]
    qk = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 2, 8), k).amax(2)  # max over the group
    exact = torch.nn.functional.pad(qk, (0, 3), value=float("-inf")).view(2, 2, 10, 4)
    exact = exact.masked_fill(~torch.nn.functional.pad(valid, (0, 3)).view(2, 2, 10, 4), float("-inf")).amax(-1)
    assert (bound[..., :8] >= exact[..., :8] - 1e-5).all()
    assert torch.isinf(bound[..., 9]).all() and (bound[..., 9] < 0).all()
    assert (select_topk(bound, 9) != 9).all()
