"""The cold wing: every token's K/V in host memory, and the retrieval that brings the ones a
query needs back to the GPU.

  path.py          ColdPath: what the store does with all of it, per prefill layer (host copy,
                   index) and per decode layer: begin (select, look up the GPU cache, start the
                   fetch) before the hot tier's attention, finish (wait, attend, merge, admit) after
  host_tier.py     ColdTier: pinned host slabs of every token's K/V (prefill copy stream, decode
                   staging; K8V4 rows in the PQ presets), and the fetch of selected rows (UVA
                   gather on CUDA)
  selection.py     the Selector interface, PQCache's selector (PQ codes on the device) and the
                   exact oracle
  baselines.py     StreamingLLM, H2O, SnapKV, Quest as selectors (the benchmark baselines)
  selectors.py     the registry of `KVStoreConfig.selector` names (`make_selector`)
  gpu_cache.py     GPUCache: slots of retrieved tokens per (sequence, layer, KV head), LFU/LRU;
                   the cold tier's rows when it is quantized
  kmeans.py        PQ codebooks trained on the device (a CUDA store's trainer)

From the hot wing (kvstore/hot/) only the quantized page format is imported: a quantized cold
row is a one-token page of it (kvstore/hot/quantization.py).
"""
