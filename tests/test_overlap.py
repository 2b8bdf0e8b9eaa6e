"""The engine's overlapped decode (step t+1 planned and launched before step t's tokens are read) and
what it stands on: `KVStore.plan(host_positions=...)`, `KVStore.cancel`, `sample(rows=, filtered=)`.
On CPU in fp32 (`Engine(overlap=True)`: on a CPU the steps run one after the other, the same logic)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from kvstore import KVStoreConfig
from kvstore.engine import Engine
from kvstore.geometry import ModelGeometry
from kvstore.sampling import SamplingParams, sample
from kvstore.store import KVStore


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _requests(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 128) for _ in range(rng.randint(1, 90))]
        out.append((prompt, SamplingParams(max_new_tokens=rng.randint(1, 9), temperature=rng.choice([0.0, 0.9]),
                                           top_k=rng.choice([0, 7]), top_p=rng.choice([1.0, 0.8]),
                                           seed=rng.randrange(99), logprobs=rng.random() < 0.3,
                                           stop_token_ids=tuple(rng.sample(range(3, 128), 6)))))
    return out


def _serve(model, preset: str, overlap: bool, requests, arrivals: dict[int, list[int]]):
    """Run `requests` (prompt, params) arriving before the steps `arrivals` names; every request's
    (tokens, logprobs, finish reason), the engine's (cancelled, ridden) steps, and the store's leftovers."""
    with Engine(model, preset, max_batch=4, overlap=overlap) as engine:
        ids, step = {}, 0
        while step <= max(arrivals) or engine.has_unfinished:
            for i in arrivals.get(step, []):
                ids[engine.add_request(*requests[i])] = i
            engine.step()
            step += 1
            for r in engine.running:  # the store's lengths: the tokens read, plus the step launched ahead
                assert int(engine.store.seq_len[r.seq_id]) == r.length - 1 + int(engine._ahead is not None)
        store = engine.store
        left = (store.hot.pool.num_used, len(store.active), engine._ahead)
        done = {}
        for r in engine._finished:
            done[ids[r.rid]] = (r.tokens, r.logprobs, r.finish_reason)
        return done, (engine.cancelled_steps, engine.ridden_steps), left


@pytest.mark.parametrize("preset", ["quant", "full", "pqcache"])
def test_overlap_gives_every_request_the_tokens_of_the_plain_loop(model, preset, monkeypatch):
    """Requests of random lengths, budgets, stop tokens (finishing mid-batch) and sampling, arriving
    while others decode: the overlapped loop (steps launched ahead, some taken back; pqcache's, which
    cannot be, riding for the rows that ended or landing before an admission) gives each the tokens,
    logprobs and finish reason of the plain loop, and leaves no page or sequence behind."""
    finished = []
    orig = Engine._release

    def keep(self, r):  # remember every request that ends (the engine forgets them)
        if not hasattr(self, "_finished"):
            self._finished = []
        if r not in self._finished:
            self._finished.append(r)
        orig(self, r)

    monkeypatch.setattr(Engine, "_release", keep)
    rng = random.Random(5)
    requests = _requests(rng, 14)
    arrivals = {0: [0, 1, 2], 1: [3], 4: [4, 5, 6, 7], 9: [8, 9], 10: [10], 16: [11, 12, 13]}
    plain, none, _ = _serve(model, preset, False, requests, arrivals)
    over, (cancelled, ridden), left = _serve(model, preset, True, requests, arrivals)
    assert none == (0, 0)
    if preset == "pqcache":  # steps launched ahead rode along where a stop token ended a request
        assert cancelled == 0 and ridden > 0
    else:  # some steps launched ahead were taken back (a stop token, an arrival)
        assert cancelled > 0 and ridden == 0
    assert sorted(over) == sorted(plain) == list(range(len(requests)))
    assert over == plain
    assert left == (0, 0, None)
    assert any(reason == "stop" for _, _, reason in plain.values())  # the stop tokens did end some mid-batch


def test_overlap_launches_ahead_only_where_the_plan_reads_nothing_back(model):
    """The presets whose plan reads the device (LeanKV's scores: leankv, tiered) keep the plain loop;
    pqcache's steps, which cannot be taken back, run ahead; an engine on a CPU keeps it unless asked;
    a steady batch runs ahead on every step but its last."""
    assert not Engine(model, "quant").overlap  # (CPU default)
    for preset, ahead in (("tiered", False), ("leankv", False), ("pqcache", True)):
        with Engine(model, preset, overlap=True) as engine:
            assert not engine.store.cancellable and engine.store.plans_ahead == ahead
            launched = []
            orig = engine._launch
            engine._launch = lambda batch, after=None: launched.append(after is not None) or orig(batch, after)
            engine.generate([[5, 6, 7] * 20], max_new_tokens=4, ignore_eos=True)
            assert engine.cancelled_steps == 0 and engine._ahead is None and any(launched) == ahead
    with Engine(model, "quant", overlap=True) as engine:
        launched = []
        orig = engine._launch
        engine._launch = lambda batch, after=None: launched.append(after is not None) or orig(batch, after)
        engine.generate([[5, 6, 7] * 20, [9] * 33], max_new_tokens=6, ignore_eos=True)
        # the first decode step plainly, then 4 launched ahead; none at the last (it ends by length)
        assert launched == [False, True, True, True, True] and engine.cancelled_steps == 0


def _store(preset: str, **kw) -> KVStore:
    config = KVStoreConfig.preset(preset, page_size=8, **kw)
    return KVStore(config, ModelGeometry(2, 4, 2, 16, torch.float32, torch.device("cpu")))


def _prefill(store: KVStore, lengths: list[int], g: torch.Generator) -> torch.Tensor:
    ids = store.add_sequences(len(lengths), torch.tensor(lengths))
    T = max(lengths)
    valid = torch.arange(T).view(1, T) < torch.tensor(lengths).view(-1, 1)
    for layer in range(2):
        store.prefill(layer, ids, torch.randn(len(lengths), 4, T, 16, generator=g),
                      torch.randn(len(lengths), 2, T, 16, generator=g), torch.randn(len(lengths), 2, T, 16, generator=g),
                      valid, 0.25)
    return ids


def _step(store: KVStore, ids: torch.Tensor, g: torch.Generator, **host) -> torch.Tensor:
    plan = store.plan(ids, **host)
    B = ids.numel()
    outs = [store.decode(layer, plan, torch.randn(B, 4, 1, 16, generator=g), torch.randn(B, 2, 1, 16, generator=g),
                         torch.randn(B, 2, 1, 16, generator=g), 0.25).clone() for layer in range(2)]
    return plan, torch.stack(outs)


def _state(store: KVStore, ids: torch.Tensor):
    t, pool = store.hot.table, store.hot.pool
    return (t.num_tokens[ids].clone(), t.pages[ids].clone(), pool.num_free, pool.slot_pos.clone(),
            store.seq_len[ids].clone())


#: retrieval presets sized for prompts of 7-16 tokens: a few sinks, a window of 3 (the host tier's writes
#: then reach it a step late, `ColdTier.flush(wait=False)`), a budget of 4 candidates
_RETRIEVAL = dict(sink_tokens=2, window_tokens=3, token_budget=4, gpu_cache_tokens=4)


@pytest.mark.parametrize("preset,kw", [("quant", {}), ("full", {}), ("pqcache", _RETRIEVAL),
                                       # a window the short prompts fill during the steps (fresh slots, a page
                                       # boundary), then reuse
                                       ("pqcache", dict(_RETRIEVAL, window_tokens=12)),
                                       ("tiered", dict(_RETRIEVAL, immune_tokens=3))])
def test_host_positions_plan_the_step_the_device_would(preset, kw):
    """plan(host_positions=..., host_seq_ids=...) reads back less (quant, full: nothing; pqcache: only
    the window policy's sizes) and makes the same step: the same pages, slots, sizes and selection
    width, the same outputs, across page boundaries (page_size=8) and sequences of unequal lengths;
    the host tier, whose writes then arrive a step late, ends holding the same tokens."""
    results = []
    for hinted in (False, True):
        g = torch.Generator().manual_seed(1)
        store = _store(preset, **kw)
        ids = _prefill(store, [13, 7, 16], g)
        lens = [13, 7, 16]
        got = []
        for _ in range(11):
            host = dict(host_positions=lens, host_seq_ids=ids.tolist()) if hinted else {}
            plan, out = _step(store, ids, g, **host)
            width = plan.selection.kmax if plan.selection is not None else 0
            got.append((plan.page.clone(), plan.slot.clone(), plan.num_pages, out, width))
            lens = [n + 1 for n in lens]
            if hinted and store.cold is not None and len(got) > 1:  # the step before's tokens, on their way
                assert store.cold._pending is not None
        held = [store.cold.read_sequence(i) for i in ids.tolist()] if store.cold is not None else []
        results.append((got, _state(store, ids), held))
    (a, sa, ha), (b, sb, hb) = results
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] and torch.equal(x[3], y[3])
        assert x[4] == y[4]
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(sa, sb))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(ha, hb))
    assert not ha or ha[0][0].shape[2] == 13 + 11  # every token: the prompt and the 11 decoded
    with pytest.raises(ValueError, match="host_positions"):
        store.plan(ids, host_positions=[1, 2])
    with pytest.raises(ValueError, match="host_seq_ids"):
        store.plan(ids, host_seq_ids=[1, 2])


@pytest.mark.parametrize("preset", ["quant", "full"])
def test_cancel_takes_a_step_back_exactly(preset):
    """A step planned and run, then cancelled, leaves the store as it was (tables, free pages, slot
    positions, lengths: a step that opened pages included), and the step planned again gives the
    outputs of a store that never ran the cancelled one."""
    g = torch.Generator().manual_seed(2)
    store = _store(preset)
    ids = _prefill(store, [16, 5], g)  # 16: the next token opens a page
    before = _state(store, ids)
    _step(store, ids, torch.Generator().manual_seed(9))
    assert store._last_plan.new_page.sum() > 0
    store.cancel(store._last_plan)
    after = _state(store, ids)
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(before, after))
    _, again = _step(store, ids, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(2)
    fresh = _store(preset)
    fids = _prefill(fresh, [16, 5], g)
    _, want = _step(fresh, fids, torch.Generator().manual_seed(3))
    assert torch.equal(again, want)


def test_cancel_is_refused_where_a_step_moves_tokens():
    g = torch.Generator().manual_seed(0)
    store = _store("leankv")
    ids = _prefill(store, [20], g)
    plan, _ = _step(store, ids, g)
    assert not store.cancellable
    with pytest.raises(NotImplementedError, match="cannot take back"):
        store.cancel(plan)
    quant = _store("quant")
    qids = _prefill(quant, [9], g)
    old, _ = _step(quant, qids, g)
    _step(quant, qids, g)
    with pytest.raises(RuntimeError, match="latest"):  # only the latest step can be taken back
        quant.cancel(old)


def test_sample_with_the_rows_given_equals_sample_reading_them():
    g = torch.Generator().manual_seed(4)
    B, V = 6, 50
    logits = torch.randn(B, V, generator=g)
    temp = torch.tensor([0.0, 0.7, 1.2, 0.0, 0.5, 1.0])
    top_k = torch.tensor([0, 5, 0, 3, 0, 60])
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0, 1.0])
    seeds, steps = torch.arange(B) * 7, torch.arange(B) + 3
    want = sample(logits, temp, top_k, top_p, seeds, steps, want_logprobs=True)
    got = sample(logits, temp, top_k, top_p, seeds, steps, want_logprobs=True, rows=torch.tensor([1, 2, 4, 5]),
                 filtered=True)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    greedy = sample(logits, torch.zeros(B), top_k, top_p, seeds, steps, rows=torch.tensor([], dtype=torch.int64),
                    filtered=False)
    assert torch.equal(greedy[0], logits.argmax(-1))


@pytest.mark.parametrize("preset", ["quant", "full", "pqcache"])
def test_a_step_launched_ahead_reads_nothing_back(model, preset):
    """The CPU side of the GPU test below: planning and launching a step ahead (pages that fill up
    allocated, sampling rows set; pqcache: its selection, the host tier's writes) runs no op that reads
    a device value on the host (`.item()`, `.tolist()`, `.cpu()`, `nonzero`) and makes no Python number
    a host tensor that an indexed write copies to the device (on a GPU both wait for the queue: the
    step ahead would wait for the one before it)."""
    from alloc_probe import AllocProbe

    reads = []  # tensor-to-host calls (on a CPU they dispatch no op the probe would see)

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            reads.append(name)
            return orig(self, *a, **kw)
        return orig, read

    prompts = [[5, 6, 7] * 10, [9] * 45, [11, 4] * 30]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=t, seed=3)
              for n, t in ((16, 0.0), (12, 0.8), (20, 0.0))]
    with Engine(model, preset, max_batch=3, overlap=True) as engine:
        orig, probes = engine._launch, []

        def launch(batch, after=None):
            if after is None:
                return orig(batch, after)
            spies = {name: spy(name) for name in ("item", "tolist", "cpu", "numpy")}
            for name, (_, read) in spies.items():
                setattr(torch.Tensor, name, read)
            try:
                with AllocProbe() as probe:
                    out = orig(batch, after)
            finally:
                for name, (was, _) in spies.items():
                    setattr(torch.Tensor, name, was)
            probes.append(probe)
            return out

        engine._launch = launch
        engine.generate(prompts, params)
        fresh = engine.store.hot.pool.peak_used
    assert len(probes) > 5 and fresh > 0
    for probe in probes:
        assert not probe.syncs and not probe.host_values, probe.summary()
    assert not reads, reads


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlap's point is a GPU's queue")


@cuda
@pytest.mark.parametrize("preset", ["quant", "full", "pqcache"])
def test_cuda_a_step_launched_ahead_waits_for_nothing_and_changes_no_token(preset):
    """On a GPU, planning and launching step t+1 (plan, graph replay, sampling, the tokens' copy back)
    makes no synchronizing call (torch.cuda.set_sync_debug_mode: a capture aside), so the host plans
    while the device runs step t; and the tokens are those of the plain loop."""
    import warnings

    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    prompts = [[5, 6, 7] * 10, [9] * 45, [11, 4] * 30]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=t, seed=3)
              for n, t in ((16, 0.0), (12, 0.8), (20, 0.0))]
    with Engine(model, preset, max_batch=3, overlap=False) as plain:
        want = [c.token_ids for c in plain.generate(prompts, params)]
    with Engine(model, preset, max_batch=3) as engine:
        assert engine.overlap and engine.decode_path == "cuda-graph"
        orig, synced, clean = engine._launch, [], []

        def launch(batch, after=None):
            if after is None:
                return orig(batch, after)
            captures = engine.graphs.captures
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = orig(batch, after)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            if engine.graphs.captures == captures:  # a capture synchronizes by itself
                # (the mode's own "prototype feature" notice aside; where it synced: the Python line)
                hits = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                        if "called a synchronizing" in str(w.message)]
                (synced if hits else clean).append(hits)
            return out

        engine._launch = launch
        got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == want
    assert clean and not synced, synced[:1]


@pytest.mark.parametrize("planned", [True, False])
def test_a_step_ahead_that_fails_is_taken_back_and_the_engine_steps_plainly(model, caplog, planned):
    """An error while launching a step ahead takes that step back if it had planned (planned=True: the plan made,
    then a failure), leaves the step it follows alone if not (planned=False: a failure before any plan of its
    own), keeps this step's tokens, logs it and steps plainly from then on: after every step the store's lengths
    are the tokens read (plus the step launched ahead), and the tokens are those of the plain loop."""
    prompts = [[5, 6, 7] * 9, [9, 4] * 20]
    with Engine(model, "quant", overlap=False) as plain:
        want = [c.token_ids for c in plain.generate(prompts, max_new_tokens=6, ignore_eos=True)]
    with Engine(model, "quant", overlap=True) as engine:
        orig, calls = engine._decode, []

        def flaky(batch, staged, positions):
            calls.append(1)
            if len(calls) == (3 if planned else 2):  # the second / the first step launched ahead
                if planned:
                    engine._make_plan(batch, staged[:, 0].contiguous(), positions)  # planned, then it fails
                raise RuntimeError("injected")
            return orig(batch, staged, positions)

        engine._decode = flaky
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in prompts]
        tokens = {i: [] for i in ids}
        with caplog.at_level("WARNING", logger="kvstore.engine"):
            while engine.has_unfinished:
                for out in engine.step():
                    tokens[out.request_id].append(out.token_id)
                for r in engine.running:  # the store's lengths: the tokens read, plus the step launched ahead
                    assert int(engine.store.seq_len[r.seq_id]) == r.length - 1 + int(engine._ahead is not None)
        assert not engine.overlap and "launching a step ahead failed (RuntimeError: injected)" in caplog.text
        assert engine.store.hot.pool.num_used == 0
    assert [tokens[i] for i in ids] == want


def test_a_step_ahead_that_fails_after_its_plan_where_it_cannot_be_taken_back_raises(model):
    """pqcache's step launched ahead cannot be taken back: a failure after its plan is the caller's
    (the store is then a step ahead of its requests), not stepped over; one before the plan is."""
    for planned in (False, True):
        with Engine(model, "pqcache", overlap=True) as engine:
            orig, calls = engine._decode, []

            def flaky(batch, staged, positions):
                calls.append(1)
                if len(calls) == 2:  # the first step launched ahead
                    if planned:
                        engine._make_plan(batch, staged[:, 0].contiguous(), positions)
                    raise RuntimeError("injected")
                return orig(batch, staged, positions)

            engine._decode = flaky
            engine.add_request([5, 6, 7] * 9, SamplingParams(max_new_tokens=6, ignore_eos=True))
            engine.admit()
            if planned:
                with pytest.raises(RuntimeError, match="injected"):
                    engine.decode_step()
            else:
                assert len(engine.decode_step()) == 1 and not engine.overlap


def test_riding_steps_survive_aborts_and_arrivals_and_return_every_token_once(model):
    """pqcache's steps launched ahead (riding) under a server's traffic: random stop tokens, an abort and an
    arrival mid-run: each request ends once (an aborted one never), with a token returned for each step, and
    nothing is left behind (pages, sequences, the step ahead, riders, landed tokens)."""
    rng = random.Random(3)
    ridden = 0
    for trial in range(3):
        with Engine(model, "pqcache", max_batch=4, overlap=True) as engine:
            reqs, limit = {}, {}
            for _ in range(6):
                prompt = [rng.randrange(3, 128) for _ in range(rng.randint(20, 60))]
                params = SamplingParams(max_new_tokens=rng.randint(3, 9),
                                        stop_token_ids=tuple(rng.sample(range(3, 128), 20)))
                rid = engine.add_request(prompt, params)
                reqs[rid], limit[rid] = [], params.max_new_tokens
            target, aborted, step, ended = list(reqs)[trial], False, 0, []
            while engine.has_unfinished:
                if step == 3:
                    aborted = engine.abort(target)  # False where it had ended already
                if step == 5:
                    rid = engine.add_request([5, 6, 7] * 9, SamplingParams(max_new_tokens=4))
                    reqs[rid], limit[rid] = [], 4
                for out in engine.step():
                    reqs[out.request_id].append(out.token_id)
                    if out.finished:
                        ended.append(out.request_id)
                step += 1
            store = engine.store
            assert (store.hot.pool.num_used, len(store.active), engine._ahead, engine._riders, engine._landed) == \
                (0, 0, None, [], [])
            assert len(ended) == len(set(ended)) == len(reqs) - int(aborted) and (target in ended) != aborted
            assert all(1 <= len(reqs[i]) <= limit[i] for i in ended)  # no token twice, none past its limit
            ridden += engine.ridden_steps
    assert ridden > 0  # some step launched ahead ran for a request that had stopped
