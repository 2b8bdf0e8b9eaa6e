"""The names a user can write agree with what the store can build: config's selector and hot-policy
names, the registries that build them, and the benchmark's methods."""

from __future__ import annotations

import kvstore.config as config
import kvstore.cold.selectors as selectors
import kvstore.hot.policies as policies
from benchmarks.suite import methods


def test_selector_names_match_the_registry():
    assert set(config.SELECTORS) - {"none"} == set(selectors.SELECTORS)


def test_hot_policy_names_match_the_registry():
    assert set(config.HOT_POLICIES) == set(policies.POLICIES)


def test_every_preset_and_benchmark_method_names_a_registered_part():
    for name in config.KVStoreConfig.preset_names():
        c = config.KVStoreConfig.preset(name)
        assert c.selector == "none" or c.selector in selectors.SELECTORS, name
        assert c.hot_policy in policies.POLICIES, name
    assert set(methods.BASELINE_SELECTORS.values()) <= set(selectors.SELECTORS)
    available = methods.available_methods()
    assert all(available[name] is None for name in methods.METHODS), available  # every method the suite lists runs
