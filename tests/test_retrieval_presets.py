"""Presets pqcache / oracle / tiered end to end: the store driven directly, and through `attach`."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import left_padded_batch, tiny_model
from gpu_kernels import reference
from kvstore import KVStoreClient, KVStoreConfig
from kvstore.adapters.hf import CACHE_ARG, model_cache
from kvstore.geometry import ModelGeometry
from kvstore.store import KVStore

L, HQ, HKV, D = 2, 4, 2, 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _geo(device="cpu"):
    return ModelGeometry(L, HQ, HKV, D, torch.float32, torch.device(device))


def _generate(model, config, ids, mask, steps=6):
    ids, mask = ids.to(model.device), mask.to(model.device)
    client = KVStoreClient(config)
    with client.attach(model):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1), out.sequences


@pytest.mark.parametrize("family,device", [("llama", "cpu"), ("qwen3", "cpu")]
                         + [("llama", "cuda")] * torch.cuda.is_available())
def test_oracle_with_budget_covering_the_context_equals_full(family, device):
    model = tiny_model(family).to(device)
    ids, mask = left_padded_batch(3, 70, pads=(5, 2, 0))
    full_logits, full_seq = _generate(model, KVStoreConfig.preset("full"), ids, mask)
    cfg = KVStoreConfig.preset("oracle", token_budget=200, sink_tokens=4)
    logits, seq = _generate(model, cfg, ids, mask)
    assert torch.equal(seq, full_seq)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)  # observed max |diff| ~2e-7


@pytest.mark.parametrize("preset", ["pqcache", "pqcache-retrieval", "oracle"])
def test_presets_generate_through_attach(preset):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(2, 300, pads=(40, 0))
    full_logits, _ = _generate(model, KVStoreConfig.preset("full"), ids, mask, steps=5)
    logits, seq = _generate(model, KVStoreConfig.preset(preset), ids, mask, steps=5)
    assert seq.shape == (2, 305) and torch.isfinite(logits).all()
    # the first token comes from dense prefill: identical to full
    torch.testing.assert_close(logits[:, 0], full_logits[:, 0], rtol=1e-5, atol=1e-5)


def test_pqcache_stats_on_a_600_token_prompt():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(0))
    client = KVStoreClient(KVStoreConfig.preset("pqcache"))
    with client.attach(model):
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(nxt, **{CACHE_ARG: model_cache(out)}, use_cache=True)  # one decode step
        s = client.stats()
        assert s["sequences"] == 1 and s["tokens"] == 601
        assert s["gpu_kv_bytes"] <= s["dense_kv_bytes"] / 3, s  # observed ~0.24 of dense
        cold = client.store.cold  # every token is in the cold tier, at its rows' bytes (K8V4: 0.25x dense here)
        assert s["host_kv_bytes"] >= s["tokens"] * cold.chunk_bytes // cold.C > 0
        assert s["retrieval_gpu_bytes"] > 0 and s["gpu_cache_slots"] == KVStoreConfig.preset("pqcache").topk_for(600)
        model_cache(out).release()


def test_retrieval_needs_the_window_policy():
    with pytest.raises(NotImplementedError, match="window"):
        KVStore(KVStoreConfig(hot_policy="all", selector="pq", cold_tier=True), _geo())


class _Run:
    """Drive a store with random prompts and decode steps; returns every step's outputs."""

    def __init__(self, store, lengths, seed):
        self.store, self.g = store, torch.Generator().manual_seed(seed)
        self.device = store.device
        B, T = len(lengths), max(lengths)
        self.valid = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lengths):
            self.valid[b, T - n:] = True
        self.seq_ids = store.add_sequences(B)

    def r(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.device)

    def prefill(self):
        B, T = self.valid.shape
        for layer in range(L):
            self.store.prefill(layer, self.seq_ids, self.r(B, HQ, T, D), self.r(B, HKV, T, D), self.r(B, HKV, T, D),
                               self.valid.to(self.device), D ** -0.5)

    def step(self, layer_hook=None):
        B = self.seq_ids.numel()
        plan = self.store.plan(self.seq_ids)
        outs = []
        for layer in range(L):
            outs.append(self.store.decode(layer, plan, self.r(B, HQ, 1, D) * 3, self.r(B, HKV, 1, D),
                                          self.r(B, HKV, 1, D), D ** -0.5))
            if layer_hook:
                layer_hook(layer)
        return torch.stack(outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("selector", ["pq", "exact"])
def test_overlapped_fetch_equals_synchronous_bit_for_bit(selector, device):
    cfg = KVStoreConfig(hot_policy="window", selector=selector, cold_tier=True, sink_tokens=3, window_tokens=4,
                        token_budget=6, gpu_cache_tokens=5, pq_subspaces=2, pq_bits=3, page_size=4)
    runs = []
    for async_fetch in (True, False):
        store = KVStore(cfg, _geo(device))
        store.cold_path.async_fetch = async_fetch
        run = _Run(store, [40, 27, 33], seed=7)
        run.prefill()
        outs = [run.step() for _ in range(25)]
        runs.append((store, run, outs))
    (sa, ra, oa), (ss, rs, os_) = runs
    for a, b in zip(oa, os_):
        assert torch.equal(a, b)
    s = sa.stats()
    assert 0 < s["gpu_cache_hit_rate"] < 1  # both hits and admissions with evictions happened
    # every cached token is the cold tier's K/V of the position it claims
    c = sa.cold_path.gpu_cache
    for layer in range(L):
        for b, sid in enumerate(ra.seq_ids.tolist()):
            n = int(sa.seq_len[sid])
            keys = sa.cold.read_keys(sid, layer, 0, n)
            vals = sa.cold.read_keys(sid, layer, 0, n, values=True)
            for h in range(HKV):
                for slot in range(c.slots):
                    p = int(c.pos[layer, sid, h, slot])
                    if p >= 0:
                        assert int(c.slot_of[layer, sid, h, p]) == slot
                        assert torch.equal(c.k[layer, sid, h, slot].cpu(), keys[h, p])
                        assert torch.equal(c.v[layer, sid, h, slot].cpu(), vals[h, p])
    for store, run, _ in runs:
        store.release(run.seq_ids)


@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_quantized_gpu_cache_slots_hold_the_cold_tiers_rows(use_triton):
    """With a K8V4 cold tier the GPU cache's slots are its rows: each cached token is, byte for byte,
    the cold tier's row of the position it claims (admitted from the fetch, not requantized)."""
    cfg = KVStoreConfig(hot_policy="window", selector="exact", cold_tier=True, cold_key_bits=8, cold_value_bits=4,
                        sink_tokens=3, window_tokens=4, token_budget=6, gpu_cache_tokens=5, page_size=4,
                        use_triton=use_triton)
    store = KVStore(cfg, _geo())
    store.cold_path.async_fetch = False  # Triton's interpreter is not thread-safe
    run = _Run(store, [40, 27], seed=5)
    run.prefill()
    for _ in range(8):
        run.step()
    c, cold = store.cold_path.gpu_cache, store.cold
    assert c.k is None and c.rows.shape[-1] == cold.row_bytes
    assert 0 < store.stats()["gpu_cache_hit_rate"] < 1
    held = 0
    for layer in range(L):
        pos = c.pos[layer, run.seq_ids, :, : c.slots].long()  # [B, H, slots]
        slab, row = cold.rows(layer, run.seq_ids, pos.clamp(min=0))
        for i in zip(*torch.nonzero(pos >= 0, as_tuple=True)):
            b, h, j = (int(x) for x in i)
            want = cold.slab_rows[int(slab[b, h, j])][int(row[b, h, j])]
            assert torch.equal(c.rows[layer, int(run.seq_ids[b]), h, j], want)
            held += 1
    assert held > 0
    store.release(run.seq_ids)


def test_decode_output_is_attention_over_sinks_window_and_selection():
    """The merged output equals exact attention over sinks + window + the selected tokens."""
    cfg = KVStoreConfig(hot_policy="window", selector="exact", cold_tier=True, sink_tokens=3, window_tokens=4,
                        token_budget=5, gpu_cache_tokens=2, page_size=4)
    store = KVStore(cfg, _geo())
    run = _Run(store, [30], seed=3)
    B, T = 1, 30
    ks, vs = run.r(L, B, HKV, T, D), run.r(L, B, HKV, T, D)
    for layer in range(L):
        store.prefill(layer, run.seq_ids, run.r(B, HQ, T, D), ks[layer], vs[layer], run.valid, D ** -0.5)
    plan = store.plan(run.seq_ids)
    q, k1, v1 = run.r(B, HQ, 1, D) * 3, run.r(B, HKV, 1, D), run.r(B, HKV, 1, D)
    out = store.decode(0, plan, q, k1, v1, D ** -0.5)
    allk = torch.cat([ks[0], k1], 2)[0]
    allv = torch.cat([vs[0], v1], 2)[0]  # [H, 31, d]
    n_now, W, S = 31, 4, 3
    # exact selection over candidates [S, n_now - W)
    logits = torch.einsum("hgd,hnd->hgn", q[0, :, 0].view(HKV, 2, D), allk[:, S:n_now - W]) * D ** -0.5
    top = logits.softmax(-1).sum(1).topk(5).indices + S  # [H, 5]
    mask = torch.zeros(HKV, n_now, dtype=torch.bool)
    mask[:, :S] = True
    mask[:, n_now - W:] = True
    mask.scatter_(1, top, True)
    want, _, _ = reference.decode_attention(q[:, :, 0], allk[None], allv[None], mask[None], D ** -0.5)
    torch.testing.assert_close(out[:, :, 0].float(), want, rtol=1e-5, atol=1e-6)
    store.decode(1, plan, q, k1, v1, D ** -0.5)
    store.release(run.seq_ids)


def test_decode_waits_only_for_its_own_layers_codebook():
    cfg = KVStoreConfig(hot_policy="window", selector="pq", cold_tier=True, sink_tokens=2, window_tokens=3,
                        token_budget=4, pq_subspaces=2, pq_bits=3, page_size=4)
    store = KVStore(cfg, _geo())
    store.cold_path.selector.hold = [threading.Event() for _ in range(L)]
    store.cold_path.selector.hold[0].set()  # layer 1's build is held back
    run = _Run(store, [20], seed=1)
    run.prefill()
    seen = []

    def after(layer):
        seen.append((layer, [f.done() for f, _ in store.cold_path.selector.pending.get(1, [])]))
        if layer == 0:
            store.cold_path.selector.hold[1].set()

    out = run.step(layer_hook=after)
    assert seen[0] == (0, [False])  # layer 0 decoded while layer 1's codebook was still being built
    assert torch.isfinite(out).all()
    store.release(run.seq_ids)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_gpu_cache_admits_misses_into_unprotected_slots(policy):
    from kvstore.cold.gpu_cache import GPUCache

    geo = ModelGeometry(1, 2, 1, 4, torch.float32, torch.device("cpu"))
    cache = GPUCache(geo, max_seqs=2, slots=2, cap=16, policy=policy)
    sid = torch.tensor([1])

    def step(positions):
        pos = torch.tensor([[positions]])
        valid = torch.ones_like(pos, dtype=torch.bool)
        slot = cache.lookup(0, sid, pos, valid)
        kv = pos.float().view(1, 1, 1, -1, 1).expand(2, 1, 1, -1, 4).clone()  # K/V rows = their position
        cache.admit(0, sid, pos, valid, slot, kv)
        cache.end_step()
        return (slot[0, 0] >= 0).tolist()

    assert step([5, 6, 7]) == [False, False, False]  # two slots: 5 and 6 admitted, 7 not
    assert sorted(cache.pos[0, 1, 0, :2].tolist()) == [5, 6]
    assert step([5, 7, 8]) == [True, False, False]  # 5 is protected; 7 takes 6's slot; no room for 8
    assert sorted(cache.pos[0, 1, 0, :2].tolist()) == [5, 7]
    assert int(cache.slot_of[0, 1, 0, 6]) == -1 and int(cache.slot_of[0, 1, 0, 8]) == -1
    s7 = int(cache.slot_of[0, 1, 0, 7])
    assert (cache.k[0, 1, 0, s7] == 7).all()
    assert step([7, 5]) == [True, True]
    assert abs(cache.hit_rate() - 3 / 8) < 1e-9
    assert (cache.pos[0, 0] == -1).all()  # other sequences untouched


@pytest.mark.parametrize("trainer", ["faiss", "device"])
@pytest.mark.parametrize("preset", ["pqcache", "tiered"])
def test_same_tokens_every_run_whatever_the_clock(preset, trainer, monkeypatch):
    """The same generation twice, the second under a stressed, jumpy clock: identical tokens and
    logits. FAISS (a CPU store's trainer) runs a fixed iteration count; the device trainer (what a
    CUDA store runs, here on CPU) trains after each layer's prefill and stops by its convergence rule."""
    import time as _time

    model = tiny_model("llama")
    ids, mask = left_padded_batch(2, 300, pads=(40, 0))
    cfg = KVStoreConfig.preset(preset, pq_trainer=trainer)
    first = _generate(model, cfg, ids, mask, steps=5)
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(_time, "perf_counter", lambda: float(next(clock)) * 7.3)
    monkeypatch.setattr(_time, "time", lambda: float(next(clock)) * 11.1)
    again = _generate(model, cfg, ids, mask, steps=5)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])


