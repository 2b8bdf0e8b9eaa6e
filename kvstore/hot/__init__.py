"""The hot wing: what the GPU holds of each sequence, and who decides it.

  tier.py          HotTier: writes tokens into pages (prefill: many per head; decode: one per head
                   at the slot the plan chose), attends them, frees them; owns pool and tables;
                   `apply` carries out a policy's `StepDecision` (page moves, new-token slots)
  policies.py      which tokens stay and at which precision (all, window, LeanKV), and where each
                   decode step's new token goes: they decide, the tier moves; the registry of
                   `KVStoreConfig.hot_policy` names
  page_pool.py     fixed-byte pages, free list, batched allocation (OutOfPagesError)
  page_table.py    per (sequence, layer, KV head) page ids: high pages from the left, low from the right
  page_format.py   how a token sits in a page at the model's dtype; quantization.py: K8V4 / K4V2

Nothing here imports the cold wing (kvstore/cold/).
"""
