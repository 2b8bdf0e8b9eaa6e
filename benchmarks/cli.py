"""`kvstore-bench`: the long-context benchmark suite's command line.

    kvstore-bench run --model PATH_OR_NAME --tasks passkey,niah_single_1 --lengths 4096 \\
        --methods full,pqcache [--budgets 0.1,0.2] --samples 10 --out DIR
    kvstore-bench report --out DIR          # rewrite DIR/summary.md and the plots
    kvstore-bench list                      # tasks, and which methods the store provides now

--model: "probe" (the shipped probe model, benchmarks/probe/), "random" (a tiny random Llama
with the probe tokenizer: checks the plumbing, scores ~0), or a local Hugging Face model folder.
Nothing is downloaded. Results: DIR/results.jsonl (one line per task, length, method, budget),
DIR/samples.jsonl, DIR/summary.md, DIR/*.png. Rerunning with the same DIR skips the rows
already there.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("kvstore-bench")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _lengths(text: str) -> list[int]:
    out = []
    for p in _csv(text):
        mult = 1
        if p[-1] in "kK":
            p, mult = p[:-1], 1024
        try:
            out.append(int(p) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lengths entries must be token counts like 4096 or 4k, got {p!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.methods import METHODS
    from benchmarks.tasks import TASKS

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
    run.add_argument("--depths", type=lambda s: [float(x) for x in _csv(s)], default=None,
                     help="needle depths cycled over samples (default: spread evenly over [0, 1])")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's answer length + 8")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    run.add_argument("--no-plots", action="store_true", help="write summary.md only")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="rewrite DIR/summary.md and the plots from DIR/results.jsonl")
    rep.add_argument("--out", required=True)
    rep.add_argument("--no-plots", action="store_true")
    sub.add_parser("list", help="tasks and methods (with what each method still lacks in the store)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("kvstore.client", "benchmarks.probe_tokenizer", "faiss", "faiss.loader", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from benchmarks.methods import MethodUnavailable, available_methods
    from benchmarks.tasks import TASKS

    if args.command == "list":
        print("tasks:", ", ".join(TASKS))
        for name, why in available_methods().items():
            print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
        return 0
    from benchmarks.report import write_report

    if args.command == "report":
        print(write_report(args.out, plots=not args.no_plots))
        return 0

    from benchmarks.runner import RunSpec, load_model, run_suite

    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"kvstore-bench: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    try:
        spec = RunSpec(
            tasks=tasks, lengths=args.lengths, methods=args.methods, out=args.out, budgets=args.budgets,
            samples=args.samples, batch_size=args.batch_size, seed=args.seed, depths=args.depths,
            max_new_tokens=args.max_new_tokens, progress=not args.quiet,
        )
        from benchmarks.methods import expand_methods

        expand_methods(spec.methods, spec.budgets)  # fail before loading the model
        model, tokenizer, label = load_model(args.model, args.device, args.dtype)
        run_suite(model, tokenizer, spec, label)
    except (ValueError, FileNotFoundError, MethodUnavailable) as exc:
        print(f"kvstore-bench: {exc}", file=sys.stderr)
        return 2
    print(write_report(args.out, plots=not args.no_plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
