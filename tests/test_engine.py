"""The generation engine (kvstore/engine.py) and device sampling (kvstore/sampling.py), on CPU in fp32."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from kvstore import AlreadyAttachedError, KVStoreClient, KVStoreConfig
from kvstore.engine import Engine
from kvstore.sampling import SamplingParams, sample, uniform_noise

PRESETS = ["full", "quant", "leankv", "pqcache", "tiered"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _generate_alone(model, config, prompt, new):
    """The compatible path: attach + model.generate, one prompt, greedy."""
    with KVStoreClient(config).attach(model):
        out = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_tokens_equal_generate_for_every_preset(model, preset):
    # prefill_chunk_tokens=96: the 300-token prompt prefills in chunks where the preset chunks
    config = KVStoreConfig.preset(preset, prefill_chunk_tokens=96)
    prompts = _prompts([40, 300, 130])
    want = [_generate_alone(model, config, p, 7) for p in prompts]
    with Engine(model, config, max_batch=2) as engine:  # the third joins when a slot frees
        got = engine.generate(prompts, max_new_tokens=7, ignore_eos=True)
        assert engine.store.hot.pool.num_used == 0 and not engine.store.active
    assert [c.token_ids for c in got] == want
    assert all(c.finish_reason == "length" for c in got)


def test_requests_arriving_mid_decode_get_the_tokens_they_get_alone(model):
    prompts = _prompts([60, 25, 200, 90, 11], seed=3)
    news = [9, 4, 6, 12, 5]
    with Engine(model, "full", max_batch=3) as engine:
        alone = [engine.generate([p], max_new_tokens=n, ignore_eos=True)[0].token_ids for p, n in zip(prompts, news)]
        ids, got, arrivals = {}, {}, {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> prompts arriving before it
        step = 0
        while step in arrivals or engine.has_unfinished:
            for i in arrivals.get(step, []):
                ids[engine.add_request(prompts[i], SamplingParams(max_new_tokens=news[i], ignore_eos=True))] = i
            for out in engine.step():
                got.setdefault(ids[out.request_id], []).append(out.token_id)
            step += 1
        assert engine.store.hot.pool.num_used == 0
    assert [got[i] for i in range(len(prompts))] == alone


def test_300_random_requests_leave_nothing_behind(model):
    rng = random.Random(0)
    config = KVStoreConfig.preset("tiered", prefill_chunk_tokens=64)
    with Engine(model, config, max_batch=7) as engine:
        store = engine.store
        done = 0
        for wave in range(6):
            for _ in range(50):
                n = rng.randint(1, 160)
                prompt = [rng.randrange(3, 128) for _ in range(n)]
                params = SamplingParams(max_new_tokens=rng.randint(1, 5), temperature=rng.choice([0.0, 0.8]),
                                        top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(99))
                engine.add_request(prompt, params)
            while engine.has_unfinished:
                done += sum(o.finished for o in engine.step())
                assert len(engine.running) <= 7
            assert store.hot.pool.num_used == 0 and not store.active
            assert store.cold.used_bytes == 0
        assert done == 300
        assert len(store._free_seqs) == store.max_seqs  # every sequence slot back


def test_finish_at_eos_and_stop_token(model):
    prompt = _prompts([50], seed=5)[0]
    with Engine(model, "quant") as engine:
        free = engine.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids
        stop_at = free[3]
        first = free.index(stop_at)
        out = engine.generate([prompt], max_new_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True)[0]
        assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"
        engine.eos_ids = frozenset([stop_at])  # as if the model's EOS were this token
        out = engine.generate([prompt], max_new_tokens=8)[0]
        assert out.token_ids == free[: first + 1] and out.finish_reason == "eos"


def test_stop_strings_and_text_prompts_with_a_tokenizer(model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    text = " ".join(f"w{i}" for i in _prompts([40], seed=7)[0].tolist())
    with Engine(model, "full", tokenizer=tokenizer) as engine:
        free = engine.generate([text], max_new_tokens=8, ignore_eos=True)[0]
        words = free.text.split(" ")
        assert words == [f"w{t}" for t in free.token_ids]
        stop = " " + words[4]
        cut = free.text.index(stop)
        out = engine.generate([text], max_new_tokens=8, stop=stop, ignore_eos=True)[0]
        assert out.finish_reason == "stop" and out.text == free.text[:cut]
        assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 5


def test_sampling_is_seeded_and_batch_invariant(model):
    prompts = _prompts([70, 35, 120], seed=9)
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=11, ignore_eos=True, logprobs=True)
    with Engine(model, "quant", max_batch=3) as engine:
        alone = engine.generate([prompts[0]], params)[0]
        together = engine.generate(prompts, [params, SamplingParams(max_new_tokens=6, temperature=0.7, seed=2),
                                             SamplingParams(max_new_tokens=3)])
        again = engine.generate([prompts[0]], params)[0]
        other = engine.generate([prompts[0]], SamplingParams(**{**vars(params), "seed": 12}))[0]
        greedy = engine.generate([prompts[0]], max_new_tokens=6, ignore_eos=True)[0]
    assert together[0].token_ids == alone.token_ids == again.token_ids
    assert other.token_ids != alone.token_ids and alone.token_ids != greedy.token_ids
    assert len(alone.logprobs) == 6 and all(lp <= 0 for lp in alone.logprobs)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(5)
    seeds, steps = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    greedy = logits.argmax(-1)
    tk, _ = sample(logits, ones * 2, torch.ones(5, dtype=torch.int64), ones, seeds, steps)
    tp, _ = sample(logits, ones * 2, torch.zeros(5, dtype=torch.int64), ones * 1e-6, seeds, steps)
    assert torch.equal(tk, greedy) and torch.equal(tp, greedy)


def test_samples_follow_the_softmax_within_top_k_and_top_p():
    V, N = 6, 40000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0]).expand(N, V)
    seeds = torch.arange(N)
    steps = torch.full((N,), 3)
    cases = [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)]
    for temp, k, p in cases:
        tok, _ = sample(logits, torch.full((N,), temp), torch.full((N,), k), torch.full((N,), p), seeds, steps)
        probs = torch.softmax(logits[0] / temp, -1)
        keep = torch.ones(V, dtype=torch.bool)
        if k:
            keep[k:] = False
        before = probs.cumsum(0) - probs
        keep &= before < p
        want = torch.where(keep, probs, torch.zeros(V))
        want /= want.sum()
        freq = torch.bincount(tok, minlength=V).float() / N
        assert torch.allclose(freq, want, atol=0.01), (temp, k, p, freq, want)


def test_uniform_noise_is_a_pure_function_of_seed_step_and_token():
    u = uniform_noise(torch.tensor([1, 2, 1]), torch.tensor([0, 0, 5]), 1000)
    assert ((u > 0) & (u < 1)).all() and abs(float(u.mean()) - 0.5) < 0.03
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    v = uniform_noise(torch.tensor([9, 1]), torch.tensor([0, 0]), 1000)
    assert torch.equal(v[1], u[0])  # the same row in another batch


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(stop=("",)), "stop strings"),
])
def test_bad_sampling_params_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_before_any_work(model):
    with Engine(model, "full") as engine:
        for prompt, match in [("hello", "needs a tokenizer"), ([], "at least one token"), ([5, 999], "vocabulary"),
                              (torch.zeros(2, 3, dtype=torch.long), "shape"), ([1] * 1020, "max_position")]:
            with pytest.raises(ValueError, match=match):
                engine.add_request(prompt, SamplingParams(max_new_tokens=8))
        with pytest.raises(ValueError, match="tokenizer"):
            engine.add_request([5, 6], SamplingParams(stop=("x",)))
        with pytest.raises(ValueError, match="max_batch"):
            Engine(tiny_model("llama"), "full", max_batch=0)
        assert not engine.waiting
        with pytest.raises(AlreadyAttachedError):
            Engine(model, "quant")
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()


def test_close_restores_the_model(model):
    prompt = _prompts([30], seed=2)[0][None]
    before = model.generate(prompt, max_new_tokens=4, do_sample=False)
    engine = Engine(model, "tiered")
    engine.add_request(prompt[0], SamplingParams(max_new_tokens=50))
    engine.step()  # a request mid-flight: close drops it and frees its pages
    store = engine.store
    engine.close()
    assert store.hot.pool.num_used == 0 and not store.active and store.cold.used_bytes == 0
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), before)


def test_admission_sizes_the_pool_once_for_the_batch(model):
    prompts = _prompts([200, 50, 310, 90], seed=4)
    with Engine(model, "quant", max_batch=4) as engine:
        pool = engine.store.hot.pool
        grows = []
        real = pool._grow
        pool._grow = lambda *a, **k: (grows.append(a), real(*a, **k))[1]
        outs = engine.generate(prompts, max_new_tokens=20, ignore_eos=True)
        assert len(grows) == 1 and all(len(o.token_ids) == 20 for o in outs)


# ---- what a server and the cluster worker drive: abort, a subset's step, forced tokens, restore ----

def test_abort_frees_a_running_request_and_unqueues_a_waiting_one(model):
    with Engine(model, "tiered", max_batch=1) as engine:
        a = engine.add_request(_prompts([40], seed=6)[0], SamplingParams(max_new_tokens=30))
        b = engine.add_request(_prompts([25], seed=7)[0], SamplingParams(max_new_tokens=30))
        engine.step()
        assert [r.rid for r in engine.running] == [a] and engine.store.active
        assert engine.abort(b) and not engine.waiting  # waiting: it leaves the queue
        assert engine.abort(a) and not engine.running  # running: its pages go back at once
        store = engine.store
        assert not store.active and store.hot.pool.num_used == 0 and store.cold.used_bytes == 0
        assert not engine.abort(a) and not engine.abort(12345)


def test_a_subsets_step_gives_the_tokens_of_the_whole_batchs_steps(model):
    prompts = _prompts([33, 47, 21], seed=8)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with Engine(model, "full", max_batch=3) as engine:
        want = [c.token_ids for c in engine.generate(prompts, params)]
    with Engine(model, "full", max_batch=3) as engine:
        ids = [engine.add_request(p, params) for p in prompts]
        engine.admit()
        got = {i: [r.tokens[0]] for i, r in zip(ids, engine.running)}
        for _ in range(5):  # two batches stepped in turn, as the cluster worker steps its batches
            for part in ([ids[2], ids[0]], [ids[1]]):
                for out in engine.decode_step(part):
                    got[out.request_id].append(out.token_id)
        assert [got[i] for i in ids] == want
        with pytest.raises(ValueError, match="not running"):
            engine.decode_step([ids[0]])


def test_forced_tokens_are_fed_back_and_mismatches_counted(model):
    prompt = _prompts([50], seed=9)[0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def run(engine, forced):
        rid = engine.add_request(prompt, params, forced_tokens=forced)
        outs = []
        while engine.has_unfinished:
            outs += [o.token_id for o in engine.step() if o.request_id == rid]
        return outs

    with Engine(model, "leankv") as engine:
        free = run(engine, None)
        assert run(engine, free[:4]) == free  # its own tokens forced: the same run
        assert engine.forced_mismatches == 0
        wrong = [(t + 1) % 128 for t in free[:4]]
        assert run(engine, wrong)[:4] == wrong and engine.forced_mismatches == 4
        with pytest.raises(ValueError, match="exceed max_new_tokens"):
            engine.add_request(prompt, SamplingParams(max_new_tokens=2), forced_tokens=[1, 2, 3])


class _Recorder:
    """The padded timeline of a batch (row b's prompt ends at column P), as the cluster worker keeps it."""

    def __init__(self, prompts, geo, new):
        self.P, self.n = max(map(len, prompts)), [len(p) for p in prompts]
        T, B = self.P + new, len(prompts)
        self.k = torch.zeros(geo.num_layers, B, geo.num_kv_heads, T, geo.head_dim)
        self.v = torch.zeros_like(self.k)
        self.q = torch.zeros(geo.num_layers, B, geo.num_q_heads, T, geo.head_dim)
        self.t, self.rows, self.scale = self.P, {}, None

    def prefill(self, rid, layer, start, q, k, v, scale):
        b = self.rows[rid]
        c = self.P - self.n[b] + start
        for dst, x in ((self.k, k), (self.v, v), (self.q, q)):
            dst[layer, b, :, c:c + x.shape[2]] = x[0]
        self.scale = scale

    def step(self, rids, k, v, q):
        rows = [self.rows[r] for r in rids]
        for dst, x in ((self.k, k), (self.v, v), (self.q, q)):
            dst[:, rows, :, self.t] = x
        self.t += 1


@pytest.mark.parametrize("preset", PRESETS)
def test_restore_rebuilds_requests_without_the_model_and_they_go_on_bit_for_bit(preset):
    """Requests recorded in one engine and restored in another (a different copy of the model, which
    never sees the prompts): every later token and logprob equals the uninterrupted run's."""
    over = {"pqcache": dict(sink_tokens=4, window_tokens=8, token_budget=8, pq_bits=4, gpu_cache_tokens=8),
            "tiered": dict(pq_bits=4, gpu_cache_tokens=8)}.get(preset, {})
    prompts = [p.tolist() for p in _prompts([70, 96, 83], seed=5)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    first, second = tiny_model("llama"), tiny_model("llama")
    with Engine(first, KVStoreConfig.preset(preset, **over), max_batch=4) as a, \
            Engine(second, KVStoreConfig.preset(preset, **over), max_batch=4) as b:
        rec = a.recorder = _Recorder(prompts, a.store.geometry, 12)
        ids = []
        for p in prompts:
            ids.append(a.add_request(p, params))
            rec.rows[ids[-1]] = len(ids) - 1
        a.admit()
        for _ in range(5):
            a.decode_step(ids)
        tokens = [list(r.tokens) for r in a.running]
        T = rec.t
        new = b.restore(prompts, tokens, params, rec.k[..., :T, :], rec.v[..., :T, :], rec.q[..., :T, :], rec.scale)
        assert len(b.running) == 3 and [r.tokens for r in b.running] == tokens
        for _ in range(6):
            want = [(o.token_id, o.logprob) for o in a.decode_step(ids)]
            assert [(o.token_id, o.logprob) for o in b.decode_step(new)] == want
        assert not a.running and not b.running and not b.store.active


def test_restore_refuses_what_it_cannot_rebuild(model):
    geo_shape = lambda L, B, H, T, d: torch.zeros(L, B, H, T, d)  # noqa: E731
    with Engine(model, "leankv", max_batch=2) as engine:
        kv = geo_shape(2, 1, 2, 6, 16)
        with pytest.raises(ValueError, match="depends on the queries"):
            engine.restore([[5, 6, 7]], [[1, 2, 3, 4]], SamplingParams(), kv, kv)
        with pytest.raises(ValueError, match="same count"):
            engine.restore([[5, 6, 7]], [[1, 2], [3]], SamplingParams(), kv, kv)
        with pytest.raises(ValueError, match="free batch slots"):
            engine.restore([[5]] * 3, [[1]] * 3, SamplingParams(), geo_shape(2, 3, 2, 1, 16), geo_shape(2, 3, 2, 1, 16))
        with pytest.raises(ValueError, match=r"queries \[2, 1, 3, 6, 16\]"):
            engine.restore([[5, 6, 7]], [[1, 2, 3, 4]], SamplingParams(), kv, kv, torch.zeros(2, 1, 3, 6, 16))
        with pytest.raises(ValueError, match="must be"):
            engine.restore([[5, 6, 7]], [[1, 2, 3, 4]], SamplingParams(), kv[0], kv[0])
        with pytest.raises(ValueError, match=r"keys/values \[2, 1, 2, 6, 8\]"):
            engine.restore([[5, 6, 7]], [[1, 2, 3, 4]], SamplingParams(), geo_shape(2, 1, 2, 6, 8), geo_shape(2, 1, 2, 6, 8))
        assert not engine.running and not engine.store.active


def test_an_engine_dropped_without_close_detaches_and_frees_its_pages():
    import gc

    model = tiny_model("llama")
    engine = Engine(model, "quant")
    engine.add_request([5, 6, 7, 8], SamplingParams(max_new_tokens=20))
    engine.step()
    store = engine.store
    assert store.active
    del engine
    gc.collect()
    assert not store.active and store.hot.pool.num_used == 0
    with Engine(model, "full") as again:  # the model is free to attach
        assert again.generate([[5, 6, 7]], max_new_tokens=2)[0].token_ids


def test_a_failed_capture_is_reported_at_the_line_of_kvstore_that_raised():
    """The capture warning names the innermost kvstore / gpu_kernels frame, not torch's or the model's."""
    from kvstore.cold.gpu_cache import GPUCache
    from kvstore.engine import _innermost_frame

    with pytest.raises(ValueError) as info:
        GPUCache(None, 1, 1, 1, policy="nope")
    assert _innermost_frame(info.value).startswith("kvstore/cold/gpu_cache.py:")
    assert _innermost_frame(ValueError("never raised")) == "?"


@pytest.mark.parametrize("preset", ["tiered", "leankv"])
def test_an_admission_grows_the_pool_once_after_its_first_prompt(model, preset, monkeypatch):
    """Where the policy keeps a subset, the first prompt of an admission shows what a prompt keeps and
    the pool grows once for the rest, while it holds one sequence: not once per sequence, each growth
    copying every page held so far (a growth holds the pool twice for a moment). The tokens are those
    of requests admitted one by one."""
    from kvstore.hot.page_pool import PagePool

    grows = []
    orig = PagePool._grow

    def record(self, min_pages, factor=1.25):
        old = self.num_pages
        orig(self, min_pages, factor)
        grows.append((old, self.num_pages))

    monkeypatch.setattr(PagePool, "_grow", record)
    config = KVStoreConfig.preset(preset, prefill_chunk_tokens=128)
    prompts = _prompts([300, 310, 290, 305, 300], seed=9)
    with Engine(model, config, max_batch=5) as engine:
        for p in prompts:
            engine.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True))
        first = engine.admit()
        pool = engine.store.hot.pool
        assert len(engine.running) == 5 and pool.num_used <= pool.num_pages
        assert len(grows) <= 2, grows  # the first prompt's own growth, then one for the other four
        initial = 64  # PagePool's first size: a growth copies at most that, or about one sequence's pages
        assert all(old <= max(initial, 1.5 * pool.num_used / 5) for old, _ in grows), (grows, pool.num_used)
        got = [first[i].token_id for i in range(5)]
        while engine.has_unfinished:
            engine.step()
    with Engine(model, config, max_batch=5) as engine:  # one at a time: the same first tokens
        alone = [engine.generate([p], max_new_tokens=1, ignore_eos=True)[0].token_ids[0] for p in prompts]
    assert got == alone


def test_no_room_for_the_admissions_estimate_leaves_the_requests_admitted_one_by_one(model, monkeypatch):
    """The pool's room for an admission is an estimate: where it cannot be had (the device is full) every
    request is still prefilled once and admitted (each growing the pool itself, or waiting), none lost."""
    from kvstore import OutOfPagesError
    from kvstore.hot.page_pool import PagePool

    orig, refused = PagePool.reserve, []
    prompts = _prompts([200, 210, 190], seed=4)
    with Engine(model, "tiered", max_batch=3) as engine:
        def reserve(self, pages):  # the room asked once the first request runs: the admission's estimate
            if len(engine.running) == 1 and not refused:
                refused.append(pages)
                raise OutOfPagesError("injected: no room")
            return orig(self, pages)

        for p in prompts:
            engine.add_request(p, SamplingParams(max_new_tokens=2, ignore_eos=True))
        monkeypatch.setattr(PagePool, "reserve", reserve)
        first = engine.admit()
        assert refused and len(first) == 3 and len(engine.running) == 3 and not engine.waiting
        assert len(engine.store.active) == 3  # one sequence each: none prefilled twice
