"""The selector registry: selector names (`KVStoreConfig.selector`) to the classes that implement them.

`selection.py` holds the interface and PQCache's and the oracle's selectors,
`baselines.py` the benchmark baselines; this module only names them, so neither imports
the other and the cold path (path.py) builds any of them with `make_selector`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.cold.baselines import H2OSelector, QuestSelector, SnapKVSelector, StreamingSelector
from kvstore.cold.selection import ExactSelector, PQSelector, Selector

if TYPE_CHECKING:
    from kvstore.cold.host_tier import ColdTier
    from kvstore.config import KVStoreConfig
    from kvstore.geometry import ModelGeometry

SELECTORS: dict[str, type[Selector]] = {
    "pq": PQSelector,
    "exact": ExactSelector,
    "streaming": StreamingSelector,
    "h2o": H2OSelector,
    "snapkv": SnapKVSelector,
    "quest": QuestSelector,
}


def make_selector(config: "KVStoreConfig", geometry: "ModelGeometry", cold: "ColdTier") -> Selector:
    """The selector `config.selector` names, built for this store."""
    cls = SELECTORS.get(config.selector)
    if cls is None:
        raise NotImplementedError(f"selector={config.selector!r} is not implemented; known: {sorted(SELECTORS)}")
    return cls(config, geometry, cold)
