"""The benchmark baselines as selectors: StreamingLLM, H2O, SnapKV, Quest.

They plug into the store exactly like PQ and the exact oracle (kvstore/selection.py): sinks and
the window live in the hot tier, every token in the cold tier, and at each decode step the
selector scores the candidates [lo, hi) of each (sequence, KV head); the top `budget` of them are
fetched and attended. Their scoring logic is in retrieval/baselines.py (tested on hand-computed
cases); this file holds only the per-layer state and the store's calling convention.

State per selector (S sequence slots, cap positions, L layers, Hkv heads):

    streaming  none (score = position: the budget extends the window)
    h2o        keys [L, S, Hkv, cap, d] (model dtype) + acc fp32 [L, S, Hkv, cap]
    snapkv     votes fp32 [L, S, Hkv, cap]; KEEP for the observation window and generated tokens
    quest      kmin / kmax fp32 [L, S, pages, Hkv, d] with pages = ceil(cap / 16)

Differences from the papers, all forced by "the cold tier keeps everything" and all in the
baselines' favour: H2O and SnapKV never lose a token for good (a low score only leaves it
unselected this step); H2O's accumulated attention is computed over all tokens from full keys
kept on the device (its GPU bytes include them); SnapKV keeps generated tokens and its
observation window (KEEP score), as SnapKV does, inside the same fixed budget.
"""

from __future__ import annotations

import torch

from kvstore.selection import SELECTORS, ExactSelector, Selector, SelectionStep
from retrieval import baselines

#: SnapKV's "always keep" score (observation window, generated tokens); any vote is far below.
KEEP = 1e9


def _candidates(step: SelectionStep, width: int, device) -> torch.Tensor:
    """bool [B, 1, width]: positions in the step's candidate range [lo, hi)."""
    t = torch.arange(width, device=device).view(1, 1, width)
    return (t >= step.lo.view(-1, 1, 1)) & (t < step.hi.view(-1, 1, 1))


class StreamingSelector(Selector):
    """StreamingLLM: sinks + window; under a budget, the most recent candidates (a longer window)."""

    name = "streaming"

    def scores(self, layer, step, q, scale):
        N = step.num_tokens
        B, H = step.seq_ids.shape[0], self.geometry.num_kv_heads
        pos = torch.arange(N, device=self.device).view(1, 1, N).expand(B, H, N)
        s = baselines.streaming_scores(pos)
        return torch.where(_candidates(step, N, self.device), s, torch.full_like(s, -1.0))


class H2OSelector(ExactSelector):
    """H2O: candidates ranked by attention accumulated over the prompt's queries and past steps.

    The score used at a step is the accumulation *before* that step's query (H2O only knows
    past attention); the step's own attention, over every token so far from the full keys, is
    added after the selection.
    """

    name = "h2o"

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        self.acc = torch.zeros(geometry.num_layers, 0, geometry.num_kv_heads, 0, dtype=torch.float32, device=self.device)

    def ensure(self, max_seqs, cap):
        super().ensure(max_seqs, cap)
        L, S, H, C = self.acc.shape
        S2, C2 = self.keys.shape[1], self.keys.shape[3]
        if (S2, C2) != (S, C):
            acc = torch.zeros(L, S2, H, C2, dtype=torch.float32, device=self.device)
            acc[:, :S, :, :C] = self.acc
            self.acc = acc

    def prefill_queries(self, layer, seq_ids, q, k, positions, valid, scale):
        scores = baselines.h2o_prefill_scores(q, k, scale, key_valid=valid)  # [B, H, T]
        self.acc[layer, seq_ids] = 0.0
        b, t = valid.nonzero(as_tuple=True)
        self.acc[layer, seq_ids[b], :, positions[b, t].long()] = scores[b, :, t]

    def scores(self, layer, step, q, scale):
        N = step.num_tokens
        acc = self.acc[layer, step.seq_ids]  # [B, H, C] (a copy)
        s = torch.where(_candidates(step, N, self.device), acc[..., :N], torch.full_like(acc[..., :N], -1.0))
        C = self.keys.shape[3]
        seen = (torch.arange(C, device=self.device).view(1, 1, C) <= step.positions.view(-1, 1, 1))
        probs = baselines.attention_probs(q, self.keys[layer, step.seq_ids], scale, seen.expand(-1, acc.shape[1], -1))
        self.acc[layer, step.seq_ids] = baselines.h2o_update(acc, probs)
        return s

    def device_bytes_per_seq(self):
        return super().device_bytes_per_seq() + self.acc[:, 0].numel() * self.acc.element_size()


