"""kvstore: a tiered KV cache for long-context LLM inference."""

from kvstore.config import KVStoreConfig
from kvstore.client import AlreadyAttachedError, KVStoreClient
from kvstore.hot.page_pool import OutOfPagesError

__all__ = ["AlreadyAttachedError", "KVStoreClient", "KVStoreConfig", "OutOfPagesError"]
__version__ = "0.1.0"
