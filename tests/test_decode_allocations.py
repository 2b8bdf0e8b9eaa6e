"""A layer's decode run allocates nothing and never syncs the host (DESIGN.md, issue 4).

Every preset is driven on a tiny geometry through the path the GPU takes (use_triton="always":
on a CPU store the Triton kernels run in the interpreter), the first decode step warms the
workspace (and, with PQ, loads each layer's codebook: the one documented exception, see
`KVStore.decode`), and every layer's `decode` of the next steps runs under `AllocProbe`
(tests/alloc_probe.py): no aten op may create a storage, none may read a device value on the
host. The fetch runs synchronously on a CPU store (the probe sees one thread; on CUDA it runs
on a side stream of the same thread and is probed as it is).

Measured before the change (fp16, steps >= 1, per layer's decode; CPU, fetch through the
reference gather): full 40, quant 11, leankv 14, pqcache 198, oracle 205, tiered 174.
"""

from __future__ import annotations

import pytest
import torch

from alloc_probe import AllocProbe
from gpu_kernels import reference, torch_ops
from kvstore import KVStoreConfig
from kvstore.geometry import ModelGeometry
from kvstore.store import KVStore

L, HQ, HKV, D = 2, 4, 2, 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = dict(page_size=4, use_triton="always", kmeans_iters=4)
PRESETS = {
    "full": {},
    "quant": {},
    "leankv": dict(immune_tokens=4, score_queries=8, alpha_prune=0.5, alpha_quant=2.0),
    # budget_fraction: each sequence its own k (the unsorted-k mask), a GPU cache that evicts
    "pqcache": dict(sink_tokens=2, budget_fraction=0.5, pq_bits=3, gpu_cache_tokens=5),
    "oracle": dict(sink_tokens=2, budget_fraction=0.5, gpu_cache_tokens=5),
    "tiered": dict(sink_tokens=2, immune_tokens=4, window_tokens=4, score_queries=8, alpha_prune=0.5,
                   alpha_quant=2.0, pq_bits=3, budget_fraction=0.5),
}
#: tiered with the selected tokens attended in the hot tier's kernel launch (pool pages written per layer)
PRESETS["tiered-kernel"] = dict(PRESETS["tiered"], retrieval_attention="kernel")
#: with the speculative prefetch of the next layer's selection (a second selection, lookup, fetch, admission)
PRESETS["pqcache-prefetch"] = dict(PRESETS["pqcache"], prefetch_next_layer=True)
PRESETS["tiered-kernel-prefetch"] = dict(PRESETS["tiered-kernel"], prefetch_next_layer=True)
#: the benchmark baselines, as the store runs them (window hot tier, every token in the cold tier)
BASELINES = {sel: dict(hot_policy="window", selector=sel, cold_tier=True, sink_tokens=2, budget_fraction=0.5,
                       gpu_cache_tokens=5) for sel in ("streaming", "h2o", "snapkv", "quest")}
#: aten ops a layer's decode run may still allocate, by preset: none is left (a torch op with no
#: out= variant is replaced by an equivalent that has one, e.g. isfinite by abs/eq/ne).
UNAVOIDABLE: dict[str, set[str]] = {name: set() for name in [*PRESETS, *BASELINES]}


def _store(preset: str, device: str, dtype=torch.float16, **overrides) -> KVStore:
    if preset in BASELINES:
        config = KVStoreConfig(**{**SMALL, **BASELINES[preset], **overrides})
    else:
        name = preset.split("-")[0]
        config = KVStoreConfig.preset(name, **{**SMALL, **PRESETS[preset], **overrides})
    store = KVStore(config, ModelGeometry(L, HQ, HKV, D, dtype, torch.device(device)))
    if store.cold_path is not None:  # CPU: the fetch thread is invisible to the probe
        store.cold_path.async_fetch = device == "cuda"
    return store


