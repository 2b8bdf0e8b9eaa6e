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


def test_keys_never_fewer_bits_than_values():
    with pytest.raises(ValueError, match="value_bits"):
        KVStoreConfig(key_bits=4, value_bits=8)


def test_replace_revalidates():
    c = KVStoreConfig.preset("full")
    with pytest.raises(ValueError, match="page_size"):
        dataclasses.replace(c, page_size=-3)
    assert dataclasses.replace(c, token_budget=2048).token_budget == 2048


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
