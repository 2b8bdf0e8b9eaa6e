"""`kvstore-bench`: the long-context benchmark suite's command line.

    kvstore-bench quick [--model probe] [--out DIR]   # the README's main job: a few minutes on CPU
    kvstore-bench run --model PATH_OR_NAME --tasks passkey,niah_single_1 --lengths 4096 \\
        --methods full,pqcache [--budgets 0.1,0.2] --samples 10 --out DIR [--max-minutes M]
    kvstore-bench report --out DIR          # rewrite DIR/summary.md and the plots
    kvstore-bench list                      # tasks, and which methods the store provides now
    kvstore-bench throughput --model llama3-8b --lengths 32k,128k --methods hf,full,tiered --out DIR
                                # decode tokens/s at each method's largest batch (benchmarks/perf/throughput.py)

--model: "probe" (the shipped probe model, benchmarks/probe/weights/), "random" (a tiny random Llama
with the probe tokenizer: checks the plumbing, scores ~0), or a local Hugging Face model folder.
Nothing is downloaded. Results: DIR/results.jsonl (one line per task, length, method, budget),
DIR/samples.jsonl, DIR/summary.md, DIR/*.png. Rerunning with the same DIR skips the rows
already there. --methods available runs every method the store provides (others are skipped
with a warning). --max-minutes stops cleanly (exit 0, "stopped:" on stderr) and the same
command resumes. A method that raises is logged with its traceback and left out for the rest
of the run, the others go on, and the exit status is 1 (--fail-fast: stop at once instead).
Bad arguments exit 2 with one line, `kvstore-bench COMMAND: error: ...`, before any model is
loaded, any prompt built or any folder made (validate_run, validate_report; throughput.validate).

`quick` runs QUICK_TASKS at QUICK_LENGTHS with full against the best presets the store
provides (QUICK_METHODS: quant, leankv, snapkv, pqcache, oracle, tiered; budget 1/5) and prints
the summary table. Its default model is the probe; when the probe files are not there yet it
falls back to --model random with a warning (accuracy then means nothing, the table only shows
that every method runs); an explicit --model probe without the files is an error. Without
--out it writes to a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.args import check_out_dir, csv as _csv, lengths as _lengths

logger = logging.getLogger("kvstore-bench")

#: `kvstore-bench quick` with the first probe architecture (4 layers, hidden 256, 8q/2kv heads), 7
#: methods, on 2 CPU cores (2026-11, fp32, unloaded): 61 s at 2048 tokens, 113 s at 3072, 177 s
#: at 4096; with the 6-layer probe 153 s at 3072, with the UUID-pair probe 147 s. 3072 keeps the
#: PQ k-means above FAISS's 39 training points per centroid and leaves room for a loaded machine
#: (2.5x at load 5).
QUICK_TASKS = ("passkey", "niah_single_1", "niah_multikey_2")
QUICK_LENGTHS = (3072,)
QUICK_SAMPLES = 4


def _depths(text: str) -> list[float]:
    try:
        return [float(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths entries must be numbers in [0, 1], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.suite.methods import METHODS
    from benchmarks.suite.tasks import TASKS

    parser = argparse.ArgumentParser(prog="kvstore-bench", description="kvstore's long-context benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run tasks x lengths x methods x budgets and write DIR")
    run.add_argument("--model", required=True, help="'probe', 'random', or a local Hugging Face model folder")
    run.add_argument("--tasks", type=_csv, required=True, help=f"comma-separated, from: {', '.join(TASKS)}; or 'all'")
    run.add_argument("--lengths", type=_lengths, required=True, help="prompt lengths in tokens, e.g. 2048,4k")
    run.add_argument("--methods", type=_csv, required=True, help=f"comma-separated, from: {', '.join(METHODS)}")
    run.add_argument("--budgets", type=_csv, default=None,
                     help="for budgeted methods: fractions c (PQCache's definition) or token counts k; default 0.2")
    run.add_argument("--samples", type=int, default=10, help="samples per (task, length)")
    run.add_argument("--out", required=True, help="output folder (resumable)")
    run.add_argument("--batch-size", type=int, default=None, help="sequences per generate() call (default ~16K tokens)")
    run.add_argument("--depths", type=_depths, default=None,
                     help="needle depths cycled over samples (default: spread evenly over [0, 1])")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's answer length + 8")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    run.add_argument("--no-plots", action="store_true", help="write summary.md only")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _run_guards(run)
    quick = sub.add_parser("quick", help="a few tasks at 3K tokens, full against the best presets; prints the table")
    quick.add_argument("--model", default=None,
                       help="default: the probe (falls back to 'random' with a warning while it is not shipped)")
    quick.add_argument("--out", default=None, help="output folder (default: a fresh temporary folder)")
    quick.add_argument("--tasks", type=_csv, default=list(QUICK_TASKS))
    quick.add_argument("--lengths", type=_lengths, default=list(QUICK_LENGTHS))
    quick.add_argument("--methods", type=_csv, default=None,
                       help="default: full and whichever of quant, leankv, snapkv, pqcache, oracle, tiered the store provides")
    quick.add_argument("--budgets", type=_csv, default=None, help="default 0.2 (1/5 of the prompt attended)")
    quick.add_argument("--samples", type=int, default=QUICK_SAMPLES)
    quick.add_argument("--device", default="auto")
    quick.add_argument("--dtype", default="auto")
    quick.add_argument("--no-plots", action="store_true")
    quick.add_argument("--quiet", action="store_true")
    _run_guards(quick)
    rep = sub.add_parser("report", help="rewrite DIR/summary.md and the plots from DIR/results.jsonl")
    rep.add_argument("--out", required=True)
    rep.add_argument("--no-plots", action="store_true")
    sub.add_parser("list", help="tasks and methods (with what each method still lacks in the store)")
    from benchmarks.perf.throughput import add_parser as add_throughput_parser

    add_throughput_parser(sub)
    return parser


def _run_guards(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", choices=("engine", "generate"), default="engine",
                   help="engine (kvstore.Engine: each prompt prefilled alone, batched decode steps; default) or "
                        "generate (attach + model.generate() on the batch, the compatible path)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly before this much wall time is spent (rows written so far stay; rerun to resume)")
    p.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                   help="one untimed batch per (method, length) first; auto: on CUDA only (Triton compilation)")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first method that raises (default: log it, leave that method@budget out, "
                        "run the rest, exit 1)")


def _error(command: str, exc: BaseException | str) -> int:
    """Print one line, `kvstore-bench COMMAND: error: ...`, on stderr; returns exit status 2."""
    text = str(exc).strip() or type(exc).__name__
    print(f"kvstore-bench {command}: error: {text.splitlines()[0]}", file=sys.stderr)
    return 2


def validate_run(args: argparse.Namespace, skip_unavailable: bool = False):
    """Every check of `run` and `quick` that needs no model, in the order a user fixes them:
    tasks, the RunSpec fields, methods and budgets, --device and --dtype, --out, --model (its
    config.json, weights and tokenizer files; nothing is loaded), and that --out holds no other
    model's rows. Returns (tasks, RunSpec, methods@budgets). Raises ValueError,
    FileNotFoundError or MethodUnavailable with a one-line message; nothing is created.
    """
    from benchmarks.suite.methods import expand_methods
    from benchmarks.suite.runner import RunSpec, check_model, check_results_model, resolve_device, resolve_dtype
    from benchmarks.suite.tasks import TASKS

    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    spec = RunSpec(
        tasks=tasks, lengths=args.lengths, methods=args.methods, out=args.out, budgets=args.budgets,
        samples=args.samples, batch_size=args.batch_size, seed=args.seed, depths=args.depths,
        max_new_tokens=args.max_new_tokens, progress=not args.quiet, max_minutes=args.max_minutes,
        warmup={"auto": None, "on": True, "off": False}[args.warmup], skip_unavailable=skip_unavailable,
        keep_going=not args.fail_fast, path=args.path,
    )
    methods = expand_methods(spec.methods, spec.budgets, skip_unavailable)
    resolve_dtype(args.dtype, resolve_device(args.device))
    out = check_out_dir(args.out) if args.out is not None else None
    label = check_model(args.model)
    if out is not None:
        check_results_model(out / "results.jsonl", label)
    return tasks, spec, methods


def validate_report(args: argparse.Namespace) -> Path:
    """`report --out DIR`: DIR must be a folder holding results.jsonl (ValueError, one line)."""
    out = Path(args.out)
    if not out.exists():
        raise ValueError(f"--out {out}: no such folder (`kvstore-bench run --out {out}` writes one)")
    if not out.is_dir():
        raise ValueError(f"--out {out}: not a folder")
    if not (out / "results.jsonl").is_file():
        raise ValueError(f"--out {out}: holds no results.jsonl (`kvstore-bench run --out {out}` writes it)")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable (the report writes summary.md there)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("kvstore.client", "benchmarks.probe.tokenizer", "faiss", "faiss.loader", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "throughput":
        from benchmarks.perf.throughput import run as run_throughput

        return run_throughput(args, sys.argv[1:] if argv is None else list(argv))
    from benchmarks.suite.methods import MethodUnavailable, available_methods
    from benchmarks.suite.tasks import TASKS

    if args.command == "list":
        print("tasks:", ", ".join(TASKS))
        for name, why in available_methods().items():
            print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
        return 0
    from benchmarks.suite.report import write_report

    if args.command == "report":
        try:
            out = validate_report(args)
        except ValueError as exc:
            return _error(args.command, exc)
        print(write_report(out, plots=not args.no_plots))
        return 0

    from benchmarks.suite.runner import load_model, run_suite

    skip_unavailable = False
    if args.command == "quick":
        from benchmarks.probe.model import PROBE_DIR, has_probe
        from benchmarks.suite.methods import QUICK_METHODS

        if args.model is None:
            args.model = "probe"
            if not has_probe(PROBE_DIR):
                logger.warning(
                    "WARNING: the probe model is not in %s yet, so this runs --model random, a tiny random "
                    "Llama: its accuracy is meaningless (it only shows every method runs). Train the probe "
                    "with `python -m benchmarks.probe.train --out benchmarks/probe/weights` or pass --model PATH.",
                    PROBE_DIR,
                )
                args.model = "random"
        if args.methods is None:
            args.methods, skip_unavailable = list(QUICK_METHODS), True
        args.batch_size = args.depths = args.max_new_tokens = None
        args.seed = 0
    try:  # before any model, dataset or output folder
        tasks, spec, methods = validate_run(args, skip_unavailable)
    except (ValueError, FileNotFoundError, MethodUnavailable) as exc:
        return _error(args.command, exc)
    if args.out is None:
        args.out = spec.out = tempfile.mkdtemp(prefix="kvstore-bench-quick-")
    logger.info(
        "kvstore-bench %s: %d tasks x %d lengths x %d methods@budgets x %d samples -> %s",
        args.command, len(tasks), len(spec.lengths), len(methods), spec.samples, args.out,
    )
    start = time.perf_counter()
    try:
        model, tokenizer, label = load_model(args.model, args.device, args.dtype)
        result = run_suite(model, tokenizer, spec, label)
    except (ValueError, FileNotFoundError, MethodUnavailable) as exc:
        return _error(args.command, exc)
    print(write_report(args.out, plots=not args.no_plots))
    elapsed = time.perf_counter() - start
    if result.stopped:
        print(f"kvstore-bench: stopped: {result.stopped}. Rerun the same command to resume.", file=sys.stderr)
    for name, why in result.skipped.items():
        print(f"kvstore-bench: skipped {name}: {why}", file=sys.stderr)
    for name, why in result.failed.items():
        print(f"kvstore-bench: FAILED {name} (left out after this error): {why}", file=sys.stderr)
    print(f"kvstore-bench: {result.completed} rows in {elapsed:.1f} s; results in {args.out}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
