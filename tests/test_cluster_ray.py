"""The Ray cluster layer on real Ray, on the CPU: local workers, two nodes, killed actors, job submission."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.controller import Chaos, ClusterSpec, Controller  # noqa: E402
from cluster.worker import ModelSpec, WorkerEngine  # noqa: E402
from cluster.workload import builtin_workload  # noqa: E402

pytestmark = pytest.mark.cluster

MODEL = ModelSpec("random", seed=1)
REQUESTS = builtin_workload(num_requests=6, vocab_size=256, prompt_tokens=(4, 20), max_new_tokens=10, seed=2)
REPO = Path(__file__).resolve().parent.parent


def _reference(batch_size: int) -> list[list[int]]:
    """Greedy outputs in-process (no Ray), with the batches the controller forms (in order, `batch_size` each)."""
    threads = torch.get_num_threads()
    try:
        engine = WorkerEngine(MODEL, "full", "cpu", max_seqs=batch_size, num_threads=1)
        outputs = []
        for i in range(0, len(REQUESTS), batch_size):
            reqs = REQUESTS[i:i + batch_size]
            engine.start("ref", [list(r.prompt) for r in reqs], 10)
            for _ in range(9):
                engine.step("ref")
            outputs += engine.generated("ref")
            engine.finish("ref")
        return outputs
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    return _reference(3)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def _segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("kvs")} if shm.is_dir() else set()


def _serve(chaos=None, workers=2):
    before = _segments()
    controller = Controller(ClusterSpec(model=MODEL, num_workers=workers, max_seqs=3, chaos=chaos,
                                        cold_tier_bytes=16 << 20, worker_memory=256 << 20))
    try:
        controller.start()
        result = controller.run(REQUESTS)
        result["worker_nodes"] = [s.node_id for s in controller.slots]
        result["cold_nodes"] = sorted(controller.cold)
    finally:
        controller.shutdown()
    assert _segments() <= before, "cold-tier segments left behind"
    return result


def test_local_cluster_two_workers(local_ray, reference):
    result = _serve()
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["outputs"] == reference  # two workers, one batch each, equal to the in-process engine
    assert result["worker_restarts"] == result["re_prefills"] == 0 and not result["failures"]


def test_worker_killed_mid_decode_resumes_without_prefill(local_ray, reference):
    result = _serve(Chaos("kill-worker", 4))
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["outputs"] == reference
    assert result["worker_restarts"] == 1 and result["re_prefills"] == 0 and result["resumed"] == 3
    assert any("died" in f for f in result["failures"])


def test_cold_tier_killed_requests_reprefilled(local_ray, reference):
    result = _serve(Chaos("kill-cold-tier", 3))
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["outputs"] == reference  # the replayed steps leave the store as the uninterrupted run had it
    assert result["cold_tier_restarts"] == 1 and result["re_prefills"] == 6  # both batches lived in that cold tier
    assert result["recovered_inexact"] == 0
    assert result["worker_restarts"] == 0


def test_two_node_cluster_routes_across_nodes(reference):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        result = _serve(Chaos("kill-worker", 2))
        nodes = set(result["worker_nodes"])
        assert len(nodes) == 2 and set(result["cold_nodes"]) == nodes  # a worker and a cold tier per node
        assert result["completed"] == 6 and result["outputs"] == reference
        # the killed worker came back on its node, next to the segment, and resumed it
        assert result["worker_restarts"] == 1 and result["re_prefills"] == 0 and result["resumed"] == 3
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_job_submit_against_local_head(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = 8265 + (os.getpid() % 500)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=0", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    current = Path("/tmp/ray/ray_current_cluster")
    try:
        out = tmp_path / "summary.json"
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{port}", "--",
               sys.executable, "-m", "cluster.launch", "--address", "auto", "--model", "random", "--workers", "1",
               "--requests", "2", "--max-new-tokens", "4", "--summary-json", str(out)]
        for _ in range(60):  # the dashboard's job server takes a while to come up
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
            if proc.returncode == 0 or "Connection" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads(out.read_text())
        assert summary["completed"] == 2 and summary["failed"] == 0 and summary["workers"] == 1
    finally:
        ours = current.read_text() if current.exists() else None
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        if ours is not None and current.exists() and current.read_text() == ours:
            current.unlink()  # the stopped head's address, which a later ray.init() would try to join


def test_launch_cli_chaos_run_matches_clean_run(tmp_path):
    """The issue's acceptance check, shrunk: both runs exit 0 with equal outputs; the chaos run resumes."""
    if ray.is_initialized():
        ray.shutdown()
    summaries = []
    for name, extra in (("a", []), ("b", ["--chaos", "kill-worker@3"])):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "cluster.launch", "--model", "random", "--workers", "2", "--requests", "4",
             "--max-new-tokens", "6", "--summary-json", str(out), *extra],
            cwd=tmp_path, capture_output=True, text=True, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append(json.loads(out.read_text()))
    a, b = summaries
    assert a["completed"] == b["completed"] == 4 and a["failed"] == b["failed"] == 0
    assert a["outputs_sha256"] == b["outputs_sha256"]
    assert b["worker_restarts"] >= 1 and b["re_prefills"] == 0 and a["worker_restarts"] == 0
    assert {"serve_s", "startup_s", "total_s", "tokens_per_s"} <= set(b["timings"])
