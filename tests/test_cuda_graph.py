"""The engine's CUDA-graph decode step (kvstore/cuda_graph.py): replay equals the eager step.

The GPU tests are skipped on CPU; the refusal test runs everywhere."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_model
from kvstore.cuda_graph import DecodeGraphs
from kvstore.engine import Engine
from kvstore.sampling import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def test_cuda_graphs_true_is_refused_with_the_reason_and_leaves_the_model_free():
    from kvstore import KVStoreConfig

    model = tiny_model("llama")
    reason = "not on CUDA" if not torch.cuda.is_available() else "not the Triton kernel"
    if torch.cuda.is_available():
        model = model.cuda()
    # on CUDA: the torch decode path (Triton off), which a graph cannot capture
    config = KVStoreConfig.preset("full", use_triton="never") if torch.cuda.is_available() else "quant"
    with pytest.raises(ValueError, match=f"cuda_graphs=True: .*{reason}"):
        Engine(model, config, cuda_graphs=True)
    with Engine(model, "full", cuda_graphs=False) as engine:  # the refused engine detached itself
        assert engine.decode_path == "eager" and engine.graphs is None


#: every preset the engine captures; tiered both ways of attending its retrieved tokens
GRAPH_PRESETS = {"quant": {}, "full": {}, "leankv": {}, "pqcache": {}, "tiered": {},
                 "tiered-kernel": {"retrieval_attention": "kernel"}}


@cuda
@pytest.mark.parametrize("preset", list(GRAPH_PRESETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_replay_equals_the_eager_step_bit_for_bit(dtype, preset):
    from kvstore import KVStoreConfig

    model = tiny_model("llama", dtype=dtype).cuda()
    prompts = _prompts([300, 70, 150, 33, 500], seed=1)
    news = [12, 30, 7, 20, 16]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in news]

    def config():
        return KVStoreConfig.preset(preset.removesuffix("-kernel"), **GRAPH_PRESETS[preset])

    with Engine(model, config(), max_batch=3, cuda_graphs=False) as eager:
        want = eager.generate(prompts, params)
    with Engine(model, config(), max_batch=3) as graphed:
        assert graphed.decode_path == "cuda-graph"
        got = graphed.generate(prompts, params)
        assert graphed.decode_path == "cuda-graph", "capture failed (see the log)"
        assert graphed.graphs.replays > graphed.graphs.captures >= 1
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.logprobs == w.logprobs  # bit for bit


@cuda
def test_a_repeated_batch_shape_captures_nothing_new():
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    prompts = _prompts([200, 200, 200, 200], seed=2)
    with Engine(model, "quant", max_batch=4) as engine:
        assert engine.graphs.max_graphs == 4  # a graph for every batch size up to max_batch
        engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
        first = engine.graphs.captures
        engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
        assert engine.graphs.captures == first and engine.decode_path == "cuda-graph"


# ---- on any machine: a captured step replayed over later plans, emulated ------------------------
#
# A CUDA graph replays the kernels of the step it captured: the Python of that step does not run
# again, so every per-step value must reach the kernels through buffers the next plan refreshes in
# place, and every Python int the step used (widths, split sizes) must be the same or be part of the
# signature that triggers a new capture. The emulation: the step captured at the last signature
# change is run again (its plan object, its ints) over the store's current state, against a second
# store that decodes every step eagerly with the same inputs. A per-step tensor that a plan made
# fresh, or an int that moved without changing the signature, gives other outputs.

#: the retrieval paths (PQ selection, GPU cache, fetch): into the hot tier's kernel launch under LeanKV's
#: policy (its page moves, its low tier, its logits read by the next plan), and merged after 16-bit pages
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="a CPU store with use_triton='always' runs its kernels in the Triton interpreter")
# hinted: planned as the engine plans, the lengths and slots from the host
@pytest.mark.parametrize("preset,hinted", [("tiered-kernel", False), ("pqcache", False), ("pqcache-prefetch", False),
                                           ("pqcache", True)])
def test_a_captured_step_replayed_over_later_plans_equals_the_eager_steps(preset, hinted):
    from kvstore.cuda_graph import signature
    from test_decode_allocations import HKV, HQ, L, _store

    D = 16
    # tiered: prunes enough at prefill that the selection has its width from the first step
    over = dict(alpha_prune=2.0) if preset.startswith("tiered") else {}
    eager, graphed = (_store(preset, "cpu", torch.float32, **over) for _ in range(2))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    lens, steps = (24, 13, 19), 6
    B, T = len(lens), max(lens)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, T - n:] = True
    ids = [s.add_sequences(B) for s in (eager, graphed)]
    for layer in range(L):
        q, k, v = r(B, HQ, T, D), r(B, HKV, T, D), r(B, HKV, T, D)
        for s, i in zip((eager, graphed), ids):
            s.prefill(layer, i, q, k, v, valid, D ** -0.5)
    static = [torch.zeros(B, h, 1, D) for _ in range(L) for h in (HQ, HKV, HKV)]  # q, k, v of each layer
    hint = -(-(T + steps) // eager.hot.tokens_per_page)  # the engine's pages_hint: the widest table reached
    for s in (eager, graphed):
        s.hot.table.ensure_pages(hint + 1)
    captured, captures = None, 0
    try:
        for step in range(steps):
            host = {}
            if hinted:  # (the host tier's writes then land a step late: `ColdTier.flush(wait=False)`)
                host = dict(host_positions=[n + step for n in lens], host_seq_ids=ids[1].tolist())
                assert ids[0].tolist() == host["host_seq_ids"]
            plan_e = eager.plan(ids[0], pages_hint=hint, **host)
            plan_g = graphed.plan(ids[1], pages_hint=hint, **host)
            sig = signature(graphed, plan_g, (ids[1], *static))
            if captured is None or sig != captured[0]:
                captured, captures = (sig, plan_g), captures + 1
            replay = captured[1]
            replay.step_id = plan_g.step_id  # a graph checks no step id: the captured step's own plan runs
            for layer in range(L):
                qkv = r(B, HQ, 1, D) * 3, r(B, HKV, 1, D), r(B, HKV, 1, D)
                want = eager.decode(layer, plan_e, *qkv, D ** -0.5)
                for buf, x in zip(static[3 * layer: 3 * layer + 3], qkv):
                    buf.copy_(x)
                got = graphed.decode(layer, replay, *static[3 * layer: 3 * layer + 3], D ** -0.5)
                assert torch.equal(got, want), f"{preset} step {step} layer {layer}: replay != eager"
            plan_g.written = [True] * L  # what DecodeGraphs.run records after a replay
        # captured at the first step and again at the second (the first decode step loads the PQ index)
        assert captures <= 2, f"{preset}: {captures} captures in {steps} steps"
    finally:
        for s, i in zip((eager, graphed), ids):
            s.release(i)


class _EmulatedGraphs(DecodeGraphs):
    """`DecodeGraphs` with the capture emulated (see above): a "graph" reruns the step it captured, its
    plan and its forward (the decode cache that holds that plan), so the engine's own graph path
    (`Engine._decode_graph`: static inputs, the plan sized for the widest table, the signature) runs
    on a CPU."""

    def __init__(self, store, max_graphs=8):  # no CUDA memory pool
        self.store, self.max_graphs, self.graphs, self.captures, self.replays = store, max_graphs, {}, 0, 0

    def _capture(self, plan, forward):
        store, logits = self.store, torch.empty(0)  # the graph's output: one tensor, rewritten by every replay

        class Graph:
            def replay(self):
                plan.step_id = store._plan_id  # a graph reads no step id: the captured plan runs
                out = forward(plan)
                logits.resize_(out.shape).copy_(out)

        return Graph(), logits


#: not quant: on a CPU it runs a reference path that gathers as many pages as the plan's page count, a
#: Python int a graph would freeze (a graph only ever runs the kernel path, which reads the plan's
#: buffers; the GPU test above replays quant for real)
@pytest.mark.parametrize("preset", ["leankv", "pqcache", "tiered"])
def test_the_engines_graph_path_replaying_captured_steps_equals_its_eager_path(preset):
    model = tiny_model("llama")
    prompts = _prompts([90, 40, 61], seed=3)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in (9, 6, 9)]

    with Engine(model, preset, max_batch=3, cuda_graphs=False) as eager:
        want = eager.generate(prompts, params)
    with Engine(model, preset, max_batch=3, cuda_graphs=False) as graphed:
        graphed.graphs, graphed.decode_path = _EmulatedGraphs(graphed.store), "cuda-graph"
        got = graphed.generate(prompts, params)
        assert graphed.decode_path == "cuda-graph" and graphed.graphs.replays >= 2 * graphed.graphs.captures
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.logprobs == w.logprobs  # bit for bit


def test_every_batch_size_seen_replays_when_it_comes_back():
    """Continuous batching moves the batch size whenever a request leaves: ten requests ending one
    step apart run at ten sizes. The engine keeps a graph for each size up to max_batch, so a second
    wave of the same requests replays every step (with the 8 graphs kept before, the sizes evicted
    each other and every step of the second wave captured again)."""
    model = tiny_model("llama")
    prompts = _prompts([30 + 7 * i for i in range(10)], seed=4)
    params = [SamplingParams(max_new_tokens=2 + i, ignore_eos=True) for i in range(10)]
    with Engine(model, "leankv", max_batch=10, cuda_graphs=False) as engine:
        engine.graphs, engine.decode_path = _EmulatedGraphs(engine.store, max_graphs=engine.max_batch), "cuda-graph"
        first = engine.generate(prompts, params)
        captures, replays = engine.graphs.captures, engine.graphs.replays
        assert captures >= 10 and engine.graphs.batch_sizes == list(range(1, 11))
        second = engine.generate(prompts, params)
        assert engine.graphs.captures == captures, "a batch size seen before captured again"
        assert engine.graphs.replays == 2 * replays
    assert [c.token_ids for c in second] == [c.token_ids for c in first]


@cuda
@pytest.mark.parametrize("preset", ["quant", "tiered"])
def test_every_batch_size_seen_replays_when_it_comes_back_on_the_gpu(preset):
    """The test above with real graphs: the second wave's steps capture nothing."""
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    prompts = _prompts([300 + 40 * i for i in range(10)], seed=4)
    params = [SamplingParams(max_new_tokens=2 + i, ignore_eos=True) for i in range(10)]
    with Engine(model, preset, max_batch=10) as engine:
        first = engine.generate(prompts, params)
        captures = engine.graphs.captures
        second = engine.generate(prompts, params)
        assert engine.decode_path == "cuda-graph", "capture failed (see the log)"
        assert engine.graphs.captures == captures, "a batch size seen before captured again"
    assert [c.token_ids for c in second] == [c.token_ids for c in first]