def _drive(store: KVStore, steps: int, probe_from: int = 1, lens=(40, 27), collect: list | None = None):
    """Prefill + `steps` decode steps; returns the probes of every layer's decode from `probe_from` on
    and the selection width of each step. Checks each step's outputs before the next plan: layer
    i's output is its own buffer, intact after the later layers ran (`KVStore.decode`'s contract).
    `collect`: a list that gets a copy of every layer's output."""
    dev, dtype = store.device, store.geometry.dtype
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    B, T = len(lens), max(lens)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, T - n:] = True
    ids = store.add_sequences(B)
    for layer in range(L):
        store.prefill(layer, ids, r(B, HQ, T, D), r(B, HKV, T, D), r(B, HKV, T, D), valid.to(dev), D ** -0.5)
    probes, kmax = [], []
    for step in range(steps):
        plan = store.plan(ids)
        if plan.selection is not None:
            kmax.append(plan.selection.kmax)
        outs = []
        for layer in range(L):
            q, k, v = r(B, HQ, 1, D) * 3, r(B, HKV, 1, D), r(B, HKV, 1, D)
            if step >= probe_from:
                with AllocProbe() as probe:
                    out = store.decode(layer, plan, q, k, v, D ** -0.5)
                probes.append(probe)
            else:
                out = store.decode(layer, plan, q, k, v, D ** -0.5)
            outs.append((out, out.clone()))
        if collect is not None:
            collect += [copy for _, copy in outs]
        for out, copy in outs:
            assert torch.equal(out, copy)
        assert len({out.data_ptr() for out, _ in outs}) == L
    store.release(ids)
    return probes, kmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", [*PRESETS, *BASELINES])
def test_a_layers_decode_run_allocates_nothing_and_never_syncs(preset, device):
    store = _store(preset, device)
    assert (store.cold_path is not None and store.cold_path.ret_tokens_per_page > 0) == ("-kernel" in preset)
    probes, kmax = _drive(store, steps=3 if preset in PRESETS else 2)
    allowed = UNAVOIDABLE[preset]
    for i, probe in enumerate(probes):
        extra = [r for r in probe.allocations if r.op not in allowed]
        assert not extra, f"{preset} step {1 + i // L} layer {i % L}: {probe.summary()}"
        assert not probe.syncs, f"{preset} step {1 + i // L} layer {i % L}: {probe.summary()}"
        assert not probe.host_values, f"{preset} step {1 + i // L} layer {i % L}: {probe.summary()}"
    if kmax:
        assert max(kmax[1:]) > 0, kmax  # the probed steps did select and fetch


def test_a_stale_plan_is_refused():
    store = _store("quant", "cpu")
    ids = store.add_sequences(1)
    x = torch.randn(1, HKV, 8, D, dtype=torch.float16)
    for layer in range(L):
        q = torch.randn(1, HQ, 8, D, dtype=torch.float16)
        store.prefill(layer, ids, q, x, x, torch.ones(1, 8, dtype=torch.bool), D ** -0.5)
    old = store.plan(ids)
    q, k = torch.randn(1, HQ, 1, D, dtype=torch.float16), torch.randn(1, HKV, 1, D, dtype=torch.float16)
    for layer in range(L):
        store.decode(layer, old, q, k, k, D ** -0.5)
    store.plan(ids)
    with pytest.raises(RuntimeError, match="stale plan"):
        store.decode(0, old, q, k, k, D ** -0.5)
    store.release(ids)


def test_the_probe_sees_allocations_and_syncs_and_not_views_in_place_or_out_ops():
    x, out, idx = torch.randn(4, 5), torch.empty(4, 5), torch.empty(4, 2, dtype=torch.long)
    with AllocProbe() as quiet:
        x.view(20)[3:]
        x.mul_(2)
        torch.add(x, 1, out=out)
        torch.topk(x, 2, out=(out[:, :2], idx))
    with AllocProbe() as loud:
        y = x + 1
        torch.zeros(3)
        x[torch.tensor([0, 2])]
        int(y.sum())
    with AllocProbe() as fills:  # slice assignment of a number: fill_ (CUDA: no copy)
        x[:, 3] = 1.0
        x[1:3] = 0
    with AllocProbe() as copies:  # an index tensor and a number: index_put_ of a host tensor
        x[torch.zeros(2, dtype=torch.long)] = 1.0
    assert quiet.allocations == [] and quiet.syncs == [] and quiet.host_values == []
    assert fills.host_values == [] and [r.op for r in copies.host_values] == ["aten.index_put_"]
    assert [r.op for r in loud.allocations] == ["aten.add", "aten.zeros", "aten.index", "aten.sum"]
    assert [r.op for r in loud.syncs] == ["aten._local_scalar_dense"]


