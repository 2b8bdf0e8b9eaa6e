"""kvstore: a tiered KV cache for long-context LLM inference."""

from kvstore.config import KVStoreConfig
from kvstore.client import AlreadyAttachedError, KVStoreClient
from kvstore.engine import Completion, Engine, StepOutput
from kvstore.hot.page_pool import OutOfPagesError
from kvstore.sampling import SamplingParams

__all__ = ["AlreadyAttachedError", "Completion", "Engine", "KVStoreClient", "KVStoreConfig", "OutOfPagesError",
           "SamplingParams", "StepOutput"]
__version__ = "0.1.0"
