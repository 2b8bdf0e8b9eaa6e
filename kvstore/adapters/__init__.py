"""Engine adapters: how a model's attention reaches the store."""
