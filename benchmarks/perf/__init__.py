"""Performance benchmarks: end-to-end decode throughput against transformers and the roofline
(throughput, `kvstore-bench throughput`), the decode-attention kernel against SDPA
(decode_attention), PQ scoring, fetch and TTFT (retrieval), the kernel's registers and loop compiled
for sm_90 without a GPU (kernel_resources), and the store's GPU bytes and logit error per preset
(memory_report). Each but throughput runs as `python -m benchmarks.perf.<name>`."""
