"""RMSNorm as one Triton launch (gpu_kernels/rms_norm.py) against transformers' own module forward, and the
adapter's `fuse_norms` / `unfuse_norms` on a model of each family (run here in the interpreter; attach installs
them only where the store runs Triton on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_kernels.rms_norm import rms_norm
from kvstore.adapters.hf import fuse_norms, unfuse_norms
from tests.conftest import tiny_model


def _device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 100), (2, 1, 4, 16)])
def test_the_kernel_equals_the_modules_forward(dtype, wdtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = _device()
    g = torch.Generator().manual_seed(sum(shape))
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(dev)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g).to(dev))
    norm.to(wdtype)
    x = (torch.randn(*shape, generator=g) * 3).to(dev, dtype)
    want = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    # fp32: sums in another order. The value is rounded to the input's dtype, then the product to the output's:
    # two units in the last place of a 16-bit input (Triton's interpreter truncates where the GPU rounds)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_non_contiguous_input_and_a_bad_weight():
    dev = _device()
    x = torch.randn(4, 32, 6, device=dev).transpose(1, 2)  # rows of 32 along a strided dim
    w = torch.randn(32, device=dev)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(31, device=dev), 1e-6)


def test_fuse_norms_runs_every_norm_of_a_model_as_the_kernel_and_unfuse_restores_it(family):
    model = tiny_model(family).to(_device())
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(_device())
    with torch.no_grad():
        want = model(ids).logits
    changed = fuse_norms(model)
    per_layer = 4 if family == "qwen3" else 2  # Qwen3: the per-head q/k norms too
    assert len(changed) == per_layer * model.config.num_hidden_layers + 1  # + the final norm
    assert fuse_norms(model) == []  # already fused: left alone
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unfuse_norms(changed)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # the class forward again, bit for bit


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="attach fuses the norms where the store runs Triton on a GPU")
def test_attach_on_a_gpu_fuses_the_norms_and_detach_restores_them():
    from kvstore import KVStoreClient, KVStoreConfig

    model = tiny_model("llama").cuda()
    client = KVStoreClient(KVStoreConfig.preset("quant"))
    with client.attach(model):
        assert sum("forward" in vars(m) for m in model.modules()) == 2 * model.config.num_hidden_layers + 1
        out = model.generate(torch.randint(3, 128, (2, 16), device="cuda"), max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 20)
    assert not any("forward" in vars(m) for m in model.modules())
