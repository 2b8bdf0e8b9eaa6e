"""Hot-tier policies: which tokens the GPU pages keep, and where each decode step's new token goes.

A policy is a small strategy object with three decisions, all batched over sequences, layers
and KV heads (no Python loop over any of them):

* `prefill(...)`: per (sequence, KV head) of one layer, which prompt tokens the hot tier keeps
  (and, for LeanKV, at which precision tier).
* `plan(...)`: once per decode step, for every (sequence, layer, KV head) at once, whether the
  new token takes a fresh slot (index -1) or *reuses* the high-tier slot of a token that leaves
  the hot tier this step. The store turns the index into (page, slot) through the page table.
  The position of the token that leaves is reported (`evicted_pos`) so the cold tier, which
  identifies tokens by position, can keep it reachable.
* `observe(...)`: per layer at decode, the attention probabilities of the step (LeanKV's score
  update; the other policies ignore it).

High-tier index i of a head lives in page `table.pages[..., i // tokens_per_page]`, slot
`i % tokens_per_page` (kvstore/page_table.py).

Policies:
  all     every token stays (the foundation's behaviour).
  window  `sink_tokens` sinks + the most recent W tokens, W = `config.window_for(prompt_len)`
          fixed per sequence at prefill (PQCache). At each decode step the token at position
          p - W leaves the window and the new token p takes its slot.
  leankv  LeanKV's per-head dynamic sparsity (see `LeanKVPolicy`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvstore.config import KVStoreConfig
    from kvstore.store import KVStore

logger = logging.getLogger(__name__)


@dataclass
class PrefillKeep:
    """Which tokens of a prefill chunk the hot tier keeps, per (sequence, KV head).

    high: bool [B, Hkv, T] tokens stored in the high tier (padding never).
    low:  bool [B, Hkv, T] or None, tokens stored in the low tier (LeanKV only).
    """

    high: torch.Tensor
    low: torch.Tensor | None = None


@dataclass
class StepDecision:
    """A policy's decision for one decode step, for every (sequence, layer, KV head).

    reuse:       int64 [B, L, Hkv] high-tier index whose slot the new token takes; -1 = fresh slot.
    evicted_pos: int64 [B, L, Hkv] position of the token that leaves the hot tier; -1 = none.
    """

    reuse: torch.Tensor
    evicted_pos: torch.Tensor


class HotPolicy:
    """Base policy; subclasses override what they decide differently."""

    name = "base"

    def __init__(self, config: "KVStoreConfig", max_seqs: int, device: torch.device):
        self.config = config
        self.device = torch.device(device)

    def ensure_seqs(self, max_seqs: int) -> None:
        """Grow per-sequence state to `max_seqs` slots (between steps)."""

    def prefill(self, store: "KVStore", layer: int, seq_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, scale: float) -> PrefillKeep:
        """Decide which tokens of a prefill chunk one layer keeps.

        Args:
            seq_ids: int64 [B]; q: [B, Hq, T, d]; k: [B, Hkv, T, d] post-RoPE.
            positions: int64 [B, T] token positions (meaningless where ~valid).
            valid: bool [B, T], False for padding.
        """
        B, Hkv, T, _ = k.shape
        return PrefillKeep(high=valid.view(B, 1, T).expand(B, Hkv, T))

    def plan(self, store: "KVStore", seq_ids: torch.Tensor, positions: torch.Tensor) -> StepDecision:
        """Where the new token of every (sequence, layer, KV head) goes this step.

        Args:
            seq_ids: int64 [B]; positions: int64 [B], the position of the token being decoded.
        """
        B, L, H = len(seq_ids), store.geometry.num_layers, store.geometry.num_kv_heads
        none = torch.full((B, L, H), -1, dtype=torch.int64, device=self.device)
        return StepDecision(reuse=none, evicted_pos=none.clone())

    def observe(self, store: "KVStore", layer: int, seq_ids: torch.Tensor, probs: torch.Tensor) -> None:
        """Decode-time attention probabilities of one layer (LeanKV's score update). No-op here."""

    def release(self, seq_ids: torch.Tensor) -> None:
        """Forget ended sequences."""


class AllPolicy(HotPolicy):
    """Every token stays in the hot tier, in the high tier."""

    name = "all"


class WindowPolicy(HotPolicy):
    """Sinks + a recent window fixed per sequence at prefill; the leaving token's slot is reused.

    Index layout of every head of a sequence (the same for all layers and heads)::

        index:  0 .. S-1 | S .............. S+W-1
                 sinks   | window ring: position q at S + (q - first) mod W

    `first` is the first window position stored at prefill, max(S, n - W) for a prompt of n
    tokens. While fewer than W window tokens are stored, new tokens take fresh slots (which
    are exactly the next ring indices); once full, token p evicts p - W from index
    S + (p - first) mod W. A prompt shorter than S fills its sinks from decode tokens first.
    """

    name = "window"

    def __init__(self, config: "KVStoreConfig", max_seqs: int, device: torch.device):
        super().__init__(config, max_seqs, device)
        self.first = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
        self.window = torch.ones(max_seqs, dtype=torch.int64, device=self.device)

    def ensure_seqs(self, max_seqs: int) -> None:
        old = self.first.shape[0]
        if max_seqs <= old:
            return
        first = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
        window = torch.ones(max_seqs, dtype=torch.int64, device=self.device)
        first[:old], window[:old] = self.first, self.window
        self.first, self.window = first, window

    def window_sizes(self, prompt_len: torch.Tensor) -> torch.Tensor:
        """`config.window_for` for a vector of prompt lengths (int64 [B], same arithmetic)."""
        c = self.config
        if c.window_tokens is not None:
            return torch.full_like(prompt_len, c.window_tokens)
        w = ((prompt_len - c.sink_tokens).double() * c.budget_fraction * c.window_share).trunc().long()
        return w.clamp(min=1)

    def prefill(self, store, layer, seq_ids, q, k, positions, valid, scale):
        B, Hkv, T, _ = k.shape
        if bool((store.seq_len[seq_ids] > 0).any().item()):
            raise NotImplementedError(
                "hot_policy='window' fixes the window at prefill and needs the whole prompt in one chunk; "
                "chunked prefill is supported with hot_policy='all'"
            )
        S = self.config.sink_tokens
        n = valid.sum(dim=1).long()  # prompt length per sequence
        W = self.window_sizes(n)
        first = torch.clamp(n - W, min=S)
        if layer == 0:
            self.window[seq_ids] = W
            self.first[seq_ids] = first
        keep = valid & ((positions < S) | (positions >= first.view(B, 1)))
        return PrefillKeep(high=keep.view(B, 1, T).expand(B, Hkv, T))

    def plan(self, store, seq_ids, positions):
        B, L, H = len(seq_ids), store.geometry.num_layers, store.geometry.num_kv_heads
        S = self.config.sink_tokens
        W, first = self.window[seq_ids], self.first[seq_ids]
        leaving = positions - W  # [B]
        full = leaving >= first
        reuse = torch.where(full, S + torch.remainder(positions - first, W), torch.full_like(W, -1))
        evicted = torch.where(full, leaving, torch.full_like(W, -1))
        return StepDecision(
            reuse=reuse.view(B, 1, 1).expand(B, L, H).contiguous(),
            evicted_pos=evicted.view(B, 1, 1).expand(B, L, H).contiguous(),
        )


def make_policy(config: "KVStoreConfig", max_seqs: int, device: torch.device) -> HotPolicy:
    """The policy object for `config.hot_policy`."""
    cls = POLICIES.get(config.hot_policy)
    if cls is None:
        raise NotImplementedError(f"hot_policy={config.hot_policy!r} is not implemented; known: {sorted(POLICIES)}")
    return cls(config, max_seqs, device)


POLICIES: dict[str, type[HotPolicy]] = {"all": AllPolicy, "window": WindowPolicy}
