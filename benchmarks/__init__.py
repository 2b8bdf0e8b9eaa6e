"""The long-context benchmark suite and performance benchmarks."""