# ---- the out= variants of the attention references equal them bit for bit ----------------------

def _take(name, shape, dtype):
    return torch.empty(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hkv,G,N", [(1, 1, 1, 1), (3, 2, 4, 33), (2, 2, 1, 7), (2, 1, 2, 0)])
def test_out_variants_equal_the_references_bit_for_bit(B, Hkv, G, N, dtype):
    g = torch.Generator().manual_seed(B * 100 + N)
    d, Hq = 16, Hkv * G
    q = (torch.randn(B, Hq, d, generator=g) * 3).to(dtype)
    k, v = torch.randn(2, B, Hkv, N, d, generator=g).to(dtype)
    valid = torch.rand(B, Hkv, N, generator=g) > 0.3
    valid[0, 0] = False  # a head with no token: lse -inf, out 0
    o1, l1, _ = reference.decode_attention(q, k, v, valid, 0.3)
    ws = torch_ops.decode_attention_buffers(_take, B, Hq, Hkv, N, d, kv_fp32=dtype == torch.float32)
    o2, l2 = torch_ops.decode_attention_out(q, k, v, ~valid, 0.3, ws)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)

    ob, lb = torch.randn(B, Hq, d, generator=g), torch.randn(B, Hq, generator=g)
    lb[-1, -1] = float("-inf")
    m1, ml1 = reference.merge_attention(o1, l1, ob, lb)
    m2, ml2 = torch_ops.merge_attention_out(o2, l2, ob, lb, torch_ops.merge_attention_buffers(_take, B, Hq, d))
    assert torch.equal(m1, m2) and torch.equal(ml1, ml2)

    if N:
        lg = torch.randn(B, Hq, N, generator=g) * 4
        cand = torch.rand(B, N, generator=g) > 0.4
        s1 = reference.group_softmax_scores(lg, cand, Hkv)
        s2 = torch_ops.group_softmax_scores_out(lg.clone(), ~cand.view(B, 1, N), Hkv, torch.empty(B, Hq, 1),
                                                torch.empty(B, Hkv, N))
        assert torch.equal(s1, s2)

    for m, K in ((1, 8), (2, 64), (4, 8)):
        cen = torch.randn(B, Hkv, m, K, d // m, generator=g).half()
        t1 = reference.pq_tables(q, cen, 0.3).contiguous()
        t2 = torch_ops.pq_tables_out(q, cen.float(), 0.3, torch.empty(B, Hkv, m, G, d // m),
                                     torch.empty(B * Hkv * m, G, K), torch.empty(B, Hq, m, K))
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("preset", ["quant", "leankv", "pqcache", "tiered", "tiered-kernel"])
def test_stale_workspace_bytes_never_reach_the_outputs(preset, monkeypatch):
    """The step's buffers come from `torch.empty` (kvstore/plan.py): whatever they held before must
    not matter. Every float buffer the workspace allocates starts as NaN in the second run (what
    uninitialized memory may hold); the outputs equal the first run's bit for bit. (Lanes a kernel
    masks may still read stale bytes on the interpreter, which warns when it casts them: harmless.)"""
    from kvstore.plan import Workspace

    def outputs():
        outs = []
        _drive(_store(preset, "cpu"), steps=2, probe_from=2, collect=outs)
        return torch.stack(outs)

    want = outputs()
    take = Workspace.take

    def poisoned(self, name, shape, dtype):
        before = self._flat.get(self._prefix + name)
        view = take(self, name, shape, dtype)
        buf = self._flat[self._prefix + name]
        if buf is not before and buf.is_floating_point():
            buf.fill_(float("nan"))
        return view

    monkeypatch.setattr(Workspace, "take", poisoned)
    got = outputs()
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
