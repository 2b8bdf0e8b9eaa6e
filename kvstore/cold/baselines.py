"""The benchmark baselines as selectors: StreamingLLM, H2O, SnapKV, Quest.

They plug into the store exactly like PQ and the exact oracle (kvstore/cold/selection.py): sinks and
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

from kvstore.cold.selection import ExactSelector, Selector, per_seq_bytes
from kvstore.plan import SelectionStep
from retrieval import baselines

#: SnapKV's "always keep" score (observation window, generated tokens); any vote is far below.
KEEP = 1e9


class StreamingSelector(Selector):
    """StreamingLLM: sinks + window; under a budget, the most recent candidates (a longer window)."""

    name = "streaming"

    def plan_workspace(self, step, wsp):
        """Adds the positions as scores (`baselines.streaming_scores`: the same for every layer)."""
        ws = super().plan_workspace(step, wsp)
        N = step.num_tokens
        pos = wsp.arange("streaming.t", N).view(1, 1, N)
        ws["recency"] = wsp.take("streaming.recency", (1, 1, N), torch.float32).copy_(baselines.streaming_scores(pos))
        return ws

    def scores(self, layer, step, q, scale):
        ws = self._ws(step)
        s = ws["scores"].copy_(ws["recency"].expand_as(ws["scores"]))
        return s.masked_fill_(ws["cand_invalid"], -1.0)


class H2OSelector(ExactSelector):
    """H2O: candidates ranked by attention accumulated over the prompt's queries and past steps.

    The score used at a step is the accumulation *before* that step's query (H2O only knows
    past attention); the step's own attention, over every token so far from the full keys, is
    added after the selection (`baselines.attention_probs` and `baselines.h2o_update`, written
    with out= ops into the step's buffers).
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

    def plan_workspace(self, step, wsp):
        """Adds the accumulation rows and the step's attention over every token seen (all C columns)."""
        ws = Selector.plan_workspace(self, step, wsp)
        g = self.geometry
        B, H, Hq, d = step.seq_ids.numel(), g.num_kv_heads, g.num_q_heads, g.head_dim
        C, f32 = self.keys.shape[3], torch.float32
        t = wsp.arange("h2o.t", C).view(1, 1, C)
        ws.update(
            unseen=torch.gt(t, step.positions.view(-1, 1, 1), out=wsp.take("h2o.unseen", (B, 1, C), torch.bool)),
            acc=wsp.take("h2o.acc", (B, H, C), f32),
            keys=wsp.take("h2o.keys", (B, H, C, d), self.keys.dtype),
            qf=wsp.take("h2o.qf", (B, Hq, d), f32),
            logits=wsp.take("h2o.logits", (B, Hq, C), f32),
            probs=wsp.take("h2o.probs", (B, Hq, C), f32),
            psum=wsp.take("h2o.psum", (B, H, C), f32),
        )
        if self.keys.dtype != f32:
            ws["kf"] = wsp.take("h2o.kf", (B, H, C, d), f32)
        return ws

    def scores(self, layer, step, q, scale):
        ws = self._ws(step)
        N = step.num_tokens
        B, Hq, d = q.shape
        H, C = self.keys.shape[2], self.keys.shape[3]
        G = Hq // H
        acc = torch.index_select(self.acc[layer], 0, step.seq_ids, out=ws["acc"])  # [B, H, C]
        s = ws["scores"].copy_(acc[..., :N]).masked_fill_(ws["cand_invalid"], -1.0)
        # baselines.attention_probs over the seen tokens, then baselines.h2o_update
        keys = torch.index_select(self.keys[layer], 0, step.seq_ids, out=ws["keys"])  # [B, H, C, d]
        kf = ws["kf"].copy_(keys) if "kf" in ws else keys
        qf = ws["qf"].copy_(q)
        logits = ws["logits"]
        torch.bmm(qf.view(B * H, G, d), kf.view(B * H, C, d).transpose(1, 2), out=logits.view(B * H, G, C))
        logits.mul_(scale).view(B, H, G, C).masked_fill_(ws["unseen"].unsqueeze(2), float("-inf"))
        probs = torch._softmax(logits, -1, False, out=ws["probs"]).nan_to_num_(0.0)
        torch.add(acc, torch.sum(probs.view(B, H, G, C), 2, out=ws["psum"]), out=acc)
        self.acc[layer, step.seq_ids] = acc
        return s

    def device_bytes_per_seq(self):
        return super().device_bytes_per_seq() + per_seq_bytes(self.acc)


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
        ws = self._ws(step)
        N = step.num_tokens
        v = torch.index_select(self.votes[layer][:, :, :N], 0, step.seq_ids, out=ws["scores"])
        return v.masked_fill_(ws["cand_invalid"], -1.0)

    def device_bytes_per_seq(self):
        return per_seq_bytes(self.votes)


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

    def _reduce(self, layer, seq_ids, pos, k, ws=None):
        """Fold keys k [M, H, d] at positions pos [M] of sequences seq_ids [M] into their pages
        (with ws, the decode step's buffers: no allocation)."""
        S, P, H, d = self.kmin.shape[1:]
        if ws is None:
            idx = seq_ids * P + pos // self.PAGE
            vals = k.float().reshape(-1, H * d)
        else:
            idx = torch.div(pos, self.PAGE, rounding_mode="floor", out=ws["page_idx"]).add_(ws["row_base"])
            vals = ws["kvals"].copy_(k).view(-1, H * d)
        idx = idx.view(-1, 1).expand(-1, H * d)
        self.kmin[layer].view(S * P, H * d).scatter_reduce_(0, idx, vals, "amin")
        self.kmax[layer].view(S * P, H * d).scatter_reduce_(0, idx, vals, "amax")

    def prefill(self, layer, seq_ids, k, positions, valid, prompt_lens, hi):
        self.kmin[layer, seq_ids] = float("inf")
        self.kmax[layer, seq_ids] = float("-inf")
        b, t = valid.nonzero(as_tuple=True)
        self._reduce(layer, seq_ids[b], positions[b, t].long(), k[b, :, t])

    def append(self, layer, step, k_new):
        self._reduce(layer, step.seq_ids, step.positions, k_new, self._ws(step))

    def plan_workspace(self, step, wsp):
        """Adds the page rows of the new token, the pages' bounds and their spread over the tokens."""
        ws = Selector.plan_workspace(self, step, wsp)
        g = self.geometry
        B, H, Hq, d, N = step.seq_ids.numel(), g.num_kv_heads, g.num_q_heads, g.head_dim, step.num_tokens
        f32, b8 = torch.float32, torch.bool
        P, G = -(-N // self.PAGE), Hq // H
        ws.update(
            row_base=torch.mul(step.seq_ids, self.kmin.shape[2], out=wsp.take("quest.row_base", (B,), torch.int64)),
            page_idx=wsp.take("quest.page_idx", (B,), torch.int64),
            kvals=wsp.take("quest.kvals", (B, H, d), f32),
            # token t reads its page's bound: column t // PAGE
            tok_page=torch.div(wsp.arange("quest.t", N), self.PAGE, rounding_mode="floor",
                               out=wsp.take("quest.tok_page", (N,), torch.int64)),
            kmin=wsp.take("quest.kmin", (B, P, H, d), f32),
            kmax=wsp.take("quest.kmax", (B, P, H, d), f32),
            qf=wsp.take("quest.qf", (B, Hq, d), f32),
            lo=wsp.take("quest.lo", (B, H, P, d), f32),
            hi=wsp.take("quest.hi", (B, H, P, d), f32),
            prod_lo=wsp.take("quest.prod_lo", (B, H, G, P, d), f32),
            prod_hi=wsp.take("quest.prod_hi", (B, H, G, P, d), f32),
            gsum=wsp.take("quest.gsum", (B, H, G, P), f32),
            bound=wsp.take("quest.bound", (B, H, P), f32),
            inf_d=wsp.take("quest.inf_d", (B, H, P, d), b8),
            empty=wsp.take("quest.empty", (B, H, P), b8),
            pos_min=wsp.take("quest.pos_min", (B, H, P), b8),
            tok=wsp.take("quest.tok", (B, H, N), f32),
            floor=wsp.take("quest.floor", (B, H, 1), f32),
        )
        return ws

    def _page_scores(self, q, kmin, kmax, ws):
        """`baselines.quest_page_scores` into ws (bit for bit): kmin, kmax [B, Hkv, P, d] -> [B, Hkv, P]."""
        B, Hq, d = q.shape
        H = kmin.shape[1]
        G = Hq // H
        qf = ws["qf"].copy_(q).view(B, H, G, 1, d)
        # empty page: +inf mins, isinf(lo).all(-1) & (lo > 0).all(-1) (isinf as |x| == inf)
        inf_d = torch.eq(torch.abs(kmin, out=ws["lo"]), float("inf"), out=ws["inf_d"])
        empty = torch.all(inf_d, -1, out=ws["empty"])
        empty.bitwise_and_(torch.all(torch.gt(kmin, 0, out=ws["inf_d"]), -1, out=ws["pos_min"]))
        lo = torch.nan_to_num(kmin, posinf=0.0, neginf=0.0, out=ws["lo"]).unsqueeze(2)
        hi = torch.nan_to_num(kmax, posinf=0.0, neginf=0.0, out=ws["hi"]).unsqueeze(2)
        prod = torch.maximum(torch.mul(qf, lo, out=ws["prod_lo"]), torch.mul(qf, hi, out=ws["prod_hi"]),
                             out=ws["prod_lo"])
        bound = torch.amax(torch.sum(prod, -1, out=ws["gsum"]), 2, out=ws["bound"])
        return bound.masked_fill_(empty, float("-inf"))

    def scores(self, layer, step, q, scale):
        ws = self._ws(step)
        N = step.num_tokens
        P = -(-N // self.PAGE)
        kmin = torch.index_select(self.kmin[layer][:, :P], 0, step.seq_ids, out=ws["kmin"]).transpose(1, 2)
        kmax = torch.index_select(self.kmax[layer][:, :P], 0, step.seq_ids, out=ws["kmax"]).transpose(1, 2)
        bound = self._page_scores(q, kmin, kmax, ws)  # [B, H, P], -inf for empty pages
        tok = torch.index_select(bound, 2, ws["tok_page"], out=ws["tok"])  # [B, H, N]
        inv = ws["cand_invalid"]
        s = ws["scores"].copy_(tok).masked_fill_(inv, float("inf"))
        floor = torch.amin(s, -1, keepdim=True, out=ws["floor"])
        s = torch.sub(tok, floor, out=ws["scores"]).nan_to_num_(0.0, posinf=0.0, neginf=0.0)  # >= 0 on candidates
        return s.masked_fill_(inv, -1.0)

    def device_bytes_per_seq(self):
        return 2 * per_seq_bytes(self.kmin)
