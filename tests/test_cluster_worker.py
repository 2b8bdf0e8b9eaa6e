"""The cluster's in-process parts (no Ray): sequence export/import, the worker engine, the cold tier."""

import pytest
import torch

from cluster.node_memory import ArenaSpec, BatchArena, NodeMemory
from cluster.worker import ModelSpec, WorkerEngine
from kvstore import KVStoreClient, KVStoreConfig
from kvstore.adapters.hf import CACHE_ARG
from kvstore.adapters.transfer import BatchKV, BatchTrace, TapCache, export_batch, import_batch
from tests.conftest import left_padded_batch, tiny_model

PROMPTS = [[5, 9, 13, 2, 77, 31, 4], [8, 1, 200, 3], [17, 19, 23, 29, 31, 37, 41, 43, 47, 53]]


def _decode(model, cache, nxt, mask, t):
    pos = mask[:, :t].sum(1, keepdim=True)
    mask[:, t] = 1
    out = model(input_ids=nxt[:, None], attention_mask=mask[:, : t + 1], position_ids=pos, **{CACHE_ARG: cache})
    return out.logits[:, -1].argmax(-1)


@torch.no_grad()
def test_export_import_continues_bit_exactly():
    """Export after 6 steps, import into a fresh store on another copy of the model: same tokens."""
    m1, m2 = tiny_model("llama"), tiny_model("llama")
    ids, mask0 = left_padded_batch()
    B, T = ids.shape
    c1 = KVStoreClient(KVStoreConfig.preset("full")).attach(m1)
    c2 = KVStoreClient(KVStoreConfig.preset("full")).attach(m2)
    seen = []
    cache = TapCache(c1.store, lambda layer, q, k, v, scale: seen.append((layer, tuple(q.shape), tuple(k.shape))))
    mask = torch.zeros(B, T + 16, dtype=torch.long)
    mask[:, :T] = mask0
    out = m1(input_ids=ids, attention_mask=mask0, position_ids=(mask0.cumsum(1) - 1).clamp(min=0), **{CACHE_ARG: cache})
    nxt, t, toks = out.logits[:, -1].argmax(-1), T, []
    assert seen[:2] == [(0, (B, 4, T, 16), (B, 2, T, 16)), (1, (B, 4, T, 16), (B, 2, T, 16))]
    for s in range(12):
        if s == 6:
            kv, saved = export_batch(cache), (t, nxt.clone(), mask.clone())
        nxt = _decode(m1, cache, nxt, mask, t)
        t += 1
        toks.append(nxt)
    assert kv.keys.shape == (2, B, 2, T + 6, 16) and kv.lengths.tolist() == [15 + 6, 18 + 6, 20 + 6]
    t, nxt, mask = saved
    cache2 = import_batch(c2.store, kv)
    assert c2.store.seq_len[cache2.seq_ids].tolist() == kv.lengths.tolist()
    resumed = []
    for _ in range(6):
        nxt = _decode(m2, cache2, nxt, mask, t)
        t += 1
        resumed.append(nxt)
    assert torch.equal(torch.stack(resumed, 1), torch.stack(toks[6:], 1))
    for c in (cache, cache2):
        c.release()
    c1.detach(), c2.detach()


