"""The controller: admits requests, routes batches to workers, steps them, recovers from failures.

It runs in the driver process (the `python -m cluster.launch` process, or the job's driver under
`ray job submit`) and owns the actors:

    node A                                  node B
    +------------------------------+        +------------------------------+
    | NodeMemory actor (shared mem)|        | NodeMemory actor (shared mem)|
    |   ^ segment per batch        |        |   ^                          |
    |   | mapped, written per step |        |   |                          |
    | WorkerEngine actor (GPU 0)   |        | WorkerEngine actor (GPU 0)   |
    +------------------------------+        +------------------------------+
                 ^  start / step / resume (tiny RPCs: token ids only)
                 |
            Controller (driver)

Scheduling is in lockstep rounds, so a run's schedule depends on the requests and the
cluster's shape, never on timing: each round admits queued requests (a new batch goes to the
worker with the most free sequence slots, ties to the lower index), steps every active batch
once on its worker (all workers in parallel), checks the cold tiers, and retires finished batches.

Failures (each one is logged and counted):
* a worker dies: it is restarted on its node (at most `max_restarts` times per worker slot,
  then its batches move to the other workers, those on the same node first). A batch whose
  segment survives in its node's cold tier is resumed from it, without prefill (its sequences
  count in `resumed`); otherwise it is re-prefilled (`re_prefills`): the prompt is prefilled and
  the generated tokens replayed as decode steps, which leaves the store as the uninterrupted run
  had it; a replayed step whose own token differed from the recorded one (a nondeterministic
  kernel) counts its batch's requests in `recovered_inexact`.
* a cold tier dies: it is restarted on its node and every batch whose segment lived there is
  re-prefilled into a new segment, on its (live) worker.
No request is dropped while some worker is alive; one that cannot be served counts in `failed`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.chaos import CHAOS_KINDS, Chaos  # noqa: F401 - CHAOS_KINDS re-exported
from cluster.node_memory import ArenaSpec, NodeMemory
from cluster.worker import ModelSpec, WorkerEngine
from cluster.workload import Request

logger = logging.getLogger(__name__)

try:  # Ray >= 2.9
    from ray.exceptions import ActorUnavailableError

    _ACTOR_ERRORS: tuple = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover
    _ACTOR_ERRORS = (RayActorError,)


@dataclass(frozen=True)
class ClusterSpec:
    """What the controller starts.

    max_seqs: sequences each worker serves at once (its capacity; a batch never exceeds it).
    use_gpus: one GPU per worker; None = when the cluster has GPUs.
    worker_memory / cold_tier_bytes: memory each actor declares to Ray (bytes); the cold tier
      also refuses segments past cold_tier_bytes.
    max_restarts: restarts of each worker slot before its batches move to other workers.
    """

    model: ModelSpec = ModelSpec()
    preset: str = "full"
    num_workers: int = 2
    max_seqs: int = 4
    use_gpus: bool | None = None
    worker_memory: int = 1 << 30
    cold_tier_bytes: int = 256 << 20
    max_restarts: int = 3
    num_threads: int = 1
    chaos: Chaos | None = None
    store_overrides: tuple[tuple[str, object], ...] = ()  # KVStoreConfig fields over the preset's

    def __post_init__(self) -> None:
        for f in ("num_workers", "max_seqs", "worker_memory", "cold_tier_bytes"):
            if getattr(self, f) < 1:
                raise ValueError(f"ClusterSpec.{f}={getattr(self, f)!r} must be >= 1")
        if self.max_restarts < 0:
            raise ValueError(f"ClusterSpec.max_restarts={self.max_restarts} must be >= 0")


@dataclass
class _Slot:
    index: int
    node_id: str
    handle: object = None
    alive: bool = False
    restarts: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class _Batch:
    batch_id: str
    requests: list[Request]
    slot: int
    node_id: str
    max_new_tokens: int
    generated: list[list[int]]
    arena: ArenaSpec | None = None
    cold_epoch: int = -1  # which incarnation of the node's cold tier holds `arena`
    started_at: float = 0.0
    prefilled: bool = False  # a prefill of this batch completed once (a later one is a re-prefill)

    @property
    def prompts(self) -> list[list[int]]:
        return [list(r.prompt) for r in self.requests]

    @property
    def num_generated(self) -> int:
        return len(self.generated[0])

    @property
    def done(self) -> bool:
        return self.num_generated >= self.max_new_tokens


class Controller:
    def __init__(self, spec: ClusterSpec):
        if not ray.is_initialized():
            raise RuntimeError("ray is not initialized: call ray.init() (or use python -m cluster.launch)")
        self.spec = spec
        self.slots: list[_Slot] = []
        self.cold: dict[str, object] = {}
        self.cold_epoch: dict[str, int] = {}
        self.metrics = dict(worker_restarts=0, cold_tier_restarts=0, re_prefills=0, resumed=0, steps=0,
                            recovered_inexact=0)
        self.failures: list[str] = []
        self._batch_count = 0
        self._chaos_fired = False
        self.geometry: dict = {}
        self.use_gpus = spec.use_gpus if spec.use_gpus is not None else ray.cluster_resources().get("GPU", 0) >= 1

    # ---- actors ---------------------------------------------------------------------------
    def _worker_nodes(self) -> list[dict]:
        need = "GPU" if self.use_gpus else "CPU"
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(need, 0) > 0]
        if not nodes:
            raise RuntimeError(f"no live Ray node has {need} resources for a worker")
        return sorted(nodes, key=lambda n: (not n["Resources"].get("node:__internal_head__"), n["NodeID"]))

    START_TIMEOUT_S = 600

    def start(self) -> None:
        """Start a cold tier on each node that hosts workers, then the workers (round-robin)."""
        nodes = self._worker_nodes()
        if self.use_gpus:
            gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
            if self.spec.num_workers > gpus:
                raise ValueError(f"ClusterSpec.num_workers={self.spec.num_workers} GPU workers, but the cluster has {gpus} GPUs "
                                 "(one worker per GPU); lower --workers or pass --gpus no")
        placement = [nodes[i % len(nodes)] for i in range(self.spec.num_workers)]
        per_node: dict[str, int] = {}
        for n in placement:
            per_node[n["NodeID"]] = per_node.get(n["NodeID"], 0) + 1
        self._cpus = {n["NodeID"]: min(1.0, n["Resources"].get("CPU", 1) / per_node[n["NodeID"]]) for n in placement}
        for node_id in per_node:
            self._start_cold(node_id)
        self.slots = [_Slot(i, n["NodeID"]) for i, n in enumerate(placement)]
        for slot in self.slots:
            slot.handle = self._spawn_worker(slot.node_id)
        for slot in self.slots:
            try:
                slot.info = ray.get(slot.handle.info.remote(), timeout=self.START_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"worker {slot.index} did not start within {self.START_TIMEOUT_S} s: Ray could not place it (it asks "
                    f"for {self._cpus[slot.node_id]} CPU, {int(self.use_gpus)} GPU, {self.spec.worker_memory} bytes of "
                    f"memory; the cluster has {ray.available_resources()})"
                ) from None
            slot.alive = True
        self.geometry = {k: self.slots[0].info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "dtype", "num_q_heads")}
        logger.info("cluster up: %d workers on %d nodes (%s), cold tiers on %s", len(self.slots), len(per_node),
                    "GPU" if self.use_gpus else "CPU", sorted(per_node))

    def _spawn_worker(self, node_id: str):
        opts = dict(
            num_cpus=self._cpus.get(node_id, 1.0),
            num_gpus=1 if self.use_gpus else 0,
            memory=self.spec.worker_memory,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
        )
        return ray.remote(WorkerEngine).options(**opts).remote(
            self.spec.model, self.spec.preset, "cuda" if self.use_gpus else "cpu", self.spec.max_seqs,
            self.spec.num_threads, None, dict(self.spec.store_overrides),
        )

    def _start_cold(self, node_id: str) -> None:
        self.cold[node_id] = ray.remote(NodeMemory).options(
            num_cpus=0, memory=self.spec.cold_tier_bytes, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.spec.cold_tier_bytes)
        self.cold_epoch[node_id] = self.cold_epoch.get(node_id, -1) + 1
        ray.get(self.cold[node_id].ping.remote())

    def shutdown(self) -> None:
        for slot in self.slots:
            if slot.handle is not None:
                ray.kill(slot.handle)
        for handle in self.cold.values():
            try:
                ray.get(handle.shutdown.remote(), timeout=10)
            except Exception:  # already dead
                pass
            ray.kill(handle)

    # ---- serving --------------------------------------------------------------------------
    def run(self, requests: list[Request], on_tokens: Callable[[int], None] | None = None) -> dict:
        """Serve `requests` to completion; returns the summary (see cluster.launch)."""
        t0 = time.perf_counter()
        queue = deque(requests)
        batches: dict[str, _Batch] = {}
        outputs: dict[int, list[int]] = {}
        failed = self._failed = set()
        ttft: list[float] = []
        recovery_s = 0.0
        while queue or batches:
            if not any(s.alive for s in self.slots):
                for r in list(queue) + [r for b in batches.values() for r in b.requests]:
                    failed.add(r.request_id)
                self.failures.append("no live worker left; remaining requests failed")
                logger.error(self.failures[-1])
                break
            new = self._admit(queue, batches)
            for b in new:
                ttft.extend([time.perf_counter() - t0] * len(b.requests))
            if on_tokens is not None:
                on_tokens(sum(len(b.requests) for b in new))
            stepped, dead_slots = self._step_round(batches)
            if on_tokens is not None:
                on_tokens(stepped)
            dead_slots |= self._maybe_chaos(batches)
            dead_nodes = self._dead_cold_tiers()
            t_rec = time.perf_counter()
            for node_id in dead_nodes:
                self._recover_cold(node_id, batches, failed)
            for index in dead_slots:
                self._recover_worker(index, batches, failed)
            recovery_s += time.perf_counter() - t_rec if (dead_nodes or dead_slots) else 0.0
            for bid in [bid for bid, b in batches.items() if b.done]:
                b = batches.pop(bid)
                for r, toks in zip(b.requests, b.generated):
                    outputs[r.request_id] = toks[: r.max_new_tokens]
                self._retire(b)
            for bid in [bid for bid, b in batches.items() if any(r.request_id in failed for r in b.requests)]:
                self._retire(batches.pop(bid))
        if self.spec.chaos is not None and not self._chaos_fired:
            logger.warning("chaos %s@%d never fired: no batch reached decode step %d", self.spec.chaos.kind,
                           self.spec.chaos.step, self.spec.chaos.step)
        serve_s = time.perf_counter() - t0
        completed = [r for r in requests if r.request_id in outputs and r.request_id not in failed]
        tokens = sum(len(outputs[r.request_id]) for r in completed)
        return {
            "requests": len(requests),
            "completed": len(completed),
            "failed": len(requests) - len(completed),
            **self.metrics,
            "chaos_fired": self._chaos_fired,
            "failures": list(self.failures),
            "outputs": [outputs.get(r.request_id) for r in requests],
            "timings": {
                "serve_s": round(serve_s, 3),
                "recovery_s": round(recovery_s, 3),
                "tokens_generated": tokens,
                "tokens_per_s": round(tokens / serve_s, 2) if serve_s > 0 else None,
                "mean_time_to_first_token_s": round(sum(ttft) / len(ttft), 3) if ttft else None,
            },
        }

    def _free(self, slot: _Slot, batches: dict[str, _Batch]) -> int:
        return slot.info.get("max_seqs", self.spec.max_seqs) - sum(
            len(b.requests) for b in batches.values() if b.slot == slot.index
        )

    def _admit(self, queue: deque, batches: dict[str, _Batch]) -> list[_Batch]:
        """Form new batches from the queue head and prefill them (all workers in parallel)."""
        pending = []
        while queue:
            live = [s for s in self.slots if s.alive]
            slot = max(live, key=lambda s: (self._free(s, batches), -s.index))
            free = self._free(slot, batches)
            if free <= 0:
                break
            reqs = [queue.popleft() for _ in range(min(free, len(queue)))]
            self._batch_count += 1
            b = _Batch(f"b{self._batch_count}", reqs, slot.index, slot.node_id, max(r.max_new_tokens for r in reqs),
                       [[] for _ in reqs], started_at=time.perf_counter())
            self._new_arena(b)
            batches[b.batch_id] = b
            pending.append((b, slot.handle.start.remote(b.batch_id, b.prompts, b.max_new_tokens, b.arena)))
        started, dead = [], set()
        for b, ref in pending:
            try:
                first = ray.get(ref)
            except _ACTOR_ERRORS as e:
                self._failure(f"worker {b.slot} died while prefilling batch {b.batch_id}: {type(e).__name__}")
                dead.add(b.slot)
                continue
            for row, tok in zip(b.generated, first):
                row.append(tok)
            b.prefilled = True
            started.append(b)
        for index in dead:
            self._recover_worker(index, batches, self._failed)
        return started

    def _step_round(self, batches: dict[str, _Batch]) -> tuple[int, set[int]]:
        refs = [(b, self.slots[b.slot].handle.step.remote(b.batch_id)) for b in batches.values()
                if not b.done and self.slots[b.slot].alive]
        tokens, dead = 0, set()
        for b, ref in refs:
            try:
                new = ray.get(ref)
            except _ACTOR_ERRORS as e:
                if b.slot not in dead:
                    self._failure(f"worker {b.slot} died during a decode step of batch {b.batch_id}: {type(e).__name__}")
                dead.add(b.slot)
                continue
            for row, tok in zip(b.generated, new):
                row.append(tok)
            tokens += len(new)
        if refs:
            self.metrics["steps"] += 1
        return tokens, dead

    def _dead_cold_tiers(self) -> list[str]:
        refs = {node_id: h.ping.remote() for node_id, h in self.cold.items()}
        dead = []
        for node_id, ref in refs.items():
            try:
                ray.get(ref, timeout=60)
            except (*_ACTOR_ERRORS, ray.exceptions.GetTimeoutError) as e:
                self._failure(f"cold tier on node {node_id[:8]} died: {type(e).__name__}")
                dead.append(node_id)
        return dead

    def _maybe_chaos(self, batches: dict[str, _Batch]) -> set[int]:
        """Fire the chaos kill once; returns the killed worker slot once a ping sees it dead."""
        chaos = self.spec.chaos
        if chaos is None or self._chaos_fired:
            return set()
        for b in sorted(batches.values(), key=lambda b: b.batch_id):
            if b.num_generated - 1 == chaos.step:
                self._chaos_fired = True
                if chaos.kind == "kill-worker":
                    logger.warning("chaos: killing worker %d after decode step %d of batch %s", b.slot, chaos.step, b.batch_id)
                    handle = self.slots[b.slot].handle
                    ray.kill(handle, no_restart=True)
                    try:
                        ray.get(handle.ping.remote(), timeout=60)
                    except (*_ACTOR_ERRORS, ray.exceptions.GetTimeoutError) as e:
                        self._failure(f"worker {b.slot} died (chaos): {type(e).__name__}")
                        return {b.slot}
                else:
                    logger.warning("chaos: killing the cold tier of node %s after decode step %d of batch %s",
                                   b.node_id[:8], chaos.step, b.batch_id)
                    ray.kill(self.cold[b.node_id], no_restart=True)
                return set()
        return set()

    def _retire(self, b: _Batch) -> None:
        slot = self.slots[b.slot]
        if slot.alive:
            slot.handle.finish.remote(b.batch_id)
        self._release_arena(b)

    # ---- recovery -------------------------------------------------------------------------
    def _failure(self, message: str) -> None:
        self.failures.append(message)
        logger.error(message)

    def _new_arena(self, b: _Batch) -> None:
        """Give the batch a segment in its node's cold tier (None if that fails: then it can only be re-prefilled)."""
        cold = self.cold.get(b.node_id)
        b.arena, b.cold_epoch = None, -1
        if cold is None:
            return
        total = max(len(r.prompt) for r in b.requests) + b.max_new_tokens
        g = self.geometry
        try:
            b.arena = ray.get(cold.create_arena.remote(b.batch_id, len(b.requests), g["num_layers"], g["num_kv_heads"],
                                                       g["head_dim"], total, g["dtype"], g["num_q_heads"]))
            b.cold_epoch = self.cold_epoch[b.node_id]
        except (*_ACTOR_ERRORS, RayTaskError) as e:
            self._failure(f"no cold-tier segment for batch {b.batch_id} on node {b.node_id[:8]}: {e}")

    def _release_arena(self, b: _Batch) -> None:
        cold = self.cold.get(b.node_id)
        if b.arena is not None and cold is not None and b.cold_epoch == self.cold_epoch.get(b.node_id):
            cold.release.remote(b.batch_id)
        b.arena = None

    def _recover_worker(self, index: int, batches: dict[str, _Batch], failed: set[int]) -> None:
        slot = self.slots[index]
        if not slot.alive:
            return
        slot.alive = False
        if slot.restarts < self.spec.max_restarts:
            try:
                slot.handle = self._spawn_worker(slot.node_id)
                slot.info = ray.get(slot.handle.info.remote())
                slot.node_id = slot.info["node_id"] or slot.node_id
                slot.alive = True
                slot.restarts += 1
                self.metrics["worker_restarts"] += 1
                logger.warning("worker %d restarted on node %s (restart %d)", index, slot.node_id[:8], slot.restarts)
            except _ACTOR_ERRORS as e:
                self._failure(f"restarting worker {index} failed: {type(e).__name__}")
        else:
            self._failure(f"worker {index} exceeded max_restarts={self.spec.max_restarts}; moving its batches")
        for b in [b for b in batches.values() if b.slot == index]:
            self._place(b, batches, failed)

    def _place(self, b: _Batch, batches: dict[str, _Batch], failed: set[int]) -> None:
        """Put a batch whose worker died on a live worker: resume from its segment if it can, else re-prefill."""
        for _ in range(len(self.slots) * (self.spec.max_restarts + 1)):
            live = [s for s in self.slots if s.alive and (s.index == b.slot or self._free(s, batches) >= len(b.requests))]
            if not live:
                break
            # where its cold KV lives first: its own (restarted) slot, then other workers of its node
            slot = min(live, key=lambda s: (s.index != b.slot, s.node_id != b.node_id, -self._free(s, batches), s.index))
            b.slot = slot.index
            try:
                if b.arena is not None and slot.node_id == b.node_id and b.cold_epoch == self.cold_epoch.get(b.node_id):
                    try:
                        b.generated = ray.get(slot.handle.resume.remote(b.batch_id, b.arena, b.max_new_tokens))
                        self.metrics["resumed"] += len(b.requests)
                        return
                    except RayTaskError as e:
                        self._failure(f"batch {b.batch_id} cannot resume from its segment ({e.cause!r}); re-prefilling")
                self._reprefill(b, slot)
                return
            except _ACTOR_ERRORS as e:
                self._failure(f"worker {slot.index} died while taking over batch {b.batch_id}: {type(e).__name__}")
                slot.alive = False
                if slot.restarts < self.spec.max_restarts:
                    slot.restarts += 1
                    self.metrics["worker_restarts"] += 1
                    slot.handle = self._spawn_worker(slot.node_id)
                    slot.info = ray.get(slot.handle.info.remote())
                    slot.alive = True
        for r in b.requests:
            failed.add(r.request_id)
        self._failure(f"batch {b.batch_id} could not be placed on any worker; its {len(b.requests)} requests failed")

    def _reprefill(self, b: _Batch, slot: _Slot) -> None:
        self._release_arena(b)
        b.node_id = slot.node_id
        self._new_arena(b)
        had = b.num_generated > 0
        first = ray.get(slot.handle.start.remote(b.batch_id, b.prompts, b.max_new_tokens, b.arena,
                                                 b.generated if had else None))
        if b.prefilled:
            self.metrics["re_prefills"] += len(b.requests)
        if had and ray.get(slot.handle.take_replay_mismatches.remote()):
            self.metrics["recovered_inexact"] += len(b.requests)
        b.prefilled = True
        if not had:
            for row, tok in zip(b.generated, first):
                row.append(tok)

    def _recover_cold(self, node_id: str, batches: dict[str, _Batch], failed: set[int]) -> None:
        self.metrics["cold_tier_restarts"] += 1
        try:
            self._start_cold(node_id)
        except Exception as e:  # node gone: its batches keep running, without a segment
            self._failure(f"restarting the cold tier on node {node_id[:8]} failed: {e!r}")
            self.cold.pop(node_id, None)
        lost = [b for b in batches.values() if b.node_id == node_id and b.arena is not None]
        if node_id in self.cold and lost:  # the dead tier could not unlink its segments
            self.cold[node_id].reap_orphans.remote([b.arena.name for b in lost])
        for b in lost:
            b.arena = None  # its segment died with the cold tier
            slot = self.slots[b.slot]
            if not slot.alive:
                continue  # its worker's recovery re-prefills it
            try:
                logger.warning("batch %s lost its segment with the cold tier; re-prefilling it on worker %d", b.batch_id, slot.index)
                self._reprefill(b, slot)
            except _ACTOR_ERRORS as e:
                self._failure(f"worker {slot.index} died while re-prefilling batch {b.batch_id}: {type(e).__name__}")
                self._recover_worker(slot.index, batches, failed)
