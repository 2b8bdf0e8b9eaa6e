"""How often a continuous-batching workload captures its decode step again, with and without
Engine.warmup: CUDA-graph capture emulated on the CPU (tests/test_cuda_graph.py's _EmulatedGraphs:
a "graph" reruns the step it captured; the engine's signature logic decides when to capture).

    python results/cpu_graph_captures/run.py > results/cpu_graph_captures/output.txt

60 requests of 1-160 random tokens and 1-5 new tokens, max_batch 7, the tiny test Llama (fp32).
"""

import collections
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from conftest import tiny_model  # noqa: E402
from test_cuda_graph import _EmulatedGraphs  # noqa: E402

from kvstore import KVStoreConfig  # noqa: E402
from kvstore.engine import Engine  # noqa: E402
from kvstore.sampling import SamplingParams  # noqa: E402

reasons: collections.Counter = collections.Counter()


class _Why(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "captured" in msg:
            reasons[msg.rsplit(": ", 1)[-1].rstrip(")")] += 1


log = logging.getLogger("kvstore.cuda_graph")
log.addHandler(_Why())
log.setLevel(logging.INFO)
model = tiny_model("llama")
print("| preset | warmup | steps | captures | why (count) |")
print("|---|---|---:|---:|---|")
for preset in ("full", "leankv", "pqcache", "tiered"):
    for warm in (False, True):
        reasons.clear()
        rng = random.Random(0)
        config = KVStoreConfig.preset(preset, **({"pq_trainer": "device"} if preset in ("pqcache", "tiered") else {}))
        with Engine(model, config, max_batch=7, cuda_graphs=False) as engine:
            engine.graphs, engine.decode_path = _EmulatedGraphs(engine.store, max_graphs=7), "cuda-graph"
            if warm:
                engine.warmup(160, 5)
            reasons.clear()
            before = engine.graphs.captures
            for _ in range(60):
                prompt = [rng.randrange(3, 128) for _ in range(rng.randint(1, 160))]
                engine.add_request(prompt, SamplingParams(max_new_tokens=rng.randint(1, 5)))
            steps = 0
            while engine.has_unfinished:
                if engine.step():
                    steps += 1
            why = ", ".join(f"{k} ({v})" for k, v in reasons.most_common())
            print(f"| {preset} | {'warmup(160, 5)' if warm else '-'} | {steps} | {engine.graphs.captures - before} | {why} |")
