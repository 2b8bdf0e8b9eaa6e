"""The `full` preset is the correctness anchor: through `attach` it must equal the bare model."""

import gc
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvstore import AlreadyAttachedError, KVStoreClient, KVStoreConfig
from kvstore.adapters.hf import CACHE_ARG, KVStoreCache, UnsupportedModelError, model_cache
from tests.conftest import TINY, left_padded_batch, tiny_model


def _generate(model, ids, mask, **kw):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, **kw,
    )


def test_full_preset_equals_unattached_model(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    ref = _generate(model, ids, mask)
    client = KVStoreClient(KVStoreConfig.preset("full"))
    with client.attach(model):
        out = _generate(model, ids, mask)
        assert isinstance(model_cache(out), KVStoreCache)
        stats = client.stats()
        setattr(out, CACHE_ARG, None)  # drop the output's reference to the cache
    assert torch.equal(ref.sequences, out.sequences)
    assert torch.equal(ref.logits[0], out.logits[0])  # prefill: bit-equal (README's preset table)
    err = max((a - b).abs().max().item() for a, b in zip(ref.logits[1:], out.logits[1:]))
    assert err < 1e-6, err  # decode: another summation order; observed 1.2e-7 to 3.7e-7 in fp32
    # 53 prompt tokens (20+18+15 valid) + 3 x 23 decoded tokens went through the store
    assert stats["tokens"] == 53 + 3 * 23
    assert stats["dense_kv_bytes"] == stats["tokens"] * 2 * 2 * 2 * 16 * 4
    assert stats["gpu_kv_bytes"] > 0 and stats["host_kv_bytes"] == 0
    assert client.store.hot.pool.all_free()


def test_detach_restores_model_exactly():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    impl = model.config._attn_implementation
    before = model(ids, attention_mask=mask).logits
    client = KVStoreClient(KVStoreConfig.preset("full")).attach(model)
    assert model.config._attn_implementation != impl
    client.detach()
    assert model.config._attn_implementation == impl
    assert not model._forward_pre_hooks and not model._forward_hooks
    after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert not isinstance(model_cache(out), KVStoreCache)


def test_sampling_and_pages_freed_after_generation():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    client = KVStoreClient(KVStoreConfig.preset("full"))
    with client.attach(model):
        torch.manual_seed(3)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
        gc.collect()
        assert client.store.hot.pool.all_free()  # the cache went out of scope
    torch.manual_seed(3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(out, ref)


def test_forward_loop_over_past_key_values():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=2, pads=(3, 0))
    ref = model(ids, attention_mask=mask, use_cache=True)
    client = KVStoreClient(KVStoreConfig.preset("full"))
    with client.attach(model):
        out = model(ids, attention_mask=mask, use_cache=True)
        assert torch.allclose(out.logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5)
        past, ref_past = model_cache(out), model_cache(ref)
        our_ids, m = out.logits[:, -1].argmax(-1), mask
        for _ in range(5):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            pos = (m.sum(1, keepdim=True) - 1)
            step = model(our_ids[:, None], attention_mask=m, **{CACHE_ARG: past}, position_ids=pos)
            past = model_cache(step)
            our_ids = step.logits[:, -1].argmax(-1)
        client.detach()
    m = mask
    ref_ids = ref.logits[:, -1].argmax(-1)
    for _ in range(5):
        m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
        pos = (m.sum(1, keepdim=True) - 1)
        step = model(ref_ids[:, None], attention_mask=m, **{CACHE_ARG: ref_past}, position_ids=pos)
        ref_past = model_cache(step)
        ref_ids = step.logits[:, -1].argmax(-1)
    assert torch.equal(ref_ids, our_ids)


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    client = KVStoreClient(KVStoreConfig.preset("full"))
    with client.attach(model):
        a = model(ids[:, :10], use_cache=True)
        b = model(ids[:, 10:], **{CACHE_ARG: model_cache(a)}, use_cache=True)
    got = torch.cat([a.logits, b.logits], 1)
    assert (got - ref).abs().max().item() < 1e-5


def test_use_cache_false_is_exact():
    model = tiny_model("mistral")
    ids, mask = left_padded_batch()
    ref = model(ids, attention_mask=mask, use_cache=False).logits
    with KVStoreClient(KVStoreConfig.preset("full")).attach(model):
        got = model(ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max().item() < 1e-5


def test_bf16_model_matches():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = left_padded_batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with KVStoreClient(KVStoreConfig.preset("full")).attach(model):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, got)


# ---- refusals -------------------------------------------------------------------------------

def _client():
    return KVStoreClient(KVStoreConfig.preset("full"))


def test_refuses_other_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        _client().attach(model)


def test_refuses_encoder_decoder():
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        _client().attach(model)


def test_refuses_sliding_window():
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        _client().attach(model)
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        _client().attach(model)


def test_refuses_mixed_dtypes():
    model = tiny_model("llama")
    model.lm_head.to(torch.float16)
    with pytest.raises(UnsupportedModelError, match="dtypes"):
        _client().attach(model)


def test_refuses_beam_search_and_stays_usable():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    client = _client()
    with client.attach(model):
        with pytest.raises(NotImplementedError, match="beam"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
        gc.collect()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (3, 24)
        gc.collect()
        assert client.store.hot.pool.all_free()


def test_refuses_foreign_cache():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids, _ = left_padded_batch(pads=(0, 0, 0))
    dense = model_cache(model(ids, use_cache=True))
    assert isinstance(dense, DynamicCache)
    client = _client()
    with client.attach(model):
        with pytest.raises(ValueError, match="not built by kvstore"):
            model(ids[:, :1], **{CACHE_ARG: dense})


# ---- one client per model; a model is never left broken (issue 19) ----------------------------

def _greedy(model):
    ids, mask = left_padded_batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _snapshot(model):
    """What attach changes on the model and detach must put back, and the model's greedy output."""
    return dict(
        configs=[(name, id(m.config)) for name, m in model.named_modules() if hasattr(m, "config")],
        impl=model.config._attn_implementation,
        hooks=(len(model._forward_pre_hooks), len(model._forward_hooks)),
        own_generate="generate" in vars(model),
        out=_greedy(model),
    )


def _registered():
    return set(ALL_ATTENTION_FUNCTIONS._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


def _assert_restored(model, before):
    """The same config objects, implementation, hooks and generate as before attach; bit-equal output."""
    after = _snapshot(model)
    (seq, logits), (ref_seq, ref_logits) = after.pop("out"), before["out"]
    assert after == {k: v for k, v in before.items() if k != "out"}
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


def _assert_served(model, before):
    """Attached with `full`: the same greedy tokens as the bare model, logits to float rounding."""
    assert "generate" in vars(model)  # the adapter's wrapper
    (seq, logits), (ref_seq, ref_logits) = _greedy(model), before["out"]
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() < 1e-4  # observed ~1e-7 in fp32


@pytest.mark.parametrize("order", ["holder_first", "refused_first"])
def test_second_client_is_refused_and_any_detach_order_restores(order):
    model = tiny_model("llama")
    registered, before = _registered(), _snapshot(model)
    c1, c2 = _client(), _client()
    c1.attach(model)
    with pytest.raises(AlreadyAttachedError, match=re.escape(repr(c1)) + ".*detach") as err:
        c2.attach(model)
    assert err.value.holder is c1 and not c2.attached
    _assert_served(model, before)  # c1 still serves it
    for client in (c1, c2) if order == "holder_first" else (c2, c1):
        client.detach()
    c1.detach(), c2.detach()  # detaching twice does nothing
    _assert_restored(model, before)
    assert _registered() == registered
    with c2.attach(model):  # once c1 let go, c2 may attach
        _assert_served(model, before)
    _assert_restored(model, before)


def test_same_client_twice_is_refused():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    before, before_other = _snapshot(model), _snapshot(other)
    client = _client().attach(model)
    with pytest.raises(AlreadyAttachedError, match="already attached to this model; call detach"):
        client.attach(model)
    with pytest.raises(AlreadyAttachedError, match="already attached to a LlamaForCausalLM; call detach"):
        client.attach(other)
    _assert_restored(other, before_other)  # the refused attach changed nothing
    _assert_served(model, before)
    client.detach()
    _assert_restored(model, before)


def test_detach_of_a_client_never_attached_changes_nothing():
    model = tiny_model("llama")
    before = _snapshot(model)
    client = _client()
    client.detach()
    assert client.stats()["sequences"] == 0
    _assert_restored(model, before)


def _shared_config_models():
    """Two Llamas (different weights) built from one LlamaConfig object."""
    config = LlamaConfig(**TINY)
    torch.manual_seed(0)
    m1 = LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    m2 = LlamaForCausalLM(config).eval()
    assert m1.config is config and m2.config is config and m1.model.layers[0].self_attn.config is config
    return config, m1, m2


@pytest.mark.parametrize("order", ["m1_first", "m2_first"])
def test_models_sharing_a_config_stay_independent(order):
    config, m1, m2 = _shared_config_models()
    fields, impl = config.to_dict(), config._attn_implementation
    registered, before1, before2 = _registered(), _snapshot(m1), _snapshot(m2)
    c1 = _client().attach(m1)
    assert config._attn_implementation == impl and config.to_dict() == fields  # the shared object is untouched
    _assert_restored(m2, before2)  # the other model is exactly as it was
    _assert_served(m1, before1)
    c2 = _client().attach(m2)
    _assert_served(m2, before2)
    _assert_served(m1, before1)
    pairs = [(c1, m1, before1), (c2, m2, before2)]
    if order == "m2_first":
        pairs.reverse()
    (first, first_model, first_before), (second, second_model, second_before) = pairs
    first.detach()
    _assert_restored(first_model, first_before)
    _assert_served(second_model, second_before)
    second.detach()
    _assert_restored(m1, before1)
    _assert_restored(m2, before2)
    assert config._attn_implementation == impl and config.to_dict() == fields
    assert _registered() == registered


def test_hot_tier_cap_raises_out_of_pages_without_losing_the_model():
    from kvstore import OutOfPagesError

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    client = KVStoreClient(KVStoreConfig.preset("full", hot_tier_bytes=8 * 4096))
    with client.attach(model):
        with pytest.raises(OutOfPagesError, match="hot_tier_bytes"):
            model.generate(ids, attention_mask=mask, max_new_tokens=200, do_sample=False, pad_token_id=0)
    ref = model(ids, attention_mask=mask).logits  # detached model still works
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize("preset,caps", [
    ("full", dict(hot_tier_bytes=8 * 4096)),    # OutOfPagesError at a decode step
    ("oracle", dict(host_tier_bytes=131072)),   # one cold-tier chunk (2 layers x K,V x 2 heads x 256 x 16 x 4 B) for 3 prompts
])
def test_a_generate_that_raises_holds_nothing(preset, caps):
    """A generation that fails releases the sequences it started before the error reaches the caller
    (the pre-hook's reference to the cache held them, pages and host chunks, until the next forward;
    then releasing them crashed in stats() for a selector whose state had not grown yet)."""
    from kvstore import OutOfPagesError
    from kvstore.cold.host_tier import ColdTierMemoryError

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    client = KVStoreClient(KVStoreConfig.preset(preset, **caps))
    with client.attach(model):
        with pytest.raises((OutOfPagesError, ColdTierMemoryError), match="tier_bytes"):
            model.generate(ids, attention_mask=mask, max_new_tokens=200, do_sample=False, pad_token_id=0)
        store = client.store
        assert not store.active and store.hot.pool.num_used == 0
        assert store.cold is None or store.cold.used_bytes == 0
        assert client.stats()["live"] is False
    assert not client.attached


def test_dtype_change_after_attach_is_refused():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    client = _client().attach(model)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="detach"):
        model(ids, attention_mask=mask)
    client.detach()
    gc.collect()


@pytest.mark.parametrize("padded", [False, True])
def test_generate_chunked_prefill_equals_one_shot(padded):
    """`prefill_chunk_tokens` runs a long prompt through the model chunk by chunk (transformers'
    prefill_chunk_size); for `full` in fp32 the tokens are the same as one pass and the logits agree
    to float rounding. quant stays within its quantization error of its own one-pass run."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(length=70, pads=(13, 40, 0)) if padded else left_padded_batch(length=70, pads=())
    outs = {}
    for name, chunk in (("full", None), ("full", 16), ("quant", None), ("quant", 16)):
        client = KVStoreClient(KVStoreConfig.preset(name, prefill_chunk_tokens=chunk))
        with client.attach(model):
            outs[name, chunk] = _generate(model, ids, mask)
            assert client.stats()["tokens"] == int(mask.sum()) + 3 * 23  # stats() after generate: that generation
    one, chunked = outs["full", None], outs["full", 16]
    assert torch.equal(one.sequences, chunked.sequences)
    err = max((a - b).abs().max().item() for a, b in zip(one.logits, chunked.logits))
    assert err < 1e-4, err
    ref = _generate(model, ids, mask)
    assert torch.equal(ref.sequences, one.sequences)
    q_one, q_chunk = outs["quant", None].logits[0], outs["quant", 16].logits[0]
    q_err = (q_one - q_chunk).abs().max().item()
    assert q_err < 0.05 * (q_one - ref.logits[0]).abs().max().item() + 0.05, q_err


@pytest.mark.parametrize("name", ["full", "quant", "leankv"])
@pytest.mark.parametrize("length,chunk", [(3, 1), (5, 2), (23, 4)], ids=["chunks-of-1", "last-chunk-of-1", "last-of-3"])
def test_one_token_prefill_chunks_are_prefill_not_decode(name, length, chunk):
    """A one-token chunk of a chunked prefill (prefill_chunk_tokens=1, or a last chunk of 1) was taken
    for a decode step: a padding column was stored as a token (full's logits off by 0.1), and a last
    chunk of one token skipped the prefill path (where LeanKV decides over the whole prompt). Now the
    cache knows the prompt's width."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = left_padded_batch(batch=2, length=length, pads=(length - 1, 0))
    ref = None
    for c in (None, chunk):
        client = KVStoreClient(KVStoreConfig.preset(name, prefill_chunk_tokens=c))
        with client.attach(model):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            assert client.stats()["tokens"] == int(mask.sum()) + 2 * 2
        if ref is None:
            ref = out
    assert torch.equal(ref.sequences, out.sequences) or name != "full"
    if name == "full":
        err = max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits))
        assert err < 1e-4, err


def test_generate_chunks_only_long_prompts_of_chunkable_presets():
    """The wrapper passes prefill_chunk_size only where it applies (even chunks of at most
    prefill_chunk_tokens; not with a cold tier), and detach restores generate."""
    model = tiny_model("llama")
    calls = []

    def spy(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape[1])

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    ids, mask = left_padded_batch(length=40, pads=())
    for name, expect in (("full", [14, 14, 12, 1]), ("leankv", [14, 14, 12, 1]), ("pqcache", [40, 1])):
        calls.clear()
        client = KVStoreClient(KVStoreConfig.preset(name, prefill_chunk_tokens=16))
        with client.attach(model):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert calls == expect, (name, calls)
    hook.remove()
    assert "generate" not in vars(model)


def test_stats_after_generate_are_the_generations():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    client = KVStoreClient(KVStoreConfig.preset("quant"))
    with client.attach(model):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        gc.collect()
        s = client.stats()
        assert client.store.hot.pool.all_free()  # the sequences are released ...
    assert s["live"] is False and s["sequences"] == 3  # ... and stats() still describes them
    assert s["gpu_kv_bytes"] > 0 and s["tokens"] == 53 + 3 * 3 and s["compression"] > 1
    assert client.stats()["tokens"] == s["tokens"]  # after detach too


def test_generate_reserves_the_pool_once():
    """generate() sizes the pool for prompt + max_new_tokens up front: no growth mid-generation and
    reserved pages close to the pages used (`full`: every token takes a slot)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(length=64, pads=())
    client = KVStoreClient(KVStoreConfig.preset("full", page_size=16))
    with client.attach(model):
        pool = client.store.hot.pool
        grows = []
        orig = pool._grow
        pool._grow = lambda *a, **kw: (grows.append(a), orig(*a, **kw))[1]
        model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
        s = client.stats()
    assert len(grows) == 1
    # 3 sequences x 2 layers x 2 KV heads x ceil(96 / 16) pages, plus the null page
    assert s["hot_pages_peak"] == 3 * 2 * 2 * 6 and s["hot_pages_reserved"] == 3 * 2 * 2 * 6 + 1


def test_leankv_chunked_prefill_decides_over_the_whole_prompt():
    """LeanKV in chunks: earlier chunks are held in full, the last chunk's queries score the whole
    prompt; what it keeps and its logits stay close to a one-pass prefill's (the earlier chunks
    attend quantized K/V and are re-quantized once)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(length=300, pads=(37, 0, 120))
    res = {}
    for chunk in (None, 64):
        client = KVStoreClient(KVStoreConfig.preset("leankv", prefill_chunk_tokens=chunk, alpha_prune=1.5, alpha_quant=3.0))
        with client.attach(model):
            res[chunk] = (_generate(model, ids, mask), client.stats())
    (one, s_one), (chunked, s_chunk) = res[None], res[64]
    assert s_chunk["tokens"] == s_one["tokens"]
    kept_one = s_one["hot_high_tokens"] + s_one["hot_low_tokens"]
    kept_chunk = s_chunk["hot_high_tokens"] + s_chunk["hot_low_tokens"]
    assert kept_one < s_one["tokens"] * 2 * 2  # the policy pruned (counts are per layer and KV head) ...
    assert abs(kept_chunk - kept_one) <= 0.05 * kept_one  # ... about the same tokens either way
    err = (one.logits[0] - chunked.logits[0]).abs().max().item()
    scale = one.logits[0].abs().max().item()
    assert err < 0.1 * scale, (err, scale)


def test_whole_prompt_policy_refuses_chunks_without_lengths():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with KVStoreClient(KVStoreConfig.preset("leankv")).attach(model):
        a = model(ids[:, :10], use_cache=True)
        with pytest.raises(NotImplementedError, match="prompt lengths"):
            model(ids[:, 10:], **{CACHE_ARG: model_cache(a)}, use_cache=True)
