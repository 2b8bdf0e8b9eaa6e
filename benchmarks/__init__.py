"""kvstore's benchmarks, in three rooms: suite (the long-context benchmark suite), perf (performance
benchmarks) and probe (the small model the suite runs, with its shipped weights); cli is `kvstore-bench`."""
