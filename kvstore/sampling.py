"""Sampling on the device: greedy, temperature, top-k, top-p; seeded and batch-invariant.

Every row of a batch is sampled by the Gumbel-max trick with noise that is a pure function of
(the request's seed, its step, the token id): a 32-bit integer hash computed with tensor ops,
no generator state. So a request draws the same tokens whatever batch it shares a step with,
whichever requests came before it, and on every run; rows with temperature 0 take the argmax.

    token = argmax over allowed tokens of  logits / temperature + Gumbel(u(seed, step, token))

which is a sample of softmax(logits / temperature) restricted to the allowed tokens (top-k:
the k largest; top-p: the smallest prefix, by probability, whose mass reaches p; both: the
intersection). Log-probabilities, when asked for, are of the model's distribution
(log_softmax of the raw logits), as vLLM and transformers report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are drawn and when it stops.

    max_new_tokens: tokens to generate at most (>= 1).
    temperature: 0 is greedy (the default); > 0 samples.
    top_k: keep the k most likely tokens (0: all). top_p: nucleus mass in (0, 1] (1: all).
    seed: the request's seed (None: the engine derives one from its own seed and the request's
        number, so a run is reproducible either way).
    stop_token_ids: tokens that end the request (kept in the output), besides the model's EOS
        unless ignore_eos. stop: strings that end the request (cut from the text; needs a tokenizer).
    logprobs: also return each generated token's log-probability.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32 [B, vocab]: a hash of (seed, step, token id) per element.

    seeds, steps: int64 [B] (any values; reduced mod 2^32). The same (seed, step, token) gives
    the same u on every call and every batch.
    """
    dev = seeds.device
    s = _fmix32((seeds.long() & _M32) ^ 0x9E3779B9)
    s = _fmix32(s ^ _mul32(steps.long() & _M32, 0x27D4EB2F))
    tok = torch.arange(vocab, device=dev, dtype=torch.int64)
    x = _fmix32(s.view(-1, 1) ^ _mul32(tok, 0x165667B1).view(1, -1))
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, want_logprobs: bool = False, *,
           rows: torch.Tensor | None = None, filtered: bool | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next tokens of a batch. logits [B, V] (any float dtype; computed in fp32).

    temperature, top_p: float [B]; top_k, seeds, steps: int64 [B] (per row, on logits' device).
    rows, filtered: where the caller knows them from the requests' parameters on the host, the
    sampled rows (int64, those with temperature > 0) and whether any of them keeps only a top-k or
    top-p; then nothing is read back from the device (the engine samples step t+1 before it reads
    step t's tokens). Either way the same tokens.
    Returns tokens int64 [B] and, with want_logprobs, their log-probabilities fp32 [B].
    """
    x = logits.float()
    B, V = x.shape
    tokens = x.argmax(dim=-1)
    if rows is None:
        hot = temperature > 0
        rows = hot.nonzero(as_tuple=True)[0] if bool(hot.any()) else None
    elif rows.numel() == 0:
        rows = None
    if rows is not None:
        xs = x[rows] / temperature[rows].view(-1, 1)
        k = top_k[rows]
        p = top_p[rows]
        allowed = torch.ones_like(xs, dtype=torch.bool)
        if filtered is None:
            filtered = bool(((k > 0) & (k < V)).any()) or bool((p < 1).any())
        if filtered:
            srt, idx = xs.sort(dim=-1, descending=True)
            rank = torch.arange(V, device=x.device).view(1, -1)
            keep = (k.view(-1, 1) <= 0) | (rank < k.view(-1, 1))
            probs = torch.softmax(srt, dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
            keep &= (before < p.view(-1, 1)) | (rank == 0)
            allowed = torch.zeros_like(allowed).scatter_(1, idx, keep)
        g = -torch.log(-torch.log(uniform_noise(seeds[rows], steps[rows], V)))
        scores = torch.where(allowed, xs + g, torch.full_like(xs, float("-inf")))
        tokens = tokens.clone()
        tokens[rows] = scores.argmax(dim=-1)
    logp = None
    if want_logprobs:
        logp = torch.log_softmax(x, dim=-1).gather(1, tokens.view(-1, 1)).squeeze(1)
    return tokens, logp
