import dataclasses

import pytest

from kvstore import KVStoreConfig


def test_full_preset_defaults():
    c = KVStoreConfig.preset("full")
    assert c.name == "full" and c.hot_policy == "all" and c.key_bits == 16 and not c.cold_tier


def test_config_is_frozen():
    c = KVStoreConfig.preset("full")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.key_bits = 8


@pytest.mark.parametrize(
    "field,value",
    [
        ("hot_policy", "lru"),
        ("selector", "magic"),
        ("key_bits", 3),
        ("value_bits", 32),
        ("quant_groups", 5),
        ("page_size", 0),
        ("budget_fraction", 0.0),
        ("window_share", 1.0),
        ("pq_bits", 9),
        ("hot_tier_bytes", -1),
        ("use_triton", "sometimes"),
    ],
)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        KVStoreConfig(**{field: value})


@pytest.mark.parametrize("selector", ["pq", "exact", "streaming", "h2o", "snapkv", "quest"])
def test_every_selector_without_a_cold_tier_is_refused_at_construction(selector):
    # the baselines read their selected tokens from the host tier too: refused here, not at the first decode step
    with pytest.raises(ValueError, match="KVStoreConfig.selector=.*needs cold_tier=True"):
        KVStoreConfig(hot_policy="window", selector=selector)
    assert KVStoreConfig(hot_policy="window", selector=selector, cold_tier=True).cold_tier


def test_keys_never_fewer_bits_than_values():
    with pytest.raises(ValueError, match="value_bits"):
        KVStoreConfig(key_bits=4, value_bits=8)


def test_replace_revalidates():
    c = KVStoreConfig.preset("full")
    with pytest.raises(ValueError, match="page_size"):
        dataclasses.replace(c, page_size=-3)
    tiered = KVStoreConfig.preset("tiered")
    assert dataclasses.replace(tiered, token_budget=2048).token_budget == 2048


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="full"):
        KVStoreConfig.preset("nope")


def test_every_design_preset_is_registered():
    for name in ("full", "quant", "leankv", "pqcache", "tiered", "oracle"):
        assert name in KVStoreConfig.preset_names()


def test_unbuilt_preset_raises_not_implemented_or_builds():
    # Presets whose parts are not built yet must say so; built ones construct.
    for name in KVStoreConfig.preset_names():
        try:
            KVStoreConfig.preset(name)
        except NotImplementedError as e:
            assert "does not provide" in str(e)


def test_pqcache_budget_definition():
    c = KVStoreConfig(hot_policy="window", selector="pq", cold_tier=True)
    # PQCache: window int((n - S) c r), top-k int((n - S) c (1 - r)) with S=32, c=0.2, r=0.5
    assert c.window_for(1032) == 100
    assert c.topk_for(1032) == 100
    assert dataclasses.replace(c, token_budget=7).topk_for(1032) == 7


def test_leankv_over_an_unquantized_hot_tier_is_refused_as_unbuilt():
    # LeanKV reads per-token logits from the quantized paged decode, which has no 16-bit layout:
    # this used to crash mid-prefill with a ZeroDivisionError (no low tier to size)
    with pytest.raises(NotImplementedError, match="leankv.*unquantized"):
        KVStoreConfig.preset("leankv", key_bits=16, value_bits=16)


def test_low_tier_bits_are_checked_only_where_there_is_a_low_tier():
    # quant at K2V2 has no low tier: the default low_key_bits=4 used to refuse it
    assert KVStoreConfig.preset("quant", key_bits=2, value_bits=2).key_bits == 2
    with pytest.raises(ValueError, match="low_key_bits.*lower low_key_bits"):
        KVStoreConfig.preset("leankv", key_bits=2, value_bits=2)


@pytest.mark.parametrize("preset", ["full", "quant", "leankv"])
@pytest.mark.parametrize("field,value", [("token_budget", 2048), ("window_tokens", 64), ("budget_fraction", 0.05),
                                         ("window_share", 0.2)])
def test_a_budget_the_preset_cannot_apply_is_refused(preset, field, value):
    # presets without a selector attend every token they keep: a budget there can only be a mistake
    with pytest.raises(ValueError, match=f"KVStoreConfig.{field}=.*has no effect here.*selector"):
        dataclasses.replace(KVStoreConfig.preset(preset), **{field: value})
    with pytest.raises(ValueError, match=field):
        KVStoreConfig.preset(preset, **{field: value})


@pytest.mark.parametrize("preset,field,value", [
    ("leankv", "sink_tokens", 4),            # LeanKV without retrieval may prune the sinks
    ("pqcache", "alpha_prune", 0.1),         # nothing prunes outside LeanKV
    ("full", "alpha_prune", 0.1),
    ("pqcache", "token_budget", None),       # the default: never refused
])
def test_which_tokens_fields_are_refused_where_unappliable(preset, field, value):
    if value is None:
        assert KVStoreConfig.preset(preset, **{field: value}).token_budget is None
        return
    with pytest.raises(ValueError, match=f"KVStoreConfig.{field}"):
        KVStoreConfig.preset(preset, **{field: value})


def test_every_preset_reads_every_field_it_sets():
    for name in KVStoreConfig.preset_names():
        for device in ("cpu", "cuda"):
            assert KVStoreConfig.preset(name).ignored_fields(device) == []


