"""summary.md and PNG plots from DIR/results.jsonl (and DIR/samples.jsonl for needle depths).

    write_report("DIR")  ->  DIR/summary.md, DIR/accuracy_vs_compression.png,
                             DIR/accuracy_by_depth.png, DIR/accuracy_by_length.png

summary.md holds: the accuracy table (task x length rows, one column per method@budget), the
per-method table (mean accuracy on retrieval tasks and, separately, on aggregation tasks, where
top-k attention is known to break; GPU KV bytes and compression against the dense cache; host
bytes; TTFT, TT2T, TPOT, tokens/s), with several lengths the same speed columns per length
(timings mix lengths otherwise), and each method's budget definition.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from benchmarks.suite.methods import METHODS
from benchmarks.suite.runner import read_rows

logger = logging.getLogger(__name__)


def _label(row: dict) -> str:
    return row["method"] if row["budget"] in ("all",) or row["method"] in ("full", "quant") else f"{row['method']}@{row['budget']}"


def _order(label: str) -> tuple:
    name = label.split("@")[0]
    return (METHODS.index(name) if name in METHODS else len(METHODS), label)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _bytes(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(x)


def summary_markdown(rows: list[dict]) -> str:
    """The summary tables as markdown (see the module docstring)."""
    if not rows:
        return "# kvstore-bench summary\n\nNo results yet.\n"
    labels = sorted({_label(r) for r in rows}, key=_order)
    by_cell = {(r["task"], r["length"], _label(r)): r for r in rows}
    keys = sorted({(r["task"], r["length"]) for r in rows}, key=lambda k: (k[1], k[0]))
    models = sorted({str(r.get("model", "?")) for r in rows})
    devices = sorted({f"{r.get('device', '?')} ({r['device_name']})" if r.get("device_name") not in (None, "cpu")
                      else str(r.get("device", "?")) for r in rows})
    dtypes = sorted({str(r.get("dtype", "?")) for r in rows})
    lines = [
        "# kvstore-bench summary",
        "",
        f"Model: {', '.join(models)} ({', '.join(dtypes)}). Device: {', '.join(devices)}. "
        "Accuracy: RULER string match (fraction of expected answers in the greedy output), mean over samples.",
        "",
        "## Accuracy",
        "",
        "| task | length | " + " | ".join(labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    for task, length in keys:
        cells = [_fmt(by_cell[(task, length, lab)]["accuracy"], 2) if (task, length, lab) in by_cell else "" for lab in labels]
        lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per method",
        "",
        "Means over the rows of each method. Bytes are per sequence at the end of generation;",
        "compression = dense KV bytes / GPU KV bytes (page metadata and fragmentation included).",
        "TTFT and TT2T are per batch (time from the request to its first and second token).",
        "",
        "| method | retrieval acc | aggregation acc | all acc | GPU KV | host KV | dense KV | compression | TTFT s | TT2T s | TPOT ms | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = defaultdict(list)
    for r in rows:
        groups[_label(r)].append(r)
    for lab in labels:
        rs = groups[lab]
        retr = [r["accuracy"] for r in rs if r.get("category") != "aggregation"]
        agg = [r["accuracy"] for r in rs if r.get("category") == "aggregation"]
        gpu, dense = _mean(r["gpu_kv_bytes"] for r in rs), _mean(r["dense_kv_bytes"] for r in rs)
        lines.append(
            f"| {lab} | {_fmt(_mean(retr), 2)} | {_fmt(_mean(agg), 2)} | {_fmt(_mean(r['accuracy'] for r in rs), 2)} | "
            f"{_bytes(gpu)} | {_bytes(_mean(r['host_kv_bytes'] for r in rs))} | {_bytes(dense)} | "
            f"{_fmt(dense / gpu if gpu else float('nan'), 2)}x | {_fmt(_mean(r['ttft_s'] for r in rs))} | "
            f"{_fmt(_mean(r['tt2t_s'] for r in rs))} | {_fmt(1000 * _mean(r['tpot_s'] for r in rs), 1)} | "
            f"{_fmt(_mean(r['tokens_per_s'] for r in rs), 1)} |"
        )
    lengths = sorted({r["length"] for r in rows})
    if len(lengths) > 1:
        lines += [
            "",
            "## Speed by length",
            "",
            "Means over the tasks at each length; batch = sequences per generate() call.",
            "",
            "| method | length | batch | compression | TTFT s | TT2T s | TPOT ms | tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lab in labels:
            for length in lengths:
                rs = [r for r in groups[lab] if r["length"] == length]
                if not rs:
                    continue
                gpu, dense = _mean(r["gpu_kv_bytes"] for r in rs), _mean(r["dense_kv_bytes"] for r in rs)
                batch = sorted({r.get("batch_size") for r in rs if r.get("batch_size") is not None})
                lines.append(
                    f"| {lab} | {length} | {'/'.join(map(str, batch)) or '-'} | "
                    f"{_fmt(dense / gpu if gpu else float('nan'), 2)}x | {_fmt(_mean(r['ttft_s'] for r in rs))} | "
                    f"{_fmt(_mean(r['tt2t_s'] for r in rs))} | {_fmt(1000 * _mean(r['tpot_s'] for r in rs), 1)} | "
                    f"{_fmt(_mean(r['tokens_per_s'] for r in rs), 1)} |"
                )
    lines += ["", "## Budget definitions", ""]
    for lab in labels:
        lines.append(f"- **{lab}**: {groups[lab][0].get('budget_definition', '?')}")
    return "\n".join(lines) + "\n"


def _read_samples(path: Path) -> list[dict]:
    """The per-sample records; a sample written twice (a run killed between the two files and
    resumed) counts once, the last record winning."""
    if not path.exists():
        return []
    out = {}
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(s.get("task"), s.get("length"), s.get("method"), str(s.get("budget")), s.get("seed"))] = s
    return list(out.values())



def _save(fig, path: Path) -> Path:
    """Lay out, write (120 dpi) and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def plot(rows: list[dict], samples: list[dict], out: Path) -> list[Path]:
    """Write the three PNG plots into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = sorted({_label(r) for r in rows}, key=_order)

    # 1. accuracy against GPU-KV compression, one series per method (its budgets)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_method = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_method[r["method"]][str(r["budget"])].append(r)
    for method in sorted(by_method, key=lambda m: _order(m)):
        pts = []
        for budget, rs in by_method[method].items():
            gpu, dense = _mean(r["gpu_kv_bytes"] for r in rs), _mean(r["dense_kv_bytes"] for r in rs)
            pts.append((dense / gpu if gpu else float("nan"), _mean(r["accuracy"] for r in rs), budget))
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for x, y, b in pts:
            if b != "all":
                ax.annotate(b, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("GPU KV compression (dense bytes / GPU bytes, log)")
    ax.set_ylabel("accuracy (mean over tasks and lengths)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs GPU-KV compression")
    paths.append(_save(fig, out / "accuracy_vs_compression.png"))

    # 2. accuracy by needle depth (5 bins), one subplot per length
    with_depth = [s for s in samples if s.get("depth") is not None]
    lengths = sorted({s["length"] for s in with_depth}) or sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(4.2 * max(1, len(lengths)), 3.8), squeeze=False)
    bins = 5
    for ax, length in zip(axes[0], lengths):
        per = defaultdict(lambda: [[] for _ in range(bins)])
        for s in with_depth:
            if s["length"] == length:
                b = min(bins - 1, int(s["depth"] * bins))
                per[_label(s)][b].append(s["score"])
        for lab in sorted(per, key=_order):
            xs = [(i + 0.5) / bins for i in range(bins) if per[lab][i]]
            ys = [_mean(per[lab][i]) for i in range(bins) if per[lab][i]]
            ax.plot(xs, ys, marker="o", label=lab)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("needle depth")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (needle tasks)")
    axes[0][-1].legend(fontsize=7)
    paths.append(_save(fig, out / "accuracy_by_depth.png"))

    # 3. accuracy by length, one series per method@budget
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for lab in labels:
        per_len = defaultdict(list)
        for r in rows:
            if _label(r) == lab:
                per_len[r["length"]].append(r["accuracy"])
        xs = sorted(per_len)
        ax.plot(xs, [_mean(per_len[x]) for x in xs], marker="o", label=lab)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy by length")
    paths.append(_save(fig, out / "accuracy_by_length.png"))
    return paths


def write_report(out_dir: str | Path, plots: bool = True) -> str:
    """Write DIR/summary.md (and the plots); returns the markdown."""
    out = Path(out_dir)
    rows = read_rows(out / "results.jsonl")
    text = summary_markdown(rows)
    (out / "summary.md").write_text(text)
    if plots and rows:
        plot(rows, _read_samples(out / "samples.jsonl"), out)
    return text
