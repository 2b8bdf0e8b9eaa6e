"""Hot-tier policies: which tokens the GPU pages keep, and where each decode step's new token goes.

A policy is a small strategy object with two decisions, all batched over sequences, layers and
KV heads (no Python loop over any of them):

* `prefill(...)`: per (sequence, KV head) of one layer, which prompt tokens the hot tier keeps
  (and, for LeanKV, at which precision tier).
* `plan(...)`: once per decode step, for every (sequence, layer, KV head) at once, whether the
  new token takes a fresh slot (index -1) or *reuses* the high-tier slot of a token that leaves
  the hot tier this step, and (LeanKV) which low token is pruned and which high token demoted.
  The position of the token that leaves is reported (`evicted_pos`) so the cold tier, which
  identifies tokens by position, can keep it reachable. Its `last_step` argument carries the
  previous step's logits of every hot token when the hot tier kept them (LeanKV's score update;
  the other policies ignore it).

A policy decides and the hot tier moves: `plan` returns a `StepDecision` (kvstore/hot/tier.py)
that `HotTier.apply` carries out (the low tier's moves, then each new token's index turned into
(page, slot) through the page table, the pages that fill up allocated). The one thing a policy
writes is its own bookkeeping: LeanKV's per-slot scores, kept in the pool's `slot_score` array.

High-tier index i of a head lives in page `table.pages[..., i // tokens_per_page]`, slot
`i % tokens_per_page` (kvstore/hot/page_table.py).

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
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from kvstore.hot.tier import LowTierMoves, StepDecision
from kvstore.plan import host_ints

if TYPE_CHECKING:
    from kvstore.config import KVStoreConfig
    from kvstore.geometry import ModelGeometry
    from kvstore.hot.tier import HotTier

logger = logging.getLogger(__name__)


class StoreView(Protocol):
    """What a policy reads of the store it serves (a `KVStore` is one): a reference, not an import."""

    config: "KVStoreConfig"
    geometry: "ModelGeometry"
    hot: "HotTier"


@dataclass
class PrefillKeep:
    """Which tokens of a prefill chunk the hot tier keeps, per (sequence, KV head).

    high: bool [B, Hkv, T] tokens stored in the high tier (padding never).
    low:  bool [B, Hkv, T] or None, tokens stored in the low tier (LeanKV only).
    scores: fp32 [B, Hkv, T] or None, the policy's initial score of each stored token.
    """

    high: torch.Tensor
    low: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # fp32 [B, Hkv, T] initial slot scores (LeanKV)


class HotPolicy:
    """Base policy; subclasses override what they decide differently."""

    name = "base"
    #: prefill decides from the whole prompt (window: its length; LeanKV: its last queries). In a
    #: chunked prefill the store then keeps every token of the earlier chunks and calls `prefill`
    #: once, at the last chunk, over the whole prompt (KVStore.prefill)
    whole_prompt = False
    #: `host_sizes` answers (every head's count and the new token's freshness follow from the positions)
    sizes_on_host = False

    def __init__(self, config: "KVStoreConfig", max_seqs: int, device: torch.device):
        self.config = config
        self.device = torch.device(device)

    def ensure_seqs(self, max_seqs: int) -> None:
        """Grow per-sequence state to `max_seqs` slots (between steps)."""

    def host_sizes(self, seq_ids: Sequence[int] | None, positions: Sequence[int]
                   ) -> tuple[list[int], list[bool]] | None:
        """What every head of each sequence holds before this step's token, and whether the token
        takes a fresh index (else it reuses a leaving token's), from the step's slots and positions on
        the host, where this policy knows them without the device (`HotTier.apply` then reads nothing
        back); None where it does not (a decision that depends on scores: LeanKV)."""
        return None

    def prefill(self, store: StoreView, layer: int, seq_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, scale: float) -> PrefillKeep:
        """Decide which tokens of a prefill chunk one layer keeps.

        Args:
            seq_ids: int64 [B]; q: [B, Hq, Tq, d] the queries of the last Tq <= T columns;
            k: [B, Hkv, T, d] post-RoPE.
            positions: int64 [B, T] token positions (meaningless where ~valid).
            valid: bool [B, T], False for padding.
        """
        B, Hkv, T, _ = k.shape
        return PrefillKeep(high=valid.view(B, 1, T).expand(B, Hkv, T))

    def plan(self, store: StoreView, seq_ids: torch.Tensor, positions: torch.Tensor,
             last_step: tuple[torch.Tensor, dict] | None = None) -> StepDecision:
        """Where the new token of every (sequence, layer, KV head) goes this step.

        Args:
            seq_ids: int64 [B]; positions: int64 [B], the position of the token being decoded.
            last_step: (seq_ids, workspace) of the previous decode step when it kept every hot
                token's logits (`HotTier.take_last_step`; LeanKV's score update), else None.
        """
        B, L, H = len(seq_ids), store.geometry.num_layers, store.geometry.num_kv_heads
        none = torch.full((B, L, H), -1, dtype=torch.int64, device=self.device)
        return StepDecision(reuse=none, evicted_pos=none.clone())

    def release(self, seq_ids: torch.Tensor) -> None:
        """Forget ended sequences."""


class AllPolicy(HotPolicy):
    """Every token stays in the hot tier, in the high tier."""

    name = "all"
    sizes_on_host = True

    def host_sizes(self, seq_ids, positions):
        return list(positions), [True] * len(positions)  # each head holds every token; each one is new


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
    sizes_on_host = True
    whole_prompt = True

    def __init__(self, config: "KVStoreConfig", max_seqs: int, device: torch.device):
        super().__init__(config, max_seqs, device)
        self.first = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
        self.window = torch.ones(max_seqs, dtype=torch.int64, device=self.device)
        # their host copies (read with the prefill's first layer): `host_sizes`
        self.host_first, self.host_window = [0] * max_seqs, [1] * max_seqs

    def ensure_seqs(self, max_seqs: int) -> None:
        old = self.first.shape[0]
        if max_seqs <= old:
            return
        first = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
        window = torch.ones(max_seqs, dtype=torch.int64, device=self.device)
        first[:old], window[:old] = self.first, self.window
        self.first, self.window = first, window
        self.host_first += [0] * (max_seqs - old)
        self.host_window += [1] * (max_seqs - old)

    def window_sizes(self, prompt_len: torch.Tensor) -> torch.Tensor:
        """`config.window_for` for a vector of prompt lengths (int64 [B], same arithmetic)."""
        c = self.config
        if c.window_tokens is not None:
            return torch.full_like(prompt_len, c.window_tokens)
        w = ((prompt_len - c.sink_tokens).double() * c.budget_fraction * c.window_share).trunc().long()
        return w.clamp(min=1)

    def prefill(self, store, layer, seq_ids, q, k, positions, valid, scale):
        B, Hkv, T, _ = k.shape
        S = self.config.sink_tokens
        n = valid.sum(dim=1).long()  # prompt length per sequence
        W = self.window_sizes(n)
        first = torch.clamp(n - W, min=S)
        if layer == 0:
            self.window[seq_ids] = W
            self.first[seq_ids] = first
            got = torch.cat([seq_ids.long(), W, first]).tolist()  # (a prefill's host read)
            for i, w, f in zip(got[:B], got[B:2 * B], got[2 * B:]):
                self.host_window[i], self.host_first[i] = w, f
        keep = valid & ((positions < S) | (positions >= first.view(B, 1)))
        return PrefillKeep(high=keep.view(B, 1, T).expand(B, Hkv, T))

    def host_sizes(self, seq_ids, positions):
        if seq_ids is None:
            return None
        S, counts, fresh = self.config.sink_tokens, [], []
        for i, p in zip(seq_ids, positions):  # the sinks held, then the ring's tokens from `first` on
            W, first = self.host_window[i], self.host_first[i]
            counts.append(min(p, S) + min(W, max(0, p - first)))
            fresh.append(p - W < first)  # `plan`'s not-full
        return counts, fresh

    def plan(self, store, seq_ids, positions, last_step=None):
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


#: LeanKV's prefill scores: fp32 bytes of probabilities computed at once (blocks of KV heads)
_SCORE_BLOCK_BYTES = 1 << 30


class LeanKVPolicy(HotPolicy):
    """LeanKV's per-head dynamic sparsity over two precision tiers (SEEDS.md).

    Score of a token per (sequence, layer, KV head): attention mass summed over the queries that
    saw it, max over the GQA group per query; its mean is score / count, count = the number of
    those queries. At prefill the queries are the prompt's last `score_queries` (Q), so a token
    at position t < n has count min(Q, n - t); every decode step adds its max-over-group
    probability and 1 to the count. The count is never stored: with a prompt of n tokens and
    the step's position `now`, count = min(Q, n - t) + (now - n) for t < n and now - t after.

    Thresholds are relative to uniform attention over the n_now = now + 1 tokens of the context:
    mean < alpha_prune / n_now prunes (the token leaves the hot tier; it stays in the cold tier
    when there is one), mean < alpha_quant / n_now demotes it to the low tier. Tokens among the
    last `immune_tokens` positions are never touched.

    Per (sequence, layer, KV head) and decode step, at most one prune and one demotion:
      1. the lowest-mean non-immune high token h: prune it if below the prune threshold, else
         demote it if below the quantization threshold; either way the new token takes its slot;
      2. unless h was pruned, the lowest-mean low token l is pruned if below the prune
         threshold; a token demoted in the same step takes l's slot, otherwise it is appended to
         the low tier (a new low page from the right of the table when the last one is full).
    A low token pruned without a demotion leaves an empty slot (position -1, never attended).

    Under retrieval (the `tiered` preset) only hot tokens get probabilities. The rule: a hot
    token's probability is its share of the *merged* softmax (hot + retrieved: the cold path
    overwrites the step's `lse_all[layer]` with the merged log-sum-exp after the LSE merge,
    `ColdPath.finish`), so the scores of hot tokens keep meaning "attention mass"
    and a retrieved token that takes mass lowers the hot tokens' shares exactly as it would
    with every token hot. Retrieved tokens (not in the hot tier) get no score and are never
    re-admitted: retrieval is their way back. The sinks (positions < `sink_tokens`) are immune
    under retrieval: the PQ index never codes them.

    All decisions are batched tensor operations over (sequence, layer, KV head) at plan time; the
    moves they call for (`LowTierMoves`: empty the pruned low slots, dequantize high and requantize
    low, new low pages) are the hot tier's (`HotTier.apply`), right after, before any layer runs.
    """

    name = "leankv"
    whole_prompt = True

    def __init__(self, config: "KVStoreConfig", max_seqs: int, device: torch.device):
        if not config.quantized:
            from kvstore.config import LEANKV_UNQUANTIZED

            raise NotImplementedError(f"{LEANKV_UNQUANTIZED} is not built")
        super().__init__(config, max_seqs, device)
        self.prompt_len = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
        #: under retrieval (`tiered`) the first `sink_tokens` positions are immune too: the PQ
        #: index never codes them, so a pruned sink could not come back
        self.protect_sinks = config.retrieves

    def ensure_seqs(self, max_seqs: int) -> None:
        old = self.prompt_len.shape[0]
        if max_seqs > old:
            grown = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)
            grown[:old] = self.prompt_len
            self.prompt_len = grown

    # ---- prefill --------------------------------------------------------------------------
    def prefill(self, store, layer, seq_ids, q, k, positions, valid, scale):
        B, Hkv, T, d = k.shape
        c = self.config
        Tq = q.shape[2]  # the queries are the last Tq columns of k's (the last chunk of a chunked prefill)
        Q = min(c.score_queries, Tq)
        Hq = q.shape[1]
        G = Hq // Hkv
        qv = valid[:, T - Q:]  # [B, Q] valid queries among the last Q columns
        causal = torch.arange(T, device=k.device).view(1, T) <= torch.arange(T - Q, T, device=k.device).view(Q, 1)
        mask = causal.view(1, 1, 1, Q, T) & valid.view(B, 1, 1, 1, T) & qv.view(B, 1, 1, Q, 1)
        qg = q[:, :, Tq - Q:].view(B, Hkv, G, Q, d)
        score = torch.empty(B, Hkv, T, dtype=torch.float32, device=k.device)
        # [Q, T] probabilities per query head, in blocks of KV heads so that a long prompt's fp32
        # temporaries stay near _SCORE_BLOCK_BYTES (Q x T, never T x T)
        step = max(1, _SCORE_BLOCK_BYTES // max(1, 16 * B * G * Q * T))
        for h in range(0, Hkv, step):
            e = min(Hkv, h + step)
            logits = torch.einsum("bhgqd,bhtd->bhgqt", qg[:, h:e].float(), k[:, h:e].float()) * scale
            probs = torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=-1).nan_to_num_(0.0)
            # max over the GQA group per query, then summed over the queries: the decode update adds
            # the same per-query group max each step (max of sums would undercount a token that
            # different heads of the group attend at different queries)
            score[:, h:e] = probs.amax(2).sum(2)
        n = valid.sum(1)  # prompt length
        count = torch.minimum(torch.full_like(positions, Q), n.view(B, 1) - positions).clamp(min=1)
        mean = score / count.view(B, 1, T)
        immune = positions >= (n - c.immune_tokens).view(B, 1)
        if self.protect_sinks:  # under retrieval the sinks are never coded: they must stay hot
            immune = immune | (positions < c.sink_tokens)
        n_f = n.view(B, 1, 1).float()
        # as at decode: below the prune threshold a token goes (whatever alpha_quant says), else
        # below the quantization threshold it is low, else high; immune tokens are high
        kept = mean >= c.alpha_prune / n_f
        high = valid.view(B, 1, T) & (immune.view(B, 1, T) | (kept & (mean >= c.alpha_quant / n_f)))
        low = valid.view(B, 1, T) & ~high & kept
        if layer == 0:
            self.prompt_len[seq_ids] = n
        return PrefillKeep(high=high, low=low, scores=score)

    # ---- decode plan ----------------------------------------------------------------------
    def _observe_last_step(self, store: StoreView, last: tuple[torch.Tensor, dict] | None) -> None:
        """Add the last decode step's max-over-group probabilities to the hot tokens' scores."""
        if last is None:
            return
        seq_ids, ws = last
        logits, lse = ws["logits_all"], ws["lse_all"]  # [L, B, Hq, W, S] by virtual page, [L, B, Hq]
        # the table has not changed since that step's attention (this runs before the plan's page moves)
        t, tpp = store.hot.table, store.hot.tokens_per_page
        if store.hot.use_triton:  # one kernel (gpu_kernels/policy_scan.py), the virtual pages looked up in it
            from gpu_kernels.policy_scan import observe_scores

            observe_scores(logits, lse, (t.pages, t.num_tokens, t.num_low_pages, seq_ids, tpp),
                           store.hot.pool.slot_score)
            return
        # the torch reference (which overwrites the logits in place: the buffer is the last step's, rewritten
        # layer by layer by the next one)
        from gpu_kernels.reference import observe_scores

        pages = t.virtual_pages(seq_ids, logits.shape[3], tpp)  # [L, B, Hkv, W]
        observe_scores(logits, lse, pages, store.hot.pool.slot_score)

    def plan(self, store, seq_ids, positions, last_step=None):
        hot, c = store.hot, self.config
        with torch.profiler.record_function("kvstore.plan.policy.observe"):
            self._observe_last_step(store, last_step)
        pool, table = hot.pool, hot.table
        B = len(seq_ids)
        th, tl_ = hot.tokens_per_page, hot.low_tokens_per_page
        n, now = self.prompt_len[seq_ids], positions
        n_ctx = (now + 1).float().view(B, 1, 1)
        thr_p, thr_q = c.alpha_prune / n_ctx, c.alpha_quant / n_ctx
        lowest = c.sink_tokens if self.protect_sinks else 0  # under retrieval the sinks stay hot
        pages = table.pages[seq_ids]  # [B, L, H, C]

        # each head's lowest-mean candidate of either tier: one pass per tier over its slots (a kernel on
        # the GPU, gpu_kernels/policy_scan.py; its torch reference elsewhere)
        scan = _lowest_mean_scan(hot)
        common = (pool.slot_pos, pool.slot_score, n, now)
        n_high, nlp = table.num_tokens[seq_ids], table.num_low_pages[seq_ids].long()
        n_max, lpages = host_ints(n_high.max(), nlp.max()) if B else (0, 0)  # the policy's one host read
        hmax, lmax = -(-n_max // th) * th, lpages * tl_  # slots of the widest tables (high: `pages_in_use`)
        hmin, harg, h_page, h_slot, h_pos = scan(pages, n_high, *common, hmax, th,
                                                 c.score_queries, lowest, c.immune_tokens)
        h_prune = hmin < thr_p
        h_demote = ~h_prune & (hmin < thr_q)
        lmin, _, l_page, l_slot, l_pos = scan(pages, nlp * tl_, *common, lmax, tl_, c.score_queries, lowest,
                                              c.immune_tokens, from_end=True)
        l_prune = ~h_prune & (lmin < thr_p)

        act = h_prune | h_demote
        reuse = torch.where(act, harg, torch.full_like(harg, -1))
        evicted = torch.where(h_prune, h_pos, torch.full_like(h_pos, -1))
        low_evicted = torch.where(l_prune, l_pos, torch.full_like(l_pos, -1))
        moves = LowTierMoves(prune=l_prune, low_page=l_page, low_slot=l_slot, demote=h_demote, high_page=h_page,
                             high_slot=h_slot)
        return StepDecision(reuse=reuse, evicted_pos=evicted, low_moves=moves, low_evicted=low_evicted)


def _lowest_mean_scan(hot):
    """`lowest_mean_token` as the hot tier runs kernels: Triton's (the GPU, or the interpreter under
    use_triton='always'), else the torch reference."""
    if hot.use_triton:
        from gpu_kernels.policy_scan import lowest_mean_token

        return lowest_mean_token
    from gpu_kernels.reference import lowest_mean_token

    return lowest_mean_token


POLICIES["leankv"] = LeanKVPolicy