def test_export_and_import_refuse_bad_input():
    model = tiny_model("llama")
    client = KVStoreClient(KVStoreConfig.preset("full")).attach(model)
    with pytest.raises(ValueError, match="holds no sequences"):
        export_batch(TapCache(client.store, lambda *a: None))
    with pytest.raises(ValueError, match=r"\[L, Hkv, d, Hq\] = \[3, 2, 16, 4\]"):
        import_batch(client.store, BatchKV(torch.zeros(3, 1, 2, 4, 16), torch.zeros(3, 1, 2, 4, 16), torch.ones(1, 4, dtype=torch.bool)))
    kv = (torch.zeros(2, 1, 2, 4, 16), torch.zeros(2, 1, 2, 4, 16), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="BatchTrace.queries"):
        BatchTrace(*kv, queries=torch.zeros(2, 1, 4, 5, 16), prefill_columns=2)
    with pytest.raises(ValueError, match="BatchTrace.prefill_columns"):
        BatchTrace(*kv, queries=torch.zeros(2, 1, 4, 4, 16), prefill_columns=0)
    with pytest.raises(ValueError, match="every decode column"):
        BatchTrace(kv[0], kv[1], torch.tensor([[True, True, False, True]]), queries=torch.zeros(2, 1, 4, 4, 16),
                   prefill_columns=2)
    with pytest.raises(ValueError, match="valid must be"):
        BatchKV(torch.zeros(2, 1, 2, 4, 16), torch.zeros(2, 1, 2, 4, 16), torch.ones(1, 5, dtype=torch.bool))
    client.detach()


def _engine(record_queries=None, preset="full"):
    return WorkerEngine(ModelSpec("random", seed=3), preset=preset, device="cpu", max_seqs=4, record_queries=record_queries)


def _arena(cold, engine, batch_id, B, max_tokens):
    info = engine.info()
    return cold.create_arena(batch_id, B, info["num_layers"], info["num_kv_heads"], info["head_dim"], max_tokens,
                             info["dtype"], info["num_q_heads"])


@pytest.mark.parametrize("preset,record_queries", [("full", False), ("full", True), ("quant", True)],
                         ids=["full-import", "full-replay", "quant-replay"])
def test_worker_resumes_from_cold_tier_without_prefill(preset, record_queries):
    """A worker that dies after step 5 leaves its batch in the cold tier; another one resumes it.

    Bulk import (K/V only) and replay of the store's calls (with the recorded queries) both
    continue bit for bit.
    """
    max_new = 12
    max_tokens = max(map(len, PROMPTS)) + max_new
    ref_engine = _engine(record_queries, preset)
    first = ref_engine.start("ref", PROMPTS, max_new)
    ref = [first] + [ref_engine.step("ref") for _ in range(max_new - 1)]
    ref_engine.finish("ref")

    cold = NodeMemory(capacity_bytes=1 << 20)
    spec = _arena(cold, ref_engine, "b0", len(PROMPTS), max_tokens)
    dying = _engine(record_queries, preset)
    got = [dying.start("b0", PROMPTS, max_new, spec)] + [dying.step("b0") for _ in range(5)]
    assert cold.progress("b0") == (max(map(len, PROMPTS)) + 5, 6)
    del dying  # its process state is gone; the segment stays with the cold tier

    heir = _engine(record_queries, preset)
    so_far = heir.resume("b0", spec, max_new)
    assert so_far == [list(col) for col in zip(*got)]
    got += [heir.step("b0") for _ in range(max_new - 6)]
    assert got == ref
    assert heir.generated("b0") == [list(col) for col in zip(*ref)]
    heir.finish("b0")
    cold.shutdown()
    with pytest.raises(FileNotFoundError):
        BatchArena.attach(spec)


def test_worker_reprefill_from_tokens():
    """A lost segment: prefill over prompt + generated tokens, then decoding goes on."""
    max_new = 8
    engine = _engine()
    got = [engine.start("a", PROMPTS, max_new)] + [engine.step("a") for _ in range(3)]
    generated = [list(col) for col in zip(*got)]
    again = engine.start("a", PROMPTS, max_new, generated=generated)
    assert again == got[-1]
    got += [engine.step("a") for _ in range(max_new - 4)]
    assert len(engine.generated("a")[0]) == max_new
    assert engine.free == 1
    engine.finish("a")
    assert engine.free == 4


