import pytest
import torch

from kvstore.hot.page_pool import OutOfPagesError, PagePool
from kvstore.hot.page_table import PageTable


def test_batched_allocation_is_disjoint_and_csr():
    pool = PagePool(page_bytes=64, max_slots=4, device="cpu", initial_pages=8)
    needs = torch.tensor([2, 0, 3, 1])
    ids, offsets = pool.allocate(needs)
    assert ids.numel() == 6 and offsets.tolist() == [0, 2, 2, 5]
    assert len(set(ids.tolist())) == 6 and 0 not in ids.tolist()  # null page never handed out
    assert pool.num_used == 6
    assert (pool.slot_pos[ids.long()] == -1).all()


def test_uncapped_pool_grows_and_keeps_data():
    pool = PagePool(page_bytes=16, max_slots=2, device="cpu", initial_pages=4)
    ids, _ = pool.allocate(torch.tensor([3]))
    pool.data[ids.long()] = 7
    more, _ = pool.allocate(torch.tensor([10]))
    assert pool.num_pages >= 14 and (pool.data[ids.long()] == 7).all()
    assert len(set(ids.tolist()) | set(more.tolist())) == 13
    pool.free(torch.cat([ids, more]))
    assert pool.all_free()


def test_capped_pool_raises_and_changes_nothing():
    pool = PagePool(page_bytes=100, max_slots=2, device="cpu", initial_pages=4, max_bytes=500)
    ids, _ = pool.allocate(torch.tensor([3]))
    before = pool.num_free
    with pytest.raises(OutOfPagesError, match="hot_tier_bytes"):
        pool.allocate(torch.tensor([2]))
    assert pool.num_free == before
    pool.free(ids)
    assert pool.all_free()


def test_double_free_raises():
    pool = PagePool(page_bytes=16, max_slots=2, device="cpu", initial_pages=4)
    ids, _ = pool.allocate(torch.tensor([2]))
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids)


def test_page_table_grows_keeping_low_pages_at_the_right():
    t = PageTable(max_seqs=2, num_layers=1, num_kv_heads=1, device="cpu", max_pages=4)
    t.pages[0, 0, 0] = torch.tensor([5, 6, 0, 9], dtype=torch.int32)  # two high, one low page
    t.num_low_pages[0, 0, 0] = 1
    t.ensure_pages(6)
    row = t.pages[0, 0, 0].tolist()
    assert row[:2] == [5, 6] and row[-1] == 9 and sum(1 for x in row if x) == 3


def test_a_cap_without_room_beside_the_null_page_is_refused_with_the_minimum():
    # it used to become a 2-page pool silently, whatever the cap said
    with pytest.raises(ValueError, match="minimum is 200 bytes"):
        PagePool(page_bytes=100, max_slots=2, device="cpu", max_bytes=199)
    assert PagePool(page_bytes=100, max_slots=2, device="cpu", max_bytes=200).max_pages == 2