@pytest.mark.parametrize("preset", ["pqcache", "tiered"])
def test_device_trainer_trains_per_layer_and_batches_one_length(preset, monkeypatch):
    """pq_trainer="device": one training per layer and sequence of a padded batch, one per layer
    for a batch of one length, and a row's tokens are the same alone or in that batch."""
    from kvstore.cold import kmeans

    model = tiny_model("llama")
    ids, mask = left_padded_batch(2, 300, pads=(40, 0))
    cfg = KVStoreConfig.preset(preset, pq_trainer="device")
    calls = []
    real = kmeans.train_codebooks
    monkeypatch.setattr(kmeans, "train_codebooks", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    _generate(model, cfg, ids, mask, steps=5)
    assert sorted(set(calls)) == list(range(L)) and len(calls) == 2 * L  # per layer, per sequence (padded batch)
    calls.clear()
    dense_ids = ids[1:].repeat(2, 1)
    both = _generate(model, cfg, dense_ids, torch.ones_like(dense_ids), steps=5)
    assert len(calls) == L
    alone = _generate(model, cfg, dense_ids[:1], torch.ones_like(dense_ids[:1]), steps=5)
    assert torch.equal(both[1][0], alone[1][0])


@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_a_prompt_with_no_candidates_decodes_with_the_quantized_gpu_cache(use_triton):
    """A one-token prompt leaves nothing to select (top-k width 0) while the quantized GPU cache has
    slots from an earlier, longer prompt: admission takes an empty staging of rows (hypothesis found
    `raw.view(B, H, 0, -1)` failing there)."""
    model = tiny_model("llama")
    cfg = KVStoreConfig.preset("pqcache", page_size=4, kmeans_iters=2, sink_tokens=4, window_tokens=4,
                               token_budget=4, use_triton=use_triton, pq_trainer="device")
    assert cfg.cold_key_bits == 8
    client = KVStoreClient(cfg)
    with client.attach(model):
        long_ids, long_mask = left_padded_batch(1, 40, pads=(0,))
        model.generate(long_ids, attention_mask=long_mask, max_new_tokens=3, do_sample=False)
        assert client.store.cold_path.gpu_cache.slots > 0
        out = model.generate(torch.tensor([[33]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                             max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4)


def test_the_selection_width_steps_in_powers_of_two_and_never_passes_the_scored_width():
    """The selection's width (kmax) is the budget, or, while fewer candidates exist, their count rounded up
    to a power of two (so a captured decode step replays while it holds: kvstore/cuda_graph.py); never
    wider than the positions scored. A fixed token_budget above the prompt's candidates: 519 candidates
    round up to 1024 > the 640 positions scored; the width is 640."""
    cfg = KVStoreConfig.preset("pqcache", sink_tokens=4, window_tokens=8, token_budget=1000, pq_bits=4, kmeans_iters=2,
                               page_size=16)
    store = KVStore(cfg, ModelGeometry(2, 4, 2, 16, torch.float32, torch.device("cpu")))
    ids, T = store.add_sequences(1), 530
    g = torch.Generator().manual_seed(0)
    try:
        for layer in range(2):
            q, (k, v) = torch.randn(1, 4, T, 16, generator=g), torch.randn(2, 1, 2, T, 16, generator=g)
            store.prefill(layer, ids, q, k, v, torch.ones(1, T, dtype=torch.bool), 0.25)
        for _ in range(2):
            plan = store.plan(ids)
            assert (plan.selection.kmax, plan.selection.num_tokens) == (640, 640)
            for layer in range(2):
                out = store.decode(layer, plan, torch.randn(1, 4, 1, 16, generator=g),
                                   *torch.randn(2, 1, 2, 1, 16, generator=g), 0.25)
                assert torch.isfinite(out).all()
    finally:
        store.release(ids)


@pytest.mark.parametrize("preset", ["oracle", "pqcache", "tiered"])
def test_speculative_prefetch_changes_where_the_bytes_come_from_not_the_outputs(preset):
    """prefetch_next_layer: layer l + 1's selection predicted with layer l's query, its misses fetched and
    admitted into layer l + 1's GPU cache before that layer's own lookup. Every layer here gets the same
    keys and queries, so the oracle's prediction is exact: layer l + 1's selection is all hits. The outputs
    are those without the prefetch, bit for bit (a hit reads the bytes a fetch brings)."""
    L, Hq, Hkv, D, T = 3, 4, 2, 16, 40
    over = dict(sink_tokens=2, budget_fraction=0.5, pq_bits=3, kmeans_iters=4, page_size=4, gpu_cache_tokens=64,
                use_triton="never")
    if preset == "tiered":
        over.update(immune_tokens=4, window_tokens=4, score_queries=8, alpha_prune=2.0, alpha_quant=4.0)
    stores = [KVStore(KVStoreConfig.preset(preset, **over, prefetch_next_layer=on),
                      ModelGeometry(L, Hq, Hkv, D, torch.float32, torch.device("cpu"))) for on in (False, True)]
    g = torch.Generator().manual_seed(5)
    ids = [s.add_sequences(2) for s in stores]
    try:
        q, k, v = torch.randn(2, Hq, T, D, generator=g), torch.randn(2, Hkv, T, D, generator=g), torch.randn(2, Hkv, T, D, generator=g)
        for layer in range(L):
            for s, i in zip(stores, ids):
                s.prefill(layer, i, q, k, v, torch.ones(2, T, dtype=torch.bool), D ** -0.5)
        for _ in range(5):
            plans = [s.plan(i) for s, i in zip(stores, ids)]
            qs, ks, vs = torch.randn(2, Hq, 1, D, generator=g) * 3, torch.randn(2, Hkv, 1, D, generator=g), \
                torch.randn(2, Hkv, 1, D, generator=g)
            for layer in range(L):
                off, on = (s.decode(layer, p, qs, ks, vs, D ** -0.5) for s, p in zip(stores, plans))
                assert torch.equal(off, on)
            assert plans[1].selection.kmax > 0
        hit_off, hit_on = (s.stats()["gpu_cache_hit_rate"] for s in stores)
        assert hit_on > hit_off, (hit_off, hit_on)
        if preset == "oracle":  # exact predictions: every layer but the first hits everything it selects
            assert hit_on >= (L - 1) / L
    finally:
        for s, i in zip(stores, ids):
            s.release(i)
