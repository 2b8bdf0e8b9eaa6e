"""The built-in workload `python -m cluster.launch` serves: seeded random prompts, fixed lengths.

Prompts are random token ids (the random and probe models need no tokenizer), of lengths drawn
from `prompt_tokens`, each asking for exactly `max_new_tokens` greedy tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"Request {self.request_id}: prompt must not be empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"Request {self.request_id}: max_new_tokens={self.max_new_tokens} must be >= 1")


def builtin_workload(num_requests: int = 8, vocab_size: int = 256, prompt_tokens: tuple[int, int] = (8, 48),
                     max_new_tokens: int = 24, seed: int = 0) -> list[Request]:
    """`num_requests` requests with prompts of uniform random length in [lo, hi] tokens."""
    lo, hi = prompt_tokens
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt_tokens={prompt_tokens} must satisfy 1 <= lo <= hi")
    if vocab_size < 4:
        raise ValueError(f"vocab_size={vocab_size} must be >= 4")
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(num_requests):
        n = int(rng.integers(lo, hi + 1))
        prompt = tuple(int(x) for x in rng.integers(3, vocab_size, size=n))  # ids 0..2 are special in Llama
        requests.append(Request(i, prompt, max_new_tokens))
    return requests


def outputs_sha256(outputs: list[list[int]]) -> str:
    """SHA-256 over the generated token ids, in request order."""
    return hashlib.sha256(json.dumps(outputs, separators=(",", ":")).encode()).hexdigest()
