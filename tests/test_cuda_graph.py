"""The engine's CUDA-graph decode step (kvstore/cuda_graph.py): replay equals the eager step.

The GPU tests are skipped on CPU; the refusal test runs everywhere."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from kvstore.engine import Engine
from kvstore.sampling import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def test_cuda_graphs_true_is_refused_with_the_reason_and_leaves_the_model_free():
    model = tiny_model("llama")
    reason = "not on CUDA" if not torch.cuda.is_available() else "not the Triton kernel"
    if torch.cuda.is_available():
        model = model.cuda()
    with pytest.raises(ValueError, match=f"cuda_graphs=True: .*{reason}"):  # full: 16-bit pages
        Engine(model, "full" if torch.cuda.is_available() else "quant", cuda_graphs=True)
    with Engine(model, "full", cuda_graphs=False) as engine:  # the refused engine detached itself
        assert engine.decode_path == "eager" and engine.graphs is None


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_replay_equals_the_eager_step_bit_for_bit(dtype):
    model = tiny_model("llama", dtype=dtype).cuda()
    prompts = _prompts([300, 70, 150, 33, 500], seed=1)
    news = [12, 30, 7, 20, 16]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in news]
    with Engine(model, "quant", max_batch=3, cuda_graphs=False) as eager:
        want = eager.generate(prompts, params)
    with Engine(model, "quant", max_batch=3) as graphed:
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
        engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
        first = engine.graphs.captures
        engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
        assert engine.graphs.captures == first and engine.decode_path == "cuda-graph"
