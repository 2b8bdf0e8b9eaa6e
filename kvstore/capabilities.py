"""What the store has built, so a preset that needs an unbuilt part fails loudly.

Each part of the store registers itself here when it lands (one line per capability), and
`KVStoreConfig.preset()` checks a config against this table before anything runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.config import KVStoreConfig

# Filled in by the modules that implement each part.
HOT_POLICIES: set[str] = {"all", "window", "leankv"}  # kvstore/policies.py
SELECTORS: set[str] = {"none", "pq", "exact"}  # "pq", "exact": kvstore/selection.py
SELECTORS |= {"streaming", "h2o", "snapkv", "quest"}  # kvstore/baseline_selectors.py
QUANTIZED_HOT_TIER: bool = True  # kvstore/quantization.py
COLD_TIER: bool = True  # kvstore/cold_tier.py
#: LeanKV reads every hot token's attention logits from the quantized paged decode (reference and
#: kernel); neither has a 16-bit page layout, so LeanKV needs key_bits < 16
LEANKV_UNQUANTIZED = "hot_policy='leankv' over an unquantized hot tier (key_bits=16; use key_bits=8, value_bits=4)"


def check_implemented(config: "KVStoreConfig") -> None:
    """Raise NotImplementedError naming the first part of `config` that is not built yet."""
    missing = []
    if config.hot_policy not in HOT_POLICIES:
        missing.append(f"hot_policy={config.hot_policy!r}")
    if config.selector not in SELECTORS:
        missing.append(f"selector={config.selector!r}")
    if config.quantized and not QUANTIZED_HOT_TIER:
        missing.append(f"a quantized hot tier (key_bits={config.key_bits})")
    if config.hot_policy == "leankv" and not config.quantized:
        missing.append(LEANKV_UNQUANTIZED)
    if config.cold_tier and not COLD_TIER:
        missing.append("the cold tier")
    if missing:
        raise NotImplementedError(
            f"preset {config.name!r} needs {', '.join(missing)}, which kvstore does not provide yet"
        )
