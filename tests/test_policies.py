"""Hot-tier policies: one shared matrix every policy joins, plus each policy's own invariants.

The store is driven directly (no HF model): prefill a left-padded batch, decode some steps,
and compare what the hot tier holds with what the policy promises, and the attention output
with the reference over exactly those tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from gpu_kernels import reference
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry
from kvstore.store import KVStore

L, HQ, HKV, D = 2, 4, 2, 16


def _geometry(dtype=torch.float32):
    return ModelGeometry(num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=dtype,
                         device=torch.device("cpu"))


def _config(policy: str, **kw) -> KVStoreConfig:
    base = dict(hot_policy=policy, page_size=4, sink_tokens=3)
    if policy == "window":
        base.update(cold_tier=True, window_tokens=5)
    base.update(kw)
    return KVStoreConfig(**base)


def _expected_positions(policy: str, config: KVStoreConfig, prompt_len: int, now: int) -> set[int]:
    """Positions the hot tier of every head must hold once tokens [0, now) are stored."""
    if policy == "all":
        return set(range(now))
    W = config.window_for(prompt_len)
    first = max(config.sink_tokens, prompt_len - W)
    return set(range(min(config.sink_tokens, now))) | set(range(max(first, now - W), now))


class _Driver:
    """Runs prefill + decode on a store and keeps the full K/V history for the reference."""

    def __init__(self, store: KVStore, prompt_lens: list[int], seed: int = 0):
        self.store = store
        self.g = torch.Generator().manual_seed(seed)
        B, T = len(prompt_lens), max(prompt_lens)
        self.valid = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(prompt_lens):
            self.valid[b, T - n:] = True  # left padding
        self.prompt_lens = prompt_lens
        self.seq_ids = store.add_sequences(B)
        self.hist_k = [[[] for _ in range(B)] for _ in range(L)]
        self.hist_v = [[[] for _ in range(B)] for _ in range(L)]
        self.scale = D ** -0.5

    def _rand(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def prefill(self, chunks: int = 1):
        """The prompts, in `chunks` chunks of columns (chunked prefill)."""
        B, T = self.valid.shape
        for cols in torch.arange(T).chunk(chunks):
            valid, c = self.valid[:, cols], len(cols)
            for layer in range(L):
                q, k, v = self._rand(B, HQ, c, D), self._rand(B, HKV, c, D), self._rand(B, HKV, c, D)
                self.store.prefill(layer, self.seq_ids, q, k, v, valid, self.scale)
                for b in range(B):
                    self.hist_k[layer][b] += list(k[b, :, valid[b]].unbind(1))
                    self.hist_v[layer][b] += list(v[b, :, valid[b]].unbind(1))

    def step(self, layers: int = L):
        """One decode step over the first `layers` layers (fewer: a step stopped part-way);
        returns (plan, [per layer: (out, q)])."""
        B = self.seq_ids.numel()
        plan = self.store.plan(self.seq_ids)
        results = []
        for layer in range(layers):
            q, k, v = self._rand(B, HQ, 1, D), self._rand(B, HKV, 1, D), self._rand(B, HKV, 1, D)
            out = self.store.decode(layer, plan, q, k, v, self.scale)
            for b in range(B):
                self.hist_k[layer][b].append(k[b, :, 0])
                self.hist_v[layer][b].append(v[b, :, 0])
            results.append((out, q))
        return plan, results

    def release(self, rows: list[int]) -> None:
        """End the sequences of these batch rows (the store frees their slots and pages); the rest go on."""
        self.store.release(self.seq_ids[rows])
        keep = [b for b in range(self.seq_ids.numel()) if b not in rows]
        self.seq_ids, self.valid = self.seq_ids[keep], self.valid[keep]
        self.prompt_lens = [self.prompt_lens[b] for b in keep]
        for hist in (self.hist_k, self.hist_v):
            for layer in range(L):
                hist[layer] = [hist[layer][b] for b in keep]

    def hot_positions(self, layer: int, b: int, h: int) -> list[int]:
        _, _, pos = self.store.hot.gather(layer, self.seq_ids[b:b + 1], self.store.hot.pages_in_use(self.seq_ids))
        p = pos[0, h]
        return sorted(p[p >= 0].tolist())

    def expected_out(self, layer: int, b: int, q: torch.Tensor, positions: list[int]) -> torch.Tensor:
        k = torch.stack(self.hist_k[layer][b], 1)[:, positions]  # [H, n, D]
        v = torch.stack(self.hist_v[layer][b], 1)[:, positions]
        valid = torch.ones(1, HKV, len(positions), dtype=torch.bool)
        out, _, _ = reference.decode_attention(q[b:b + 1, :, 0], k[None], v[None], valid, self.scale)
        return out[0]


POLICY_MATRIX = ["all", "window"]


@pytest.mark.parametrize("policy", POLICY_MATRIX)
@pytest.mark.parametrize("prompt_lens", [[13, 9], [2, 21]], ids=["long", "short-prompt"])
def test_policy_keeps_what_it_promises_and_attends_exactly_that(policy, prompt_lens):
    config = _config(policy)
    store = KVStore(config, _geometry())
    drv = _Driver(store, prompt_lens)
    drv.prefill()
    for step in range(12):
        plan, results = drv.step()
        for b, n in enumerate(prompt_lens):
            now = n + step + 1
            expect = _expected_positions(policy, config, n, now)
            for layer in range(L):
                for h in range(HKV):
                    assert drv.hot_positions(layer, b, h) == sorted(expect)
                out, q = results[layer]
                want = drv.expected_out(layer, b, q, sorted(expect))
                torch.testing.assert_close(out[b, :, 0].float(), want, rtol=1e-5, atol=1e-5)
    store.release(drv.seq_ids)
    assert store.hot.pool.all_free()


def test_window_reuses_the_leaving_tokens_slot_and_reports_it():
    config = _config("window")
    store = KVStore(config, _geometry())
    drv = _Driver(store, [13, 9])
    drv.prefill()
    used = store.hot.pool.num_used
    W = config.window_tokens
    for step in range(10):
        before = store.hot.pool.slot_pos.clone()
        plan, _ = drv.step()
        pos = plan.positions
        # every (layer, head) of a sequence evicts the token W back, or nothing while filling
        for b, n in enumerate([13, 9]):
            leaving = int(pos[b]) - W
            first = max(config.sink_tokens, n - W)
            want = leaving if leaving >= first else -1
            assert (plan.evicted_pos[b] == want).all()
            if want >= 0:  # the new token's slot held exactly the leaving token
                held = before[plan.page[b].long(), plan.slot[b].long()]
                assert (held == want).all()
        assert store.hot.pool.num_used == used  # full windows: no new page, ever
    store.release(drv.seq_ids)


def test_window_size_is_fixed_per_sequence_from_its_prompt():
    config = _config("window", window_tokens=None, sink_tokens=2, budget_fraction=0.5, window_share=0.5)
    store = KVStore(config, _geometry())
    lens = [21, 10]
    drv = _Driver(store, lens)
    drv.prefill()
    for _ in range(6):
        drv.step()
    for b, n in enumerate(lens):
        W = config.window_for(n)  # 4 and 2: different per sequence, fixed at prefill
        now = n + 6
        assert drv.hot_positions(1, b, 0) == sorted(set(range(2)) | set(range(now - W, now)))
    store.release(drv.seq_ids)


def test_window_refuses_chunked_prefill():
    store = KVStore(_config("window"), _geometry())
    drv = _Driver(store, [6])
    drv.prefill()
    with pytest.raises(NotImplementedError, match="chunked prefill"):
        drv.prefill()
    store.release(drv.seq_ids)


def test_window_config_constructible_with_cold_tier():
    config = KVStoreConfig(hot_policy="window", selector="none", cold_tier=True)
    assert config.hot_policy == "window"
    with pytest.raises(ValueError, match="hot_policy"):
        KVStoreConfig(hot_policy="window", selector="none", cold_tier=False)


# ---- LeanKV ---------------------------------------------------------------------------------

def _leankv_config(**kw) -> KVStoreConfig:
    base = dict(hot_policy="leankv", key_bits=8, value_bits=4, low_key_bits=4, low_value_bits=2, page_size=4,
                immune_tokens=4, score_queries=8, alpha_prune=0.5, alpha_quant=2.0)
    base.update(kw)
    return KVStoreConfig(**base)


def _tiers(store: KVStore, seq_id: int) -> dict[tuple[int, int], tuple[set[int], set[int]]]:
    """(layer, head) -> (positions in the high tier, positions in the low tier)."""
    hot, t = store.hot, store.hot.table
    out = {}
    for layer in range(L):
        for h in range(HKV):
            pages = t.pages[seq_id, layer, h]
            n, nlp, C = int(t.num_tokens[seq_id, layer, h]), int(t.num_low_pages[seq_id, layer, h]), pages.numel()
            high = {int(hot.pool.slot_pos[pages[i // hot.tokens_per_page], i % hot.tokens_per_page]) for i in range(n)}
            low = set()
            for j in range(nlp):
                low |= set(hot.pool.slot_pos[pages[C - 1 - j], : hot.low_tokens_per_page].tolist())
            out[layer, h] = (high - {-1}, low - {-1})
    return out


class _PeakyDriver(_Driver):
    def _rand(self, *shape):
        return torch.randn(*shape, generator=self.g) * 2.5  # peaky attention: some tokens score low


@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_leankv_invariants(use_triton):
    if use_triton == "always" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the store runs on the CPU here: Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    config = _leankv_config(use_triton=use_triton)
    store = KVStore(config, _geometry())
    lens = [24, 13]
    drv = _PeakyDriver(store, lens, seed=1)
    drv.prefill()
    before = [_tiers(store, int(s)) for s in drv.seq_ids]
    pruned = demoted = 0
    for step in range(14):
        plan, results = drv.step()
        for b, n in enumerate(lens):
            now = n + step + 1
            after = _tiers(store, int(drv.seq_ids[b]))
            for key, (hi, lo) in after.items():
                hi0, lo0 = before[b][key]
                assert set(range(max(0, now - config.immune_tokens), now)) <= hi  # immune window, new token included
                assert not hi & lo
                gone = (hi0 | lo0) - (hi | lo)
                down = (hi0 & lo)
                assert len(gone) <= 1 and len(down) <= 1, (step, key, gone, down)  # one prune, one demotion
                assert (hi | lo) <= set(range(now)) and (hi | lo) - (hi0 | lo0) == {now - 1}
                assert int(plan.evicted_pos[b, key[0], key[1]]) in gone | {-1}
                pruned += len(gone)
                demoted += len(down)
            before[b] = after
        # exact accounting: every page in use is in exactly one table, and vice versa
        tables = store.hot.table.pages[drv.seq_ids]
        in_tables = tables[tables > 0]
        assert in_tables.unique().numel() == in_tables.numel() == store.hot.pool.num_used
    assert pruned > 0 and demoted > 0  # the thresholds did act
    s = store.stats()
    assert s["gpu_kv_bytes"] == store.hot.pool.num_used * store.hot.pool.bytes_per_page
    store.release(drv.seq_ids)
    assert store.hot.pool.all_free()


@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_leankv_score_update_adds_each_hot_tokens_probability_in_both_tiers(use_triton):
    """After a decode step, the next plan adds to every hot token's score its probability in that step's
    attention (the max over its query group): computed here from the pages themselves, high tier from the
    left of the table and low tier from the right, against what the emitted logits (by virtual page) gave."""
    if use_triton == "always" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the store runs on the CPU here: Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    store = KVStore(_leankv_config(use_triton=use_triton), _geometry())
    drv = _PeakyDriver(store, [24, 13], seed=3)
    drv.prefill()
    for _ in range(6):
        _, results = drv.step()
    hot, t = store.hot, store.hot.table
    assert int(t.num_low_pages[drv.seq_ids].max()) > 0, "the test wants a low tier"
    before = hot.pool.slot_score.clone()
    store.policy._observe_last_step(store, hot.take_last_step())  # what the next plan does first
    delta = hot.pool.slot_score - before
    want = torch.zeros_like(delta)
    C = t.max_pages
    for layer, (_, q) in enumerate(results):
        for b, sid in enumerate(drv.seq_ids.tolist()):
            for h in range(HKV):
                n, nlp = int(t.num_tokens[sid, layer, h]), int(t.num_low_pages[sid, layer, h])
                th, tl_ = hot.tokens_per_page, hot.low_tokens_per_page
                slots = [(int(t.pages[sid, layer, h, i // th]), i % th, False) for i in range(n)]
                for j in range(nlp):
                    page = int(t.pages[sid, layer, h, C - 1 - j])
                    slots += [(page, s, True) for s in range(tl_) if int(hot.pool.slot_pos[page, s]) >= 0]
                keys = torch.stack([(hot.low if low else hot.high).read(hot.pool.data, torch.tensor([page]))[0][0, s]
                                    for page, s, low in slots])  # [n_hot, D] dequantized
                qg = q[b, h * (HQ // HKV):(h + 1) * (HQ // HKV), 0]  # [G, D]
                probs = torch.softmax(qg @ keys.T * drv.scale, dim=-1).amax(0)
                for (page, s, _), p in zip(slots, probs):
                    want[page, s] += p
    torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-5)
    store.release(drv.seq_ids)


def test_leankv_decode_attends_exactly_the_hot_tokens():
    """The kernel path and the reference path keep the same tokens and give the same outputs."""
    outs = {}
    for use_triton in ("never", "always"):
        store = KVStore(_leankv_config(use_triton=use_triton), _geometry(torch.bfloat16))
        drv = _PeakyDriver(store, [21, 9], seed=2)
        drv.prefill()
        outs[use_triton] = []
        for _ in range(6):
            _, results = drv.step()
            outs[use_triton].append((torch.stack([r[0] for r in results]).float(), _tiers(store, int(drv.seq_ids[0]))))
        store.release(drv.seq_ids)
    for (a, ta), (b, tb) in zip(outs["never"], outs["always"]):
        assert ta == tb
        assert ((a - b).norm() / a.norm()).item() < 1e-2  # bf16 outputs of the two paths


def test_leankv_prefill_prunes_below_alpha_p_whatever_alpha_q():
    """Prune is checked before demotion, at prefill as at decode: alpha_quant=0 (nothing demoted)
    still prunes what falls below alpha_prune / n."""
    store = KVStore(_leankv_config(alpha_quant=0.0, alpha_prune=0.5), _geometry())
    drv = _PeakyDriver(store, [24, 13], seed=1)
    drv.prefill()
    for b, n in enumerate([24, 13]):
        for (layer, h), (hi, lo) in _tiers(store, int(drv.seq_ids[b])).items():
            assert not lo  # nothing below alpha_quant = 0
            assert set(range(n - 4, n)) <= hi  # immune
    held = sum(len(hi) for b in range(2) for hi, _ in _tiers(store, int(drv.seq_ids[b])).values())
    assert held < (24 + 13) * L * HKV  # some tokens pruned at prefill
    store.release(drv.seq_ids)


def test_leankv_keeps_the_sinks_under_retrieval():
    """With a selector (`tiered`) the first sink_tokens positions are immune: the PQ index never
    codes them, so they must stay hot. Without one, LeanKV may prune them (as the paper does)."""
    kept = {}
    for retrieves in (False, True):
        # without a selector sink_tokens cannot apply (the config refuses it): positions 0-2 are
        # checked all the same
        extra = dict(selector="pq", cold_tier=True, window_tokens=4, pq_bits=3, sink_tokens=3) if retrieves else {}
        store = KVStore(_leankv_config(alpha_prune=1.5, alpha_quant=3.0, **extra), _geometry())
        drv = _PeakyDriver(store, [24, 13], seed=4)
        drv.prefill()
        for _ in range(8):
            drv.step()
        tiers = [_tiers(store, int(s)) for s in drv.seq_ids]
        kept[retrieves] = all({0, 1, 2} <= hi | lo for t in tiers for hi, lo in t.values())
        store.release(drv.seq_ids)
    assert kept[True]
    assert not kept[False]  # the thresholds are high enough to prune a sink when nothing protects them


def test_leankv_prefill_score_is_the_group_max_per_query_summed():
    """Prefill scores follow the decode rule: per query, the max over the GQA group of the
    attention probability; summed over the last `score_queries` queries. Hand case: the two query
    heads of a group attend tokens 0 and 1 in opposite order at the two scored queries, so every
    query gives each of them probability ~1 (score 2), where a max over the group of per-head
    sums would say 1."""
    store = KVStore(_leankv_config(score_queries=2, alpha_prune=0.0, alpha_quant=0.0), _geometry())
    seq_ids = store.add_sequences(1)
    T, G = 4, HQ // HKV
    k = torch.zeros(1, HKV, T, D)
    k[0, :, torch.arange(T), torch.arange(T)] = 1.0  # key t = e_t in every KV head
    q = torch.zeros(1, HQ, T, D)
    big = 60.0
    for kv in range(HKV):  # group heads kv*G (g=0) and kv*G+1 (g=1)
        q[0, kv * G + 0, 2, 0] = big  # g=0: query 2 -> token 0, query 3 -> token 1
        q[0, kv * G + 0, 3, 1] = big
        q[0, kv * G + 1, 2, 1] = big  # g=1: the opposite order
        q[0, kv * G + 1, 3, 0] = big
    positions = torch.arange(T).view(1, T)
    valid = torch.ones(1, T, dtype=torch.bool)
    keep = store.policy.prefill(store, 0, seq_ids, q, k, positions, valid, scale=1.0)
    torch.testing.assert_close(keep.scores[0, :, :2], torch.full((HKV, 2), 2.0), atol=1e-4, rtol=0)
    assert float(keep.scores[0, :, 2:].max()) < 1e-4  # tokens 2, 3 get ~nothing
    store.release(seq_ids)


# ---- the high tier is dense: what lets the decode kernel skip the position load (HIGH_DENSE) --

def _high_holes(store: KVStore, seq_ids: torch.Tensor, layers: list[int] | None = None) -> list[list[int]]:
    """[row, layer, head, index] of every high-tier index below n_high whose slot holds no token."""
    hot, t = store.hot, store.hot.table
    tpp = hot.tokens_per_page
    n = t.num_tokens[seq_ids].long()  # [B, L, H]
    idx = torch.arange(max(int(n.max()), 1))
    pages = t.pages[seq_ids].long()
    pg = pages[..., (idx // tpp).clamp(max=pages.shape[-1] - 1)]  # [B, L, H, N]
    pos = hot.pool.slot_pos[pg, (idx % tpp).expand_as(pg)]
    bad = (idx < n.unsqueeze(-1)) & ((pg == 0) | (pos < 0))
    if layers is not None:
        bad = bad[:, layers]
    return bad.nonzero().tolist()


def _check_dense_when_attending(store: KVStore) -> list[int]:
    """Wrap the hot tier's attention: assert, each time a layer's decode attention runs, that no
    high-tier index below n_high of that layer is empty. Returns the list of layers checked."""
    attend, seen = store.hot.attend, []

    def checked(layer, seq_ids, *args, **kw):
        holes = _high_holes(store, seq_ids, [layer])
        assert not holes, f"layer {layer}: empty high-tier slots below n_high (row, -, head, index): {holes[:8]}"
        seen.append(layer)
        return attend(layer, seq_ids, *args, **kw)

    store.hot.attend = checked
    return seen


def _dense_cases():
    # the bookkeeping is the same on the kernel path (its emitted logits feed LeanKV's scores as the
    # reference's do: test_leankv_decode_attends_exactly_the_hot_tokens); the reference path is fast
    tiered = dict(page_size=4, sink_tokens=2, immune_tokens=4, window_tokens=4, score_queries=8, alpha_prune=0.5,
                  alpha_quant=2.0, pq_bits=3, token_budget=512)
    return [
        pytest.param(lambda: _leankv_config(), 1, id="leankv"),
        pytest.param(lambda: KVStoreConfig.preset("tiered", **tiered), 1, id="tiered"),
        pytest.param(lambda: _config("window"), 1, id="window"),
        pytest.param(lambda: KVStoreConfig(hot_policy="all", key_bits=8, value_bits=4, page_size=4), 3,
                     id="quant-chunked-prefill"),
    ]


def test_tiered_on_the_kernel_path_on_a_cpu_fetches_in_step():
    """Triton kernels on a CPU run in Triton's interpreter, which two threads cannot share (its grid
    state is global: a fetch kernel interpreted in the fetch thread while the decode kernel runs
    failed with "x >= grid_dim[0]"). There the cold path fetches in step."""
    tiered = dict(page_size=4, sink_tokens=2, immune_tokens=4, window_tokens=4, score_queries=8, alpha_prune=0.5,
                  alpha_quant=2.0, pq_bits=3, token_budget=512)
    store = KVStore(KVStoreConfig.preset("tiered", use_triton="always", **tiered), _geometry())
    assert store.cold_path.async_fetch is False
    a = _PeakyDriver(store, [24, 13, 5], seed=1)
    a.prefill(1)
    for _ in range(8):  # the race hit at step 0 before
        a.step()
    a.release([0, 1, 2])


@pytest.mark.parametrize("make_config,chunks", _dense_cases())
def test_high_tier_has_no_empty_slot_below_n_high(make_config, chunks):
    """The invariant the decode kernel's HIGH_DENSE relies on: whenever a layer's decode attention
    runs, every high-tier index below n_high of every (sequence, KV head) of that layer holds a
    token (slot_pos >= 0). Driven through demotions and prunes (LeanKV), a sliding window's slot
    reuse, batches of different prompt lengths (left padding), chunked prefill, the release of one
    sequence in the middle of a batch and a new batch that reuses its slot and pages (both tiers'
    pages freed and taken again), two batches stepping in turn."""
    config = make_config()
    store = KVStore(config, _geometry())
    seen = _check_dense_when_attending(store)
    leankv = config.hot_policy == "leankv"
    a = _PeakyDriver(store, [24, 13, 5], seed=1)
    a.prefill(chunks)
    assert not _high_holes(store, a.seq_ids)
    prunes = low_prunes = 0
    most_low = 0

    def step(batch):
        nonlocal prunes, low_prunes, most_low
        plan, _ = batch.step()
        assert not _high_holes(store, batch.seq_ids)
        prunes += int((plan.evicted_pos >= 0).sum())
        if leankv:
            low_prunes += int((plan.low_evicted >= 0).sum())
            most_low = max(most_low, int(store.hot.table.num_low[batch.seq_ids].sum()))

    for _ in range(25):
        step(a)
    a.release([1])  # the middle sequence ends; its slot and pages go back
    b = _PeakyDriver(store, [30, 9], seed=2)
    assert int(a.seq_ids.numel() + b.seq_ids.numel()) == 4 and 1 in b.seq_ids.tolist()  # sequence slot 1 reused
    b.prefill(chunks)
    assert not _high_holes(store, torch.cat([a.seq_ids, b.seq_ids]))
    for _ in range(15):
        step(b)
        step(a)
    assert len(seen) == (25 + 30) * L
    if leankv:
        assert prunes > 0 and low_prunes > 0 and most_low > 0  # high prunes, low prunes and demotions all happened
    elif config.hot_policy == "window":
        assert prunes > 0  # the window's slot reuse happened
    store.release(torch.cat([a.seq_ids, b.seq_ids]))
    assert store.hot.pool.all_free()


@pytest.mark.parametrize("then", ["plan", "release"])
def test_a_step_stopped_after_some_layers_leaves_no_empty_high_slot(then):
    """A plan whose step stops after layer 0 (an exception in the model's forward, a dropped step)
    gave layer 1's heads a fresh index n nobody wrote; the next plan (or the release) gives it back,
    with the page it opened, so the high tier stays dense and no page leaks."""
    use = "always" if os.environ.get("TRITON_INTERPRET") == "1" else "never"
    store = KVStore(KVStoreConfig(hot_policy="all", key_bits=8, value_bits=4, page_size=4, use_triton=use), _geometry())
    seen = _check_dense_when_attending(store)
    batch = _PeakyDriver(store, [8, 5], seed=3)  # 8 tokens: the next index opens a page; 5: it does not
    batch.prefill()
    n0 = store.hot.table.num_tokens[batch.seq_ids].clone()
    used0 = store.hot.pool.num_used
    plan, _ = batch.step(layers=1)  # layer 1 is never decoded
    assert plan.written == [True, False]
    assert _high_holes(store, batch.seq_ids, [1])  # the gap: layer 1's index n is empty below n_high
    if then == "release":
        store.release(batch.seq_ids)
        assert store.hot.pool.all_free()
        return
    batch.step()
    assert not _high_holes(store, batch.seq_ids)
    n = store.hot.table.num_tokens[batch.seq_ids]
    assert torch.equal(n[:, 0], n0[:, 0] + 2) and torch.equal(n[:, 1], n0[:, 1] + 1)
    tables = store.hot.table.pages[batch.seq_ids]
    in_tables = tables[tables > 0]
    assert in_tables.unique().numel() == in_tables.numel() == store.hot.pool.num_used
    assert store.hot.pool.num_used == used0 + 2 * HKV  # sequence 0 opened a page per head in each layer, once
    assert seen == [0, 0, 1]
    store.release(batch.seq_ids)
    assert store.hot.pool.all_free()


def test_leankv_does_not_observe_a_step_stopped_after_some_layers(monkeypatch):
    """LeanKV's score update reads every layer's emitted logits of the last step at the next plan. Those of a
    layer the stopped step never decoded were never written (the plan no longer fills them: each layer's
    attention does): that step is not observed; the next complete one is."""
    use = "always" if os.environ.get("TRITON_INTERPRET") == "1" else "never"
    store = KVStore(_leankv_config(use_triton=use), _geometry())
    batch = _PeakyDriver(store, [20, 13], seed=4)
    batch.prefill()
    seen = []
    real = store.policy._observe_last_step
    monkeypatch.setattr(store.policy, "_observe_last_step",
                        lambda s, last: seen.append(None if last is None else last[0].tolist()) or real(s, last))
    batch.step()
    batch.step(layers=1)  # stopped after layer 0: its logits are dropped
    batch.step()
    batch.step()
    ids = batch.seq_ids.tolist()
    assert seen == [None, ids, None, ids]  # (none after the prefill) step 1's, not step 2's, step 3's
    store.release(batch.seq_ids)
    assert store.hot.pool.all_free()