class SnapKVSelector(Selector):
    """SnapKV: the prompt's last `WINDOW` queries vote once at prefill (pooled with `KERNEL`)."""

    name = "snapkv"
    WINDOW = 32
    KERNEL = 7

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        self.votes = torch.zeros(geometry.num_layers, 0, geometry.num_kv_heads, 0, dtype=torch.float32, device=self.device)

    def ensure(self, max_seqs, cap):
        L, S, H, C = self.votes.shape
        if max_seqs <= S and cap <= C:
            return
        votes = torch.full((L, max(S, max_seqs), H, max(C, cap)), KEEP, dtype=torch.float32, device=self.device)
        votes[:, :S, :, :C] = self.votes
        self.votes = votes

    def prefill_queries(self, layer, seq_ids, q, k, positions, valid, scale):
        T = q.shape[2]
        W = min(self.WINDOW, T)  # prompts are left-padded: the last W columns are the last W tokens
        v = baselines.snapkv_scores(q[:, :, T - W:], k, scale, self.KERNEL, key_valid=valid)  # [B, H, T - W]
        self.votes[layer, seq_ids] = KEEP
        b, t = valid[:, : T - W].nonzero(as_tuple=True)
        self.votes[layer, seq_ids[b], :, positions[b, t].long()] = v[b, :, t]

    def scores(self, layer, step, q, scale):
        N = step.num_tokens
        v = self.votes[layer, step.seq_ids, :, :N]
        return torch.where(_candidates(step, N, self.device), v, torch.full_like(v, -1.0))

    def device_bytes_per_seq(self):
        return self.votes[:, 0].numel() * self.votes.element_size()


class QuestSelector(Selector):
    """Quest: per page of `PAGE` tokens the element-wise min/max key; pages ranked by their bound."""

    name = "quest"
    PAGE = 16

    def __init__(self, config, geometry, cold):
        super().__init__(config, geometry, cold)
        L, H, d = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
        self.kmin = torch.zeros(L, 0, 0, H, d, dtype=torch.float32, device=self.device)
        self.kmax = torch.zeros(L, 0, 0, H, d, dtype=torch.float32, device=self.device)

    def ensure(self, max_seqs, cap):
        L, S, P, H, d = self.kmin.shape
        P2 = -(-cap // self.PAGE)
        if max_seqs <= S and P2 <= P:
            return
        S2, P2 = max(S, max_seqs), max(P, P2)
        kmin = torch.full((L, S2, P2, H, d), float("inf"), device=self.device)
        kmax = torch.full((L, S2, P2, H, d), float("-inf"), device=self.device)
        kmin[:, :S, :P] = self.kmin
        kmax[:, :S, :P] = self.kmax
        self.kmin, self.kmax = kmin, kmax

    def _reduce(self, layer, seq_ids, pos, k):
        """Fold keys k [M, H, d] at positions pos [M] of sequences seq_ids [M] into their pages."""
        S, P, H, d = self.kmin.shape[1:]
        idx = seq_ids * P + pos // self.PAGE
        vals = k.float().reshape(-1, H * d)
        idx = idx.view(-1, 1).expand(-1, H * d)
        self.kmin[layer].view(S * P, H * d).scatter_reduce_(0, idx, vals, "amin")
        self.kmax[layer].view(S * P, H * d).scatter_reduce_(0, idx, vals, "amax")

    def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens, hi):
        self.kmin[layer, seq_ids] = float("inf")
        self.kmax[layer, seq_ids] = float("-inf")
        b, t = valid.nonzero(as_tuple=True)
        self._reduce(layer, seq_ids[b], positions[b, t].long(), k[b, :, t])

    def append(self, layer, step, k_new):
        self._reduce(layer, step.seq_ids, step.positions, k_new)

    def scores(self, layer, step, q, scale):
        N = step.num_tokens
        P = -(-N // self.PAGE)
        kmin = self.kmin[layer, step.seq_ids, :P].transpose(1, 2)  # [B, H, P, d]
        kmax = self.kmax[layer, step.seq_ids, :P].transpose(1, 2)
        bound = baselines.quest_page_scores(q, kmin, kmax)  # [B, H, P], -inf for empty pages
        tok = bound.repeat_interleave(self.PAGE, dim=-1)[..., :N]
        ok = _candidates(step, N, self.device)
        floor = torch.where(ok, tok, torch.full_like(tok, float("inf"))).amin(-1, keepdim=True)
        s = (tok - floor).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # >= 0 on candidates, same order
        return torch.where(ok, s, torch.full_like(s, -1.0))

    def device_bytes_per_seq(self):
        return 2 * self.kmin[:, 0].numel() * self.kmin.element_size()


SELECTORS.update(
    streaming=StreamingSelector, h2o=H2OSelector, snapkv=SnapKVSelector, quest=QuestSelector,
)
