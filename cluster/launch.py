"""`python -m cluster.launch`: serve the built-in workload on a Ray cluster, with optional chaos.

    python -m cluster.launch --workers 2 --summary-json a.json
    python -m cluster.launch --workers 2 --chaos kill-worker@8 --summary-json b.json
    ray job submit --address http://127.0.0.1:8265 -- python -m cluster.launch --address auto --workers 1

With no --address it starts a local Ray bound to 127.0.0.1 with token authentication on
(RAY_AUTH_MODE=token) and stops it at the end; with --address auto it joins the cluster it runs
in (the way `ray job submit` runs it). The summary (stdout, and --summary-json) holds requests,
completed, failed, worker_restarts, re_prefills, recovered_inexact (re-prefilled requests whose
replay did not reproduce a recorded token), outputs_sha256 (over the generated token ids in
request order) and timings. A recovered request yields the tokens of an uninterrupted run (its
generated tokens are replayed as decode steps after a re-prefill; a resumed batch replays the
store's recorded calls). The exit code is 1 when any request failed, 2 for a bad argument:
every argument is checked (`validate`) before Ray starts, and a bad one gets one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("cluster.launch")

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto",
                   help="'random' (seeded random Llama), 'probe' (benchmarks/probe/weights/), "
                        "'auto' (probe if present, else random), or a local directory / HF name (safetensors only)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker actors, one GPU each when the cluster has GPUs (default: one per GPU, else 2 CPU workers)")
    p.add_argument("--preset", default="full", help="KVStoreConfig preset the workers' stores run")
    p.add_argument("--store", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a KVStoreConfig field of the preset (JSON value), e.g. --store token_budget=256")
    p.add_argument("--address", default=None, help="Ray address to join ('auto' inside `ray job submit`); "
                                                   "default: start a local Ray on 127.0.0.1")
    p.add_argument("--summary-json", type=Path, default=None, help="write the summary here")
    p.add_argument("--chaos", default=None, help="kill-worker@STEP or kill-cold-tier@STEP: kill one actor after that decode step")
    p.add_argument("--requests", type=int, default=8, help="requests in the built-in workload")
    p.add_argument("--prompt-tokens", default="8,48", help="prompt length range lo,hi (tokens)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-seqs", type=int, default=4, help="sequences each worker serves at once")
    p.add_argument("--seed", type=int, default=0, help="workload and random-model seed")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU for loaded models, else fp32) or a torch dtype")
    p.add_argument("--gpus", choices=("auto", "yes", "no"), default="auto", help="one GPU per worker")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: max(cores, workers))")
    p.add_argument("--cold-tier-mb", type=int, default=256, help="host memory of each node's cold tier")
    p.add_argument("--worker-memory-mb", type=int, default=1024, help="memory each worker declares to Ray")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts per worker before its batches move")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    try:
        validate(args)
    except ValueError as exc:
        p.error(str(exc).splitlines()[0])  # one line, exit status 2
    return args


def _at_least(args: argparse.Namespace, floor: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < floor:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {floor}, got {value}")


def validate(args: argparse.Namespace) -> None:
    """Every check that needs neither Ray nor a model; ValueError with a one-line message.

    Sets args.prompt_range, args.store_overrides and args.chaos_spec. Checks counts and sizes,
    --prompt-tokens, --store/--preset (the KVStoreConfig is built), --chaos (its step must be one
    the run reaches: 1 .. --max-new-tokens - 1), --model (a folder's config.json, family and
    safetensors; a probe that is not there), --dtype, --log-level, --summary-json, and for a
    local Ray with --gpus yes, that this machine has a GPU per worker.
    """
    _at_least(args, 1, "workers", "requests", "max_new_tokens", "max_seqs", "num_cpus", "cold_tier_mb",
              "worker_memory_mb")
    _at_least(args, 0, "max_restarts")
    try:
        lo, hi = (int(x) for x in args.prompt_tokens.split(","))
    except ValueError:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens!r}: expected lo,hi") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens}: expected 1 <= lo <= hi")
    args.prompt_range = (lo, hi)
    args.store_overrides = []
    for item in args.store:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--store {item!r}: expected FIELD=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        args.store_overrides.append((field, parsed))
    from kvstore import KVStoreConfig

    try:
        KVStoreConfig.preset(args.preset, **dict(args.store_overrides))
    except (TypeError, ValueError, NotImplementedError) as exc:
        store = "".join(f" --store {item}" for item in args.store)
        raise ValueError(f"--preset {args.preset}{store}: {str(exc).splitlines()[0]}") from None
    args.chaos_spec = None
    if args.chaos is not None:
        from cluster.chaos import Chaos

        args.chaos_spec = Chaos.parse(args.chaos)
        last = Chaos.last_step(args.max_new_tokens)
        if args.chaos_spec.step > last:
            steps = f"steps 1..{last}" if last >= 1 else "no decode step (raise --max-new-tokens)"
            raise ValueError(f"--chaos {args.chaos}: step {args.chaos_spec.step} is never reached: with "
                             f"--max-new-tokens {args.max_new_tokens} a batch runs {steps}")
    if logging.getLevelName(args.log_level.upper()) not in (logging.DEBUG, logging.INFO, logging.WARNING,
                                                           logging.ERROR, logging.CRITICAL):
        raise ValueError(f"--log-level {args.log_level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if args.dtype != "auto":
        import torch

        if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
            raise ValueError(f"--dtype {args.dtype!r}: expected auto or a torch dtype name (float32, bfloat16, float16)")
    _check_model(args.model)
    if args.summary_json is not None:
        target = args.summary_json
        if target.is_dir():
            raise ValueError(f"--summary-json {target}: is a folder")
        parent = target.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--summary-json {target}: {parent} is a file, not a folder")
    if args.address is None and args.gpus == "yes":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < (args.workers or 1):
            raise ValueError(f"--gpus yes: this machine has {gpus} GPU(s) for {args.workers or 1} worker(s) of a "
                             "local Ray; pass --gpus no or --workers N")


def _check_model(name: str) -> None:
    """--model: auto, random, a probe that is there, a local folder the workers can load
    (config.json of a supported family, *.safetensors), or a Hugging Face repo id."""
    if name in ("auto", "random"):
        return
    from cluster.worker import probe_model_dir

    if name == "probe":
        if probe_model_dir() is None:
            raise ValueError("--model probe: benchmarks/probe/weights/ holds no model (config.json + *.safetensors); "
                             "pass --model random or a model folder")
        return
    if Path(name).exists():
        from kvstore.adapters.model_dir import check_model_dir

        try:  # prompts are token ids: no tokenizer needed
            check_model_dir(name, tokenizer=False, weights="safetensors")
        except ValueError as exc:
            raise ValueError(f"--model {exc}") from None
        return
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
        repo_id = not name.startswith((".", "~", os.sep))
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        repo_id = False
    except ValueError:
        repo_id = False
    if not repo_id:
        raise ValueError(f"--model {name}: no such folder, and not auto, random, probe or a Hugging Face repo id")


def _start_ray(args: argparse.Namespace):
    """Start (or join) Ray. Environment settings must precede the first `import ray`."""
    if args.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # token authentication (Ray >= 2.52)
        # Bind every Ray process to the loopback address: with this set, Ray takes 127.0.0.1 as the
        # node IP instead of the machine's routable address (a single-machine cluster).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Workers import cluster/ and kvstore/ from this checkout even when it is not installed.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    import ray

    if args.address is None:
        num_cpus = args.num_cpus or max(os.cpu_count() or 1, args.workers or 2)
        # "local": always a new instance, never one found through /tmp/ray/ray_current_cluster
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=args.address, logging_level=logging.WARNING)
    return ray


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    t0 = time.perf_counter()  # every argument was checked in parse_args, before Ray starts
    ray = _start_ray(args)
    t_ray = time.perf_counter()

    from tqdm import tqdm

    from cluster.controller import ClusterSpec, Controller
    from cluster.worker import ModelSpec
    from cluster.workload import builtin_workload, outputs_sha256

    if args.workers is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        args.workers = gpus if gpus >= 1 and args.gpus != "no" else 2
    spec = ClusterSpec(
        model=ModelSpec(args.model, seed=args.seed, dtype=args.dtype),
        preset=args.preset,
        num_workers=args.workers,
        max_seqs=args.max_seqs,
        use_gpus={"auto": None, "yes": True, "no": False}[args.gpus],
        worker_memory=args.worker_memory_mb << 20,
        cold_tier_bytes=args.cold_tier_mb << 20,
        max_restarts=args.max_restarts,
        chaos=args.chaos_spec,
        store_overrides=tuple(args.store_overrides),
    )

    controller = Controller(spec)
    try:
        controller.start()
        t_up = time.perf_counter()
        vocab = controller.slots[0].info["vocab_size"]
        requests = builtin_workload(args.requests, vocab, args.prompt_range, args.max_new_tokens, args.seed)
        with tqdm(total=sum(r.max_new_tokens for r in requests), unit="tok", desc="decoding", file=sys.stderr,
                  mininterval=1.0) as bar:
            result = controller.run(requests, on_tokens=bar.update)
        stats = []
        for slot in controller.slots:
            try:
                stats.append(ray.get(slot.handle.stats.remote(), timeout=30) if slot.alive else None)
            except Exception:
                stats.append(None)
    finally:
        controller.shutdown()
    outputs = result.pop("outputs")
    summary = {
        "requests": result.pop("requests"),
        "completed": result.pop("completed"),
        "failed": result.pop("failed"),
        "worker_restarts": result.pop("worker_restarts"),
        "re_prefills": result.pop("re_prefills"),
        "outputs_sha256": outputs_sha256([o if o is not None else [] for o in outputs]),
        **result,
        "model": controller.slots[0].info.get("model"),
        "preset": args.preset,
        "store_overrides": dict(args.store_overrides),
        "workers": args.workers,
        "device": controller.slots[0].info.get("device"),
        "nodes": len({s.node_id for s in controller.slots}),
        "chaos": args.chaos,
        "worker_store_stats": stats,
    }
    summary["timings"].update(ray_start_s=round(t_ray - t0, 3), startup_s=round(t_up - t_ray, 3),
                              total_s=round(time.perf_counter() - t0, 3))
    if args.address is None:
        ray.shutdown()
    brief = {k: summary[k] for k in ("requests", "completed", "failed", "worker_restarts", "re_prefills", "resumed",
                                      "cold_tier_restarts", "recovered_inexact", "outputs_sha256")}
    print(json.dumps({**brief, "timings": summary["timings"]}, indent=2))
    if summary["recovered_inexact"]:
        logger.warning("%d recovered requests replayed a step whose token differed from the recorded one: their "
                       "outputs continue from the recorded tokens but the cache state may differ from an "
                       "uninterrupted run's", summary["recovered_inexact"])
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["failed"]:
        logger.error("%d of %d requests failed", summary["failed"], summary["requests"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
