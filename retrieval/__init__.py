"""Retrieval over the cold tier: PQ codebooks (FAISS), CPU retrieval service, GPU scorer, exact oracle."""