@pytest.mark.parametrize("preset,changes,ignored", [
    ("full", dict(kmeans_iters=4), ["kmeans_iters"]),
    ("full", dict(quant_groups=2, host_tier_bytes=1 << 20, immune_tokens=8, sink_tokens=4),
     ["quant_groups", "immune_tokens", "sink_tokens", "host_tier_bytes"]),
    ("quant", dict(low_key_bits=2, alpha_quant=2.0, gpu_cache_tokens=8), ["low_key_bits", "alpha_quant", "gpu_cache_tokens"]),
    ("oracle", dict(pq_bits=3, pq_subspaces=4), ["pq_subspaces", "pq_bits"]),
    ("pqcache", dict(prefill_chunk_tokens=16, window_tokens=8, token_budget=8, budget_fraction=0.5),
     ["budget_fraction", "prefill_chunk_tokens"]),
    ("pqcache", dict(pq_trainer="device", kmeans_iters=3, kmeans_tol=0.1), ["kmeans_iters"]),
    ("pqcache", dict(pq_trainer="faiss", kmeans_iters=3, kmeans_tol=0.1), ["kmeans_tol"]),
    ("tiered", dict(window_tokens=128), ["window_tokens"]),
    ("tiered", dict(token_budget=16, prefill_chunk_tokens=None), []),
])
def test_harmless_ignored_fields_are_listed(preset, changes, ignored):
    lines = KVStoreConfig.preset(preset, **changes).ignored_fields("cpu")
    assert sorted(line.split("=")[0].removeprefix("KVStoreConfig.") for line in lines) == sorted(ignored)


def test_ignored_fields_are_warned_once_per_config_when_a_store_is_built(caplog):
    import logging

    import torch

    from kvstore.geometry import ModelGeometry
    from kvstore.store import KVStore

    geo = ModelGeometry(1, 2, 1, 16, torch.float32, torch.device("cpu"))
    config = KVStoreConfig.preset("full", kmeans_iters=7, quant_groups=3)
    with caplog.at_level(logging.WARNING, logger="kvstore.config"):
        for _ in range(3):
            KVStore(config, geo).release_all()
        KVStore(KVStoreConfig.preset("full"), geo).release_all()  # nothing ignored: no warning
    warnings = [r for r in caplog.records if r.name == "kvstore.config"]
    assert len(warnings) == 1
    assert "kmeans_iters=7" in warnings[0].getMessage() and "quant_groups=3" in warnings[0].getMessage()


def _geometry(layers=2, kv_heads=2, head_dim=16):
    import torch

    from kvstore.geometry import ModelGeometry

    return ModelGeometry(layers, 2 * kv_heads, kv_heads, head_dim, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("cap", [1, 4096, 5 * 2048 - 1])
def test_a_hot_tier_cap_below_one_token_is_refused_with_the_minimum(cap):
    from kvstore.store import KVStore

    # fp32, head_dim 16, page_size 16: pages of 16 * 2 * 16 * 4 = 2048 B; 2 layers x 2 KV heads -> 5 pages
    config = KVStoreConfig.preset("full", page_size=16, hot_tier_bytes=cap)
    with pytest.raises(ValueError, match=rf"hot_tier_bytes={cap} is below this model's minimum of {5 * 2048} bytes"):
        KVStore(config, _geometry())
    store = KVStore(dataclasses.replace(config, hot_tier_bytes=5 * 2048), _geometry())
    assert store.hot.pool.max_pages == 5
    store.release_all()


def test_a_host_tier_cap_below_one_chunk_is_refused_with_the_minimum():
    from kvstore.store import KVStore

    for bits, per_token in (((16, 16), 2 * 16 * 4), ((8, 4), 16 + 8 + 8)):  # K and V x head_dim x fp32; K8V4 row
        chunk = 2 * 2 * 256 * per_token  # layers x KV heads x 256 tokens x bytes a token and KV head
        config = KVStoreConfig.preset("pqcache", host_tier_bytes=chunk - 1, cold_key_bits=bits[0],
                                      cold_value_bits=bits[1])
        with pytest.raises(ValueError, match=rf"host_tier_bytes={chunk - 1} is below this model's minimum of {chunk} "
                                             rf"bytes.*{per_token} B of K and V at K{bits[0]}V{bits[1]}"):
            KVStore(config, _geometry())
        KVStore(dataclasses.replace(config, host_tier_bytes=chunk), _geometry()).release_all()


def test_a_host_tier_cap_of_one_chunk_serves_a_prompt_of_one_chunk():
    import torch

    from kvstore.cold.host_tier import ColdTier, ColdTierMemoryError

    chunk = 1 * 2 * 1 * 4 * 2 * 4
    cold = ColdTier(KVStoreConfig(cold_tier=True, host_tier_bytes=chunk), _geometry(1, 1, 2), max_seqs=2,
                    chunk_tokens=4)
    cold.allocate_prefill(torch.tensor([0]), torch.tensor([3]))  # a slab used to be >= 4 chunks whatever the cap
    assert cold.reserved_bytes == chunk and cold.used_bytes == chunk
    with pytest.raises(ColdTierMemoryError, match="host_tier_bytes"):
        cold.allocate_prefill(torch.tensor([1]), torch.tensor([3]))
    cold.release(torch.tensor([0]))
    assert cold.used_bytes == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, "256"])
def test_kmeans_points_per_centroid_is_checked(bad):
    from kvstore import KVStoreConfig

    with pytest.raises(ValueError, match="kmeans_points_per_centroid"):
        KVStoreConfig.preset("pqcache", kmeans_points_per_centroid=bad)
    assert KVStoreConfig.preset("pqcache", kmeans_points_per_centroid=None).kmeans_points_per_centroid is None