# ---- Engine.warmup: every batch size captured ahead of traffic, the widths set for the shape ------

#: new batch sizes (4 to 1 as requests end) and new prompt lengths, all within warmup(90, 10)
_WAVES = [([90, 40, 61, 17], (1, 4, 7, 10)), ([77, 41, 61], (2, 5, 9)), ([57, 37], (3, 8))]


def _waves(engine):
    outs = []
    for w, (lengths, news) in enumerate(_WAVES):
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in news]
        outs += engine.generate(_prompts(lengths, seed=10 + w), params)
    return outs


def _warm_config(preset):
    from kvstore import KVStoreConfig

    # tiered: codebooks trained by the torch k-means (the GPU's trainer) rather than on FAISS's host
    # threads, whose pending jobs a decode step loads (graph_support refuses them on a GPU)
    return KVStoreConfig.preset(preset, **({"pq_trainer": "device"} if preset == "tiered" else {}))


@pytest.mark.parametrize("preset", ["leankv", "tiered"])
def test_after_warmup_new_batch_sizes_and_prompt_lengths_capture_nothing(preset):
    model = tiny_model("llama")
    with Engine(model, _warm_config(preset), max_batch=4, cuda_graphs=False) as eager:
        eager.warmup(90, 10)
        want = _waves(eager)
    with Engine(model, _warm_config(preset), max_batch=4, cuda_graphs=False) as graphed:
        graphed.graphs, graphed.decode_path = _EmulatedGraphs(graphed.store, max_graphs=4), "cuda-graph"
        info = graphed.warmup(90, 10)
        assert info["captures"] == 4 and graphed.graphs.batch_sizes == [1, 2, 3, 4]
        store = graphed.store
        assert not store.active and store.hot.pool.num_used == 0  # the dummies are gone
        assert graphed.stats()["sequences"] == 0 and graphed._next_id == 0
        got = _waves(graphed)
        assert graphed.graphs.captures == 4, "a step after warmup captured"
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.logprobs == w.logprobs  # bit for bit
    with Engine(model, _warm_config(preset), max_batch=4, cuda_graphs=False) as cold:
        assert [c.token_ids for c in _waves(cold)] == [c.token_ids for c in want]  # warmup changes no token