@pytest.mark.parametrize("preset", ["full", "quant", "leankv", "pqcache", "tiered"])
def test_reprefill_gives_the_uninterrupted_tokens(preset):
    """A re-prefill after a lost segment replays the generated tokens as decode steps: the store ends
    in the uninterrupted run's state, so every later token is the uninterrupted run's (every preset)."""
    overrides = dict(pq_bits=4, gpu_cache_tokens=8, kmeans_iters=8, immune_tokens=4, score_queries=8)
    if KVStoreConfig.preset(preset).retrieves:  # a budget where a selector applies it (elsewhere it is refused)
        overrides.update(sink_tokens=4, window_tokens=8, token_budget=8)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (70, 96, 83)]
    max_new, lost_after = 12, 5

    def engine():
        return WorkerEngine(ModelSpec("random", seed=3), preset, "cpu", max_seqs=4, store_overrides=overrides)

    ref_engine = engine()
    ref = [ref_engine.start("r", prompts, max_new)] + [ref_engine.step("r") for _ in range(max_new - 1)]
    heir = engine()
    got = [heir.start("b", prompts, max_new)] + [heir.step("b") for _ in range(lost_after - 1)]
    generated = [list(col) for col in zip(*got)]
    assert heir.start("b", prompts, max_new, generated=generated) == got[-1]  # the segment is lost: re-prefill
    got += [heir.step("b") for _ in range(max_new - lost_after)]
    assert got == ref and heir.take_replay_mismatches() == 0
    assert heir.generated("b") == [list(col) for col in zip(*ref)]
    for e, b in ((heir, "b"), (ref_engine, "r")):
        e.finish(b)


def test_worker_resume_replays_retrieval_state():
    """Under pqcache (window hot tier, PQ retrieval, GPU cache of retrieved tokens) the heir replays
    the store's calls from the recorded queries and decodes the same tokens as an uninterrupted run."""
    try:
        KVStoreConfig.preset("pqcache")
    except NotImplementedError as e:
        pytest.skip(str(e))
    # few k-means iterations keep the test short (the count is fixed: runs and replays train alike)
    overrides = dict(sink_tokens=4, window_tokens=8, token_budget=8, pq_bits=4, gpu_cache_tokens=8,
                     kmeans_iters=8)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (70, 96, 83)]
    max_new, kill_after = 12, 6

    def engine():
        return WorkerEngine(ModelSpec("random", seed=3), "pqcache", "cpu", max_seqs=4, store_overrides=overrides)

    ref_engine = engine()
    assert ref_engine.record_queries
    ref = [ref_engine.start("r", prompts, max_new)] + [ref_engine.step("r") for _ in range(max_new - 1)]
    full = WorkerEngine(ModelSpec("random", seed=3), "full", "cpu", max_seqs=4)
    full_out = [full.start("f", prompts, max_new)] + [full.step("f") for _ in range(max_new - 1)]
    assert full_out != ref  # retrieval really changed what was attended
    cold = NodeMemory(capacity_bytes=8 << 20)
    spec = _arena(cold, ref_engine, "b", 3, 96 + max_new)
    assert spec.num_q_heads == 4
    dying = engine()
    got = [dying.start("b", prompts, max_new, spec)] + [dying.step("b") for _ in range(kill_after - 1)]
    del dying
    heir = engine()
    heir.resume("b", spec, max_new)
    got += [heir.step("b") for _ in range(max_new - kill_after)]
    assert got == ref
    for e, b in ((heir, "b"), (ref_engine, "r"), (full, "f")):
        e.finish(b)
    cold.shutdown()


def test_cold_tier_and_arena_errors():
    cold = NodeMemory(capacity_bytes=4096)
    with pytest.raises(MemoryError, match="cold tier full"):
        cold.create_arena("x", 4, 2, 2, 16, 64, "float32")
    with pytest.raises(ValueError, match="ArenaSpec.batch"):
        ArenaSpec("n", 0, 2, 2, 16, 8, "float32")
    with pytest.raises(ValueError, match="ArenaSpec.dtype"):
        ArenaSpec("n", 1, 2, 2, 16, 8, "floaty")
    engine = _engine()
    cold2 = NodeMemory()
    spec = _arena(cold2, engine, "b", 1, 4)
    with pytest.raises(ValueError, match="exceeds this worker's free capacity"):
        engine.start("c", [[1]] * 5, 2)
    with pytest.raises(ValueError, match="arena .* holds"):
        engine.start("c", [[1, 2, 3]], 4, spec)
    cold2.shutdown()


