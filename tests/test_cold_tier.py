"""Cold tier: every token's K/V in host memory by position, exact fetch, byte accounting, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from kvstore.cold.gpu_cache import GPUCache
from kvstore.cold.host_tier import ColdTier, ColdTierMemoryError
from kvstore.config import KVStoreConfig
from kvstore.geometry import ModelGeometry
from kvstore.hot.quantization import QuantFormat
from kvstore.plan import Workspace

L, HQ, HKV, D = 2, 4, 2, 8


def _geo(dtype=torch.float32, device="cpu"):
    return ModelGeometry(L, HQ, HKV, D, dtype, torch.device(device))


def _filled(lengths, chunk_tokens=4, steps=0, dtype=torch.float32, seed=0, device="cpu", bits=(16, 16), **config):
    """A cold tier holding a left-padded prompt batch plus `steps` decode tokens; returns (cold, keys, values)."""
    g = torch.Generator().manual_seed(seed)
    cfg = KVStoreConfig(cold_tier=True, cold_key_bits=bits[0], cold_value_bits=bits[1], **config)
    cold = ColdTier(cfg, _geo(dtype, device), max_seqs=8, chunk_tokens=chunk_tokens)
    B, T = len(lengths), max(lengths)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, T - n:] = True
    positions = torch.cumsum(valid.long(), 1) - 1
    seq_ids = torch.tensor([5, 1, 3][:B], device=device)
    k = torch.randn(L, B, HKV, T + steps, D, generator=g).to(device, dtype)
    v = torch.randn(L, B, HKV, T + steps, D, generator=g).to(device, dtype)
    valid, positions = valid.to(device), positions.to(device)
    cold.allocate_prefill(seq_ids, valid.sum(1))
    for layer in range(L):
        cold.write_prefill(layer, k[layer, :, :, :T], v[layer, :, :, :T], positions, valid)
    lens = torch.tensor(lengths, device=device)
    for s in range(steps):
        cold.plan_step(seq_ids, lens + s)
        for layer in range(L):
            cold.write_decode(layer, k[layer, :, :, T + s], v[layer, :, :, T + s])
    cold.flush()
    # expected per sequence: tokens in position order
    exp_k = [torch.cat([k[:, b, :, T - n:T], k[:, b, :, T:]], 2) for b, n in enumerate(lengths)]
    exp_v = [torch.cat([v[:, b, :, T - n:T], v[:, b, :, T:]], 2) for b, n in enumerate(lengths)]
    return cold, seq_ids, exp_k, exp_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_decode_tokens_read_back_exactly(dtype):
    cold, seq_ids, exp_k, exp_v = _filled([9, 5, 13], steps=6, dtype=dtype)
    for b, sid in enumerate(seq_ids.tolist()):
        n = exp_k[b].shape[2]
        for layer in range(L):
            assert torch.equal(cold.read_keys(sid, layer, 0, n), exp_k[b][layer])
            assert torch.equal(cold.read_keys(sid, layer, 2, n - 1, values=True), exp_v[b][layer][:, 2:n - 1])
        keys, values = cold.read_sequence(sid)  # export of the whole sequence
        assert torch.equal(keys, exp_k[b]) and torch.equal(values, exp_v[b])


def test_device_chunk_maps_are_refreshed_in_place_while_their_shapes_hold():
    """A decode step captured in a CUDA graph reads the chunk maps at the addresses it captured: a new
    chunk of a sequence (every C steps) updates them in place; a wider table or a new slab replaces them."""
    cold, seq_ids, _, _ = _filled([9, 5, 13], steps=0)
    lens = torch.tensor([9, 5, 13])
    before = {name: (t.data_ptr(), t.shape, t.clone()) for name, t in cold.device_maps().items()}
    in_place = 0
    for s in range(12):  # chunks of 4 tokens: each sequence opens new chunks
        cold.plan_step(seq_ids, lens + s)
        now = cold.device_maps()
        assert torch.equal(now["table"], torch.from_numpy(cold.table))  # the values are this step's
        for name, t in now.items():
            ptr, shape, old = before[name]
            if t.shape == shape:
                assert t.data_ptr() == ptr, f"{name} moved at step {s} with the same shape"
                in_place += not torch.equal(t, old)
            before[name] = (t.data_ptr(), t.shape, t.clone())
    assert in_place >= 2  # some new chunks were written into the same tensors
    cold.flush()


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_fetch_gathers_wanted_rows_and_leaves_the_rest(device):
    cold, seq_ids, exp_k, exp_v = _filled([9, 5, 13], steps=7, device=device)
    g = torch.Generator().manual_seed(3)
    B, k = 3, 6
    lens = torch.tensor([e.shape[2] for e in exp_k])
    pos = (torch.rand(B, HKV, k, generator=g) * lens.view(B, 1, 1)).long().to(device)
    want = (torch.rand(B, HKV, k, generator=g) < 0.6).to(device)
    for layer in range(L):
        out = torch.full((2, B, HKV, k, D), 7.0, device=device)
        cold.fetch(layer, seq_ids, pos, want, out)
        for b in range(B):
            for h in range(HKV):
                for j in range(k):
                    if want[b, h, j]:
                        assert torch.equal(out[0, b, h, j], exp_k[b][layer, h, pos[b, h, j]])
                        assert torch.equal(out[1, b, h, j], exp_v[b][layer, h, pos[b, h, j]])
                    else:
                        assert (out[:, b, h, j] == 7.0).all()


@pytest.mark.parametrize("bits,dequantize", [((16, 16), True), ((8, 4), True), ((8, 4), False), ((8, 8), True)])
def test_the_fused_fetch_equals_the_per_slab_path_bit_for_bit(bits, dequantize):
    """`gpu_kernels.fetch.fetch_positions` (one launch: positions mapped to slab rows and read by each
    slab's address) against the same tier's other path (`rows`, then a gather per slab: the kernels of
    gpu_kernels/fetch.py, themselves held to the torch references). CPU tensors on the interpreter (CI);
    CUDA tensors and pinned slabs through the compiled kernels on a GPU machine."""
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
    cold, seq_ids, exp_k, _ = _filled([9, 5, 13], steps=7, bits=bits, use_triton="always", device=dev)
    assert len(cold.slabs) > 1  # decode's chunks came in slabs of their own: the kernel picks the slab per row
    g = torch.Generator().manual_seed(4)
    B, k = 3, 6
    lens = torch.tensor([e.shape[2] for e in exp_k])
    pos = (torch.rand(B, HKV, k, generator=g) * lens.view(B, 1, 1)).long()
    pos[0, 0, 0] = -1  # an unwanted pick past a sequence's positions
    want = torch.rand(B, HKV, k, generator=g) < 0.6
    want[0, 0, 0] = False
    pos, want = pos.to(dev), want.to(dev)
    assert cold._fused_fetch(pos, want, torch.empty(2, B, HKV, k, D, device=dev))
    got = {}
    for path in ("fused", "per slab"):
        if path == "per slab":
            cold._fused_fetch = lambda *args: False
        ws = cold.fetch_workspace(seq_ids, k, Workspace(torch.device(dev)))
        for layer in range(L):
            if "raw" in ws:
                ws["raw"].fill_(0xAB)
            out = torch.full((2, B, HKV, k, D), 7.0, device=dev)
            cold.fetch(layer, seq_ids, pos, want, out, ws, dequantize=dequantize)
            got[path, layer] = (out, ws["raw"].clone() if "raw" in ws else None)
    for layer in range(L):
        (out_f, raw_f), (out_p, raw_p) = got["fused", layer], got["per slab", layer]
        assert torch.equal(out_f, out_p), layer
        assert raw_f is None or torch.equal(raw_f, raw_p), layer
        if bits == (16, 16):  # exact rows
            b, h, j = (int(x) for x in want.nonzero()[0])
            assert torch.equal(out_f[0, b, h, j].cpu(), exp_k[b][layer, h, int(pos[b, h, j])].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
@pytest.mark.parametrize("bits", [(16, 16), (8, 4)])
def test_pinned_slabs_take_exactly_their_bytes(bits):
    """On CUDA a slab is registered with the runtime (pinned, its exact size: no power-of-two rounding),
    the fetch kernel reads it, and it is unpinned when the tier goes away."""
    import gc

    cold, seq_ids, exp_k, _ = _filled([9, 5, 13], steps=2, dtype=torch.bfloat16, device="cuda", bits=bits)
    assert all(s.is_pinned() for s in cold.slabs) and len(cold._registered) == len(cold.slabs)
    assert cold.reserved_bytes == sum(s.numel() * s.element_size() for s in cold.slabs)
    if bits == (16, 16):
        assert torch.equal(cold.read_keys(5, 1, 0, 11), exp_k[0][1].cpu())
    else:  # within half a step
        torch.testing.assert_close(cold.read_keys(5, 1, 0, 11).float(), exp_k[0][1].cpu().float(), rtol=0, atol=0.02)
    registered = cold._registered
    del cold
    gc.collect()
    assert registered == []  # the finalizer unpinned them


def test_byte_accounting_and_release():
    cold, seq_ids, exp_k, _ = _filled([9, 5, 13], chunk_tokens=4, steps=3)
    chunks = sum((e.shape[2] + 3) // 4 for e in exp_k)  # 12+8+16 tokens -> 3 + 2 + 4 chunks
    assert chunks == 9
    assert cold.chunk_bytes == L * 2 * HKV * 4 * D * 4
    assert cold.used_bytes == chunks * cold.chunk_bytes
    assert cold.reserved_bytes >= cold.used_bytes
    cold.release(seq_ids)
    assert cold.used_bytes == 0


def test_host_memory_cap_is_a_clear_error():
    cfg = KVStoreConfig(cold_tier=True, host_tier_bytes=2000)  # one chunk of 4 tokens is 1024 B
    cold = ColdTier(cfg, _geo(), max_seqs=2, chunk_tokens=4)
    with pytest.raises(ColdTierMemoryError, match="host_tier_bytes=2000"):
        cold.allocate_prefill(torch.tensor([0]), torch.tensor([40]))
    # the first sequence fits, the second does not: nothing of the batch stays allocated
    one_seq = L * 2 * HKV * 4 * D * 4 * 10  # 40 tokens = 10 chunks of 4
    cold = ColdTier(KVStoreConfig(cold_tier=True, host_tier_bytes=one_seq), _geo(), max_seqs=2, chunk_tokens=4)
    with pytest.raises(ColdTierMemoryError, match="host_tier_bytes"):
        cold.allocate_prefill(torch.tensor([0, 1]), torch.tensor([40, 40]))
    assert cold.used_bytes == 0 and (cold.table == -1).all() and cold.reserved_bytes <= one_seq


@pytest.mark.parametrize("bits", [(8, 4), (8, 8)])
@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_quantized_cold_tier_round_trip_within_half_a_step(bits, use_triton):
    """K8V4 / K8V8 rows (prefill and decode tokens) read back within half a quantization step of what
    was written, per token and KV head; the fetch returns the same values as the reads."""
    cold, seq_ids, exp_k, exp_v = _filled([9, 5, 13], steps=6, bits=bits, use_triton=use_triton)
    assert cold.fmt is not None and cold.row_bytes == D * (bits[0] + bits[1]) // 8 + 8
    for b, sid in enumerate(seq_ids.tolist()):
        n = exp_k[b].shape[2]
        for layer in range(L):
            for values, exp, nbits in ((False, exp_k, bits[0]), (True, exp_v, bits[1])):
                want = exp[b][layer]  # [H, n, d]
                got = cold.read_keys(sid, layer, 0, n, values=values)
                half_step = (want.amax(-1) - want.amin(-1)) / ((1 << nbits) - 1) / 2  # [H, n]
                err = (got - want).abs().amax(-1)
                assert (err <= half_step * (1 + 2 ** -6) + 1e-6).all(), (layer, values, (err / half_step).max())
    # the fetch of a quantized tier equals its reads
    pos = torch.tensor([[[0, 4, 8], [1, 2, 3]]] * 3)
    want = torch.tensor([[[True, False, True], [True, True, True]]] * 3)
    out = torch.full((2, 3, HKV, 3, D), 7.0)
    cold.fetch(1, seq_ids, pos, want, out)
    for b, sid in enumerate(seq_ids.tolist()):
        keys, values = cold.read_keys(sid, 1, 0, 9), cold.read_keys(sid, 1, 0, 9, values=True)
        for h in range(HKV):
            for j in range(3):
                p = int(pos[b, h, j])
                if want[b, h, j]:
                    assert torch.equal(out[0, b, h, j], keys[h, p]) and torch.equal(out[1, b, h, j], values[h, p])
                else:
                    assert (out[:, b, h, j] == 7.0).all()


def test_quantized_cold_tier_holds_its_rows_bytes():
    """K8V4 at d = 8: 8 + 4 + 8 B a token and KV head against 2 * 8 * 4 B at fp32; bytes counted exactly."""
    cold, seq_ids, exp_k, _ = _filled([9, 5, 13], chunk_tokens=4, steps=3, bits=(8, 4))
    assert cold.chunk_bytes == L * HKV * 4 * 20
    assert cold.used_bytes == 9 * cold.chunk_bytes
    assert cold.reserved_bytes == sum(s.numel() for s in cold.slabs) >= cold.used_bytes
    cold.release(seq_ids)
    assert cold.used_bytes == 0


def test_quantized_cold_tier_head_dims():
    """A head dim the Triton kernels cannot take (not a power of two) runs the torch ops; one that is not
    a multiple of 8 (codes packed by bytes) is refused when the tier is built."""
    cfg = KVStoreConfig(cold_tier=True, cold_key_bits=8, cold_value_bits=4, use_triton="always")
    cold = ColdTier(cfg, ModelGeometry(L, HQ, HKV, 24, torch.float32, torch.device("cpu")), max_seqs=2)
    assert cold.fmt.use_triton is False and cold.use_triton is True
    cold.allocate_prefill(torch.tensor([0]), torch.tensor([3]))
    k = torch.randn(1, HKV, 3, 24)
    cold.write_prefill(0, k, k, torch.arange(3).view(1, 3), torch.ones(1, 3, dtype=torch.bool))
    out = torch.zeros(2, 1, HKV, 1, 24)
    cold.fetch(0, torch.tensor([0]), torch.full((1, HKV, 1), 2), torch.ones(1, HKV, 1, dtype=torch.bool), out)
    torch.testing.assert_close(out[0, 0, :, 0], k[0, :, 2], rtol=0, atol=0.02)
    with pytest.raises(ValueError, match="multiple of 8"):
        ColdTier(cfg, ModelGeometry(L, HQ, HKV, 12, torch.float32, torch.device("cpu")), max_seqs=2)


def test_reserved_host_bytes_stay_within_5_percent_of_used_through_decode():
    """Prompts take runs sized to them; the chunks decode adds come in small slabs (1/32 of what the
    tier holds), so a decode step that crosses a chunk boundary does not reserve a 1 GiB slab."""
    cold = ColdTier(KVStoreConfig(cold_tier=True, cold_key_bits=8, cold_value_bits=4), _geo(), max_seqs=4,
                    chunk_tokens=4)
    seq_ids, n = torch.arange(4), 512  # 128 chunks a sequence
    cold.allocate_prefill(seq_ids, torch.full((4,), n))
    assert cold.reserved_bytes == cold.used_bytes
    for step in range(10):  # crosses chunk boundaries at positions 512 and 516
        cold.plan_step(seq_ids, torch.full((4,), n + step))
        ratio = cold.reserved_bytes / cold.used_bytes
        assert 1.0 <= ratio <= 1.05, (step, ratio)
    cold.release(seq_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", ["never", "always"])
def test_quantized_gpu_cache_hit_is_the_fetch_bit_for_bit(use_triton, dtype):
    """A quantized cold tier's GPU cache holds its rows: a token admitted from a fetch (the fetch's raw
    staging, no requantization) and read back as a hit a step later is bit for bit a fetch of it;
    a miss's row of the read's output is left alone."""
    cold, seq_ids, _, _ = _filled([9, 5, 13], steps=3, bits=(8, 4), dtype=dtype, use_triton=use_triton)
    cache = GPUCache(_geo(dtype), max_seqs=8, slots=4, cap=16, row_format=cold.fmt)
    assert cache.k is None and cache.v is None and cache.rows.shape[-1] == cold.row_bytes == 20
    B, k = 3, 3
    wsp = Workspace(torch.device("cpu"))
    fws, cws = cold.fetch_workspace(seq_ids, k, wsp), cache.plan_workspace(seq_ids, k, wsp)
    valid = torch.ones(B, HKV, k, dtype=torch.bool)
    pos = torch.tensor([[[0, 4, 8], [1, 2, 3]]] * B)
    for layer in range(L):  # step 0: all misses, fetched and admitted
        slot = cache.lookup(layer, seq_ids, pos, valid, cws)
        assert (slot < 0).all()
        buf = torch.full((2, B, HKV, k, D), 7.0, dtype=dtype)
        cold.fetch(layer, seq_ids, pos, slot < 0, buf, fws)
        cache.admit(layer, seq_ids, pos, valid, slot, buf, cws, raw=fws["raw"])
    cache.end_step()
    again = torch.tensor([[[8, 4, 7], [3, 5, 1]]] * B)  # 7 and 5: misses
    for layer in range(L):  # step 1: hits read from the cache's rows
        slot = cache.lookup(layer, seq_ids, again, valid, cws)
        hit = slot >= 0
        assert hit.sum() == 4 * B
        out = torch.full((2, B, HKV, k, D), 7.0, dtype=dtype)
        cache.read(layer, seq_ids, slot, out, cws)
        fetched = torch.full_like(out, 5.0)
        cold.fetch(layer, seq_ids, again, valid, fetched)
        assert torch.equal(out[:, hit], fetched[:, hit])
        assert (out[:, ~hit] == 7.0).all()


def test_quantized_gpu_cache_holds_row_bytes():
    """At K8V4, d = 128, bf16 the cache's token storage is 200 B a slot and KV head against 512 B
    (k and v at 16 bits); positions, scores and the position map are the same."""
    geo = ModelGeometry(L, HQ, HKV, 128, torch.bfloat16, torch.device("cpu"))
    fmt = QuantFormat(8, 4, 128, torch.bfloat16)
    wide, narrow = (GPUCache(geo, max_seqs=2, slots=6, cap=40, row_format=f) for f in (None, fmt))
    index = L * HKV * (7 * (4 + 4) + 41 * 2)  # pos int32, score fp32 per slot; slot_of int16 per position
    assert wide.bytes_per_seq - index == L * HKV * 7 * 2 * 128 * 2
    assert (narrow.bytes_per_seq - index) * 2 * 128 * 2 == (wide.bytes_per_seq - index) * fmt.bytes_per_token == \
        (wide.bytes_per_seq - index) * 200
    held = torch.randint(0, 256, (L, 2, HKV, 6, 200), dtype=torch.uint8)
    narrow.rows[:, :, :, :6] = held
    narrow.ensure(3, 9, 40)  # growing keeps the rows and counts the new ones
    assert narrow.rows.shape == (L, 3, HKV, 10, 200) and torch.equal(narrow.rows[:, :2, :, :6], held)
    assert narrow.bytes_per_seq == L * HKV * (10 * (200 + 8) + 41 * 2)
