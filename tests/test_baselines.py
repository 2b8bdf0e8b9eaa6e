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


def test_h2o_prefill_chunks_and_padding():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    torch.testing.assert_close(h2o_prefill_scores(q, k, 0.3, chunk=2), h2o_prefill_scores(q, k, 0.3, chunk=512))
    # a left-padded row: its first 3 columns neither attend nor get attention
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    s = h2o_prefill_scores(q, k, 0.3, key_valid=valid)
    assert (s[1, :, :3] == 0).all()
    torch.testing.assert_close(s[1, :, 3:], h2o_prefill_scores(q[1:, :, 3:], k[1:, :, 3:], 0.3)[0])


# ---- the baselines as store selectors (kvstore/cold/baselines.py) -------------------------

from kvstore.cold.baselines import KEEP, H2OSelector, QuestSelector, SnapKVSelector, StreamingSelector  # noqa: E402
from kvstore.config import KVStoreConfig  # noqa: E402
from kvstore.geometry import ModelGeometry  # noqa: E402
from kvstore.plan import SelectionStep  # noqa: E402


def _selector(cls, attrs=None, **config):
    geo = ModelGeometry(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                        device=torch.device("cpu"))
    cfg = KVStoreConfig(hot_policy="window", selector=cls.name, cold_tier=True, **config)
    sel = cls(cfg, geo, None)
    for name, value in (attrs or {}).items():  # hand-case sizes instead of the class defaults
        setattr(sel, name, value)
    sel.ensure(1, 64)
    return sel


def _step(position: int, lo: int, hi: int, k: int) -> SelectionStep:
    t = lambda x: torch.tensor([x])  # noqa: E731
    return SelectionStep(t(0), t(position), t(lo), t(hi), t(k), hi, min(k, hi - lo), True)


def test_streaming_selector_takes_the_most_recent_candidates():
    sel = _selector(StreamingSelector)
    pos, valid = sel.select(0, _step(10, lo=2, hi=8, k=3), torch.zeros(1, 2, 2), 1.0)
    assert sorted(pos[0, 0].tolist()) == [5, 6, 7] and valid.all()


def test_quest_selector_pages_follow_prefill_and_appends():
    sel = _selector(QuestSelector, {"PAGE": 2})  # the hand case's pages (class default 16)
    keys = _quest_keys()  # [1, 1, 5, 2]
    pos = torch.arange(5).view(1, 5)
    sel.prefill(0, torch.tensor([0]), keys, pos, torch.ones(1, 5, dtype=torch.bool), torch.tensor([5]), torch.tensor([5]))
    kmin, kmax = quest_page_bounds(keys, 2)
    assert sel.kmin[0, 0, :3, 0].tolist() == kmin[0, 0].tolist()
    assert sel.kmax[0, 0, :3, 0].tolist() == kmax[0, 0].tolist()
    # token 5 joins page 2: [1, 1] and [-3, 0] -> min [-3, 0], max [1, 1]
    step = _step(5, lo=0, hi=6, k=2)
    sel.append(0, step, torch.tensor([[[-3.0, 0.0]]]))
    assert sel.kmin[0, 0, 2, 0].tolist() == [-3.0, 0.0] and sel.kmax[0, 0, 2, 0].tolist() == [1.0, 1.0]
    # q = [-1, 2] (both query heads): bounds page0 8, page1 0.5, page2 max(3, -1) + max(0, 2) = 5
    q = torch.tensor([[[-1.0, 2.0], [-1.0, 2.0]]])
    s = sel.scores(0, step, q, 1.0)[0, 0]
    assert s.tolist() == [7.5, 7.5, 0.0, 0.0, 4.5, 4.5]  # bound - min candidate bound (0.5)
    chosen, valid = sel.select(0, step, q, 1.0)
    assert sorted(chosen[0, 0].tolist()) == [0, 1] and valid.all()


def test_h2o_selector_scores_with_past_attention_then_accumulates():
    sel = _selector(H2OSelector)
    q = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # [1, Hq=2, T=2, 2]
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
    pos, valid = torch.arange(2).view(1, 2), torch.ones(1, 2, dtype=torch.bool)
    sel.prefill(0, torch.tensor([0]), k, pos, valid, torch.tensor([2]), torch.tensor([2]))
    sel.prefill_queries(0, torch.tensor([0]), q, k, pos, valid, 1.0)
    # head 0 (q = [1, 0]): query 0 -> [1, 0]; query 1 -> [1/4, 3/4]. head 1 (q = [0, 1]): [1, 0]; [1/2, 1/2]
    torch.testing.assert_close(sel.acc[0, 0, 0, :2], torch.tensor([2.75, 1.25]))
    # decode step at position 2 with key [0, 0]: scores are the accumulation so far
    step = _step(2, lo=0, hi=2, k=1)
    sel.append(0, step, torch.tensor([[[0.0, 0.0]]]))
    qd = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    s = sel.scores(0, step, qd, 1.0)
    torch.testing.assert_close(s[0, 0], torch.tensor([2.75, 1.25]))
    # then this step's attention is added: softmax([0, ln 3, 0]) = [1/5, 3/5, 1/5] per head, x2 heads
    torch.testing.assert_close(sel.acc[0, 0, 0, :3], torch.tensor([3.15, 2.45, 0.4]))


def test_snapkv_selector_votes_and_keeps_the_window():
    sel = _selector(SnapKVSelector, {"WINDOW": 1, "KERNEL": 1})
    k = torch.tensor([0.0, 0.0, math.log(4.0), 0.0, 0.0, 0.0]).view(1, 1, 6, 1).expand(1, 1, 6, 2).clone()
    k[..., 1] = 0.0
    q = torch.zeros(1, 2, 6, 2)
    q[..., 0] = 1.0
    pos, valid = torch.arange(6).view(1, 6), torch.ones(1, 6, dtype=torch.bool)
    sel.prefill_queries(0, torch.tensor([0]), q, k, pos, valid, 1.0)
    torch.testing.assert_close(sel.votes[0, 0, 0, :5], 2 * torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0]) / 9)
    assert sel.votes[0, 0, 0, 5] == KEEP and sel.votes[0, 0, 0, 6] == KEEP  # window + future tokens
    chosen, _ = sel.select(0, _step(7, lo=0, hi=7, k=2), q[:, :, 0], 1.0)
    assert sorted(chosen[0, 0].tolist()) == [5, 6]  # KEEP beats every vote


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv", "quest"])
def test_baseline_with_budget_over_the_context_equals_full(name):
    """Every candidate selected: attention over all tokens, so the logits match the full preset."""
    from kvstore import KVStoreClient

    from tests.conftest import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cfg = KVStoreConfig(hot_policy="window", selector=name, cold_tier=True, sink_tokens=4, token_budget=1000)
        with KVStoreClient(cfg).attach(model):
            out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