def test_chaos_spec_and_cli_validation():
    from cluster.controller import Chaos, ClusterSpec
    from cluster.launch import parse_args
    from cluster.workload import builtin_workload, outputs_sha256

    assert Chaos.parse("kill-worker@8") == Chaos("kill-worker", 8)
    assert Chaos.parse("kill-cold-tier@1") == Chaos("kill-cold-tier", 1)
    for bad in ("kill-worker", "kill-worker@0", "kill-gpu@3", "kill-worker@x"):
        with pytest.raises(ValueError, match="--chaos"):
            Chaos.parse(bad)
    with pytest.raises(ValueError, match="ClusterSpec.num_workers"):
        ClusterSpec(num_workers=0)
    args = parse_args(["--workers", "3", "--prompt-tokens", "4,9", "--chaos", "kill-worker@2"])
    assert (args.workers, args.prompt_range, args.address) == (3, (4, 9), None)
    with pytest.raises(SystemExit):
        parse_args(["--prompt-tokens", "9"])
    assert parse_args(["--preset", "pqcache", "--store", "token_budget=64", "--store", "use_triton=never"]).store_overrides == [
        ("token_budget", 64), ("use_triton", "never")]
    with pytest.raises(SystemExit):
        parse_args(["--store", "token_budget"])
    reqs = builtin_workload(5, vocab_size=64, prompt_tokens=(4, 9), max_new_tokens=3, seed=1)
    assert [r.request_id for r in reqs] == list(range(5))
    assert all(4 <= len(r.prompt) <= 9 and min(r.prompt) >= 3 and max(r.prompt) < 64 for r in reqs)
    assert reqs == builtin_workload(5, vocab_size=64, prompt_tokens=(4, 9), max_new_tokens=3, seed=1)
    assert outputs_sha256([[1, 2], [3]]) != outputs_sha256([[1], [2, 3]])
    with pytest.raises(ValueError, match="prompt_tokens"):
        builtin_workload(2, prompt_tokens=(5, 4))


def test_cold_tier_serves_cpu_retrieval():
    """The node cold tier answers PQ top-k searches with the CPU retrieval service (exact scores agree)."""
    service = pytest.importorskip("retrieval.service")
    import numpy as np

    rng = np.random.default_rng(0)
    Hkv, G, m, K, dsub, n = 2, 2, 2, 16, 8, 64
    centroids = rng.standard_normal((Hkv, m, K, dsub)).astype(np.float32)
    codes = rng.integers(0, K, size=(Hkv, n, m), dtype=np.uint8)
    q = rng.standard_normal((Hkv * G, m * dsub)).astype(np.float32)
    req = service.SearchRequest(centroids, codes, q, lo=4, hi=60, k=5, scale=0.25)
    cold = NodeMemory(capacity_bytes=1 << 20, retrieval_threads=2)
    got = cold.search([req, req])
    cold.shutdown()
    assert got.shape == (2, Hkv, 5) and (got[0] == got[1]).all()
    # reference: scores of every candidate from the codes, softmax per query head, summed over the group
    for h in range(Hkv):
        keys = np.concatenate([centroids[h, j, codes[h, :, j]] for j in range(m)], axis=1)  # [n, d]
        logits = q[h * G:(h + 1) * G] @ keys[4:60].T * 0.25
        p = np.exp(logits - logits.max(1, keepdims=True))
        score = (p / p.sum(1, keepdims=True)).sum(0)
        assert set(got[0, h].tolist()) == set((np.argsort(-score)[:5] + 4).tolist())
