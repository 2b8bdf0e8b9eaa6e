"""The page pool: fixed-byte pages on the store's device, a free list, and accounting.

One pool serves every precision tier (unified paging): a page is `page_bytes` bytes whatever
it holds, so a page freed by one tier can be reused by another. Each slot of a page also has
an int32 position (-1 = empty) and an fp32 score, kept in arrays beside the page bytes.

    data       uint8   [num_pages, page_bytes]   page 0 is the null page (padding, never handed out)
    slot_pos   int32   [num_pages, max_slots]    token position held by a slot, -1 when empty
    slot_score float32 [num_pages, max_slots]    hot-tier policy score of the token in that slot
                                                 ([num_pages, 0] when the policy keeps no scores)

Allocation is batched: `allocate(needs)` serves every (sequence, layer, KV head) request of a
step at once with one prefix sum over `needs` and one slice of the free stack, at the cost of a
single host sync (the total). Misuse (freeing the null page, double free) raises; running out
of room raises `OutOfPagesError` before anything changes, so no data is lost.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class OutOfPagesError(RuntimeError):
    """The hot tier needs more pages than its cap (`KVStoreConfig.hot_tier_bytes`) allows."""


class PagePool:
    def __init__(
        self,
        page_bytes: int,
        max_slots: int,
        device: torch.device,
        initial_pages: int = 64,
        max_bytes: int | None = None,
        slot_scores: bool = True,
    ) -> None:
        if page_bytes <= 0 or max_slots <= 0:
            raise ValueError(f"page_bytes={page_bytes} and max_slots={max_slots} must be positive")
        self.page_bytes = page_bytes
        self.max_slots = max_slots
        self.score_slots = max_slots if slot_scores else 0
        self.device = torch.device(device)
        if max_bytes is not None and max_bytes < 2 * page_bytes:  # checked before anything is allocated
            raise ValueError(f"max_bytes={max_bytes} holds no page beside the null page: the minimum is "
                             f"{2 * page_bytes} bytes (2 pages of {page_bytes} B)")
        #: the cap in pages, the null page included (max_bytes // page_bytes)
        self.max_pages = None if max_bytes is None else max_bytes // page_bytes
        num_pages = max(2, initial_pages if self.max_pages is None else min(initial_pages, self.max_pages))
        self.data = torch.zeros(num_pages, page_bytes, dtype=torch.uint8, device=self.device)
        self.slot_pos = torch.full((num_pages, max_slots), -1, dtype=torch.int32, device=self.device)
        self.slot_score = torch.zeros(num_pages, self.score_slots, dtype=torch.float32, device=self.device)
        #: 0-dim device zero that decode-time scatters write (`t[index] = 0.0` copies a host scalar)
        self.zero = torch.zeros((), dtype=torch.float32, device=self.device)
        # Free stack: the first `num_free` entries are free page ids. Page 0 is never free.
        self.free_stack = torch.arange(num_pages - 1, 0, -1, dtype=torch.int32, device=self.device)
        self.num_free = num_pages - 1
        self.peak_used = 0

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.data.shape[0]

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - self.num_free

    @property
    def bytes_per_page(self) -> int:
        """A page's bytes with its slot metadata (int32 position, fp32 score where kept)."""
        return self.page_bytes + self.max_slots * 4 + self.score_slots * 4

    @property
    def used_bytes(self) -> int:
        """Bytes of pages in use, their slot metadata (position, score) included."""
        return self.num_used * self.bytes_per_page

    @property
    def reserved_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page + self.free_stack.numel() * 4

    def all_free(self) -> bool:
        return self.num_free == self.num_pages - 1

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, total: int) -> bool:
        """Whether `total` pages can be handed out, growing the pool if it is uncapped."""
        if total <= self.num_free:
            return True
        if self.max_pages is None:
            return True
        return total <= self.num_free + (self.max_pages - self.num_pages)

    def reserve(self, pages: int) -> None:
        """Make room for `pages` more pages than are in use now, growing once to exactly that
        (uncapped pools; a capped pool is left alone: `allocate` raises when it runs out). A caller
        that knows a batch's need (KVStore.reserve, before a generation) calls this so the pool is
        sized once instead of growing step by step."""
        if self.max_pages is None and pages > self.num_free:
            self._grow(self.num_pages + pages - self.num_free, factor=1.0)

    def _grow(self, min_pages: int, factor: float = 1.25) -> None:
        """Grow to max(min_pages, factor x the current size). Not doubling: a growth step briefly
        holds the old and the new pool, and every page it adds beyond the need stays reserved."""
        new_n = max(min_pages, int(factor * self.num_pages))
        if self.max_pages is not None:
            new_n = min(new_n, self.max_pages)
        old_n = self.num_pages
        if new_n <= old_n:
            return
        logger.debug("page pool grows %d -> %d pages of %d bytes", old_n, new_n, self.page_bytes)
        try:
            data = torch.zeros(new_n, self.page_bytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as e:
            raise OutOfPagesError(
                f"{self.device} is out of memory growing the hot tier to {new_n} pages of {self.page_bytes} B; "
                "set KVStoreConfig.hot_tier_bytes to what fits, lower the batch or the context"
            ) from e
        data[:old_n] = self.data
        pos = torch.full((new_n, self.max_slots), -1, dtype=torch.int32, device=self.device)
        pos[:old_n] = self.slot_pos
        score = torch.zeros(new_n, self.score_slots, dtype=torch.float32, device=self.device)
        score[:old_n] = self.slot_score
        fresh = torch.arange(new_n - 1, old_n - 1, -1, dtype=torch.int32, device=self.device)
        # Fresh pages go below the current free entries so recently freed pages are reused first.
        stack = torch.zeros(new_n - 1, dtype=torch.int32, device=self.device)
        stack[: fresh.numel()] = fresh
        stack[fresh.numel() : fresh.numel() + self.num_free] = self.free_stack[: self.num_free]
        self.free_stack = stack
        self.num_free += new_n - old_n
        self.data, self.slot_pos, self.slot_score = data, pos, score

    def allocate(self, needs: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand out pages for many requests at once.

        Args:
            needs: int tensor [R] on the pool's device, pages wanted by each request (>= 0).
            total: needs.sum() where the caller has read it already (else read here: a host sync).
        Returns:
            (page_ids int32 [sum(needs)], offsets int64 [R]): request r owns
            page_ids[offsets[r] : offsets[r] + needs[r]]. Slots of the new pages are empty (-1).
        Raises:
            OutOfPagesError if the pool is capped and too small; nothing is changed then.
        """
        needs = needs.to(device=self.device, dtype=torch.int64).reshape(-1)
        offsets = torch.cumsum(needs, 0) - needs
        if total is None:
            total = int(needs.sum().item()) if needs.numel() else 0  # the one host sync
        if total == 0:
            return torch.empty(0, dtype=torch.int32, device=self.device), offsets
        if total > self.num_free:
            if self.max_pages is None or total <= self.num_free + (self.max_pages - self.num_pages):
                self._grow(self.num_pages + (total - self.num_free))
            if total > self.num_free:
                raise OutOfPagesError(
                    f"the hot tier needs {total} more pages of {self.page_bytes} B but only {self.num_free} are free "
                    f"(cap {self.max_pages} pages = KVStoreConfig.hot_tier_bytes); raise hot_tier_bytes, lower the "
                    f"batch size or the context, or use a preset that keeps fewer tokens on the GPU"
                )
        taken = self.free_stack[self.num_free - total : self.num_free].clone()
        self.num_free -= total
        self.slot_pos.index_fill_(0, taken.long(), -1)  # (a scalar assignment would wait for the device)
        self.slot_score.index_fill_(0, taken.long(), 0.0)
        self.peak_used = max(self.peak_used, self.num_used)
        return taken, offsets

    def free(self, page_ids: torch.Tensor, all_pages: bool = False) -> None:
        """Return pages to the free list. `page_ids` may contain 0 (null page: padding, skipped).
        all_pages: the caller knows none is 0 (pages `allocate` gave): no host read then."""
        ids = page_ids.reshape(-1).to(device=self.device, dtype=torch.int32)
        if not all_pages:
            ids = ids[ids > 0]  # a host sync: the count of pages freed
        n = ids.numel()
        if n == 0:
            return
        if n > self.num_used:
            raise RuntimeError(f"freeing {n} pages but only {self.num_used} are in use: double free")
        self.slot_pos.index_fill_(0, ids.long(), -1)
        self.free_stack[self.num_free : self.num_free + n] = ids
        self.num_free += n