def test_warmup_refuses_bad_input_and_a_busy_engine():
    model = tiny_model("llama")
    with Engine(model, "full", max_batch=2) as engine:
        for args, match in [((0,), "prompt_tokens must be an int >= 1"), ((8, 0), "max_new_tokens must be"),
                            ((model.config.max_position_embeddings, 8), "max_position_embeddings")]:
            with pytest.raises(ValueError, match=match):
                engine.warmup(*args)
        engine.add_request([5, 6, 7])
        with pytest.raises(ValueError, match="idle engine"):
            engine.warmup(16)


def _count_triton_compiles():
    """A list that grows by one per Triton compilation while the hook is set (None: no hook in this Triton)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        return None, lambda: None
    seen, old = [], knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *a, **k: seen.append(k.get("key"))

    def restore():
        knobs.runtime.jit_post_compile_hook = old

    return seen, restore


@cuda
@pytest.mark.parametrize("preset", ["quant", "full", "leankv", "pqcache", "tiered"])
def test_after_warmup_new_batch_sizes_and_prompt_lengths_compile_and_capture_nothing_on_the_gpu(preset):
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    with Engine(model, preset, max_batch=4) as engine:
        engine.warmup(90, 10)
        captures = engine.graphs.captures
        step = engine.decode_step  # what a server times: the decode steps (a prefill may compile for a new length)
        compiles, restore = None, lambda: None

        def timed_step():
            nonlocal compiles, restore
            compiles, restore = _count_triton_compiles()
            try:
                return step()
            finally:
                restore()
                assert not compiles, f"Triton compiled in a decode step after warmup: {compiles}"

        engine.decode_step = timed_step
        _waves(engine)
        assert engine.decode_path == "cuda-graph", "capture failed (see the log)"
        assert engine.graphs.captures == captures, "a step after warmup captured"
