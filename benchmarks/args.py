"""Argument types and checks the benchmark CLIs share (`kvstore-bench run/quick/report` in cli.py,
`kvstore-bench throughput` in perf/throughput.py): one place, so neither CLI imports the other."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def csv(text: str) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]."""
    return [p.strip() for p in text.split(",") if p.strip()]


def lengths(text: str) -> list[int]:
    """"2048,4k" -> [2048, 4096] (argparse type: a bad entry is a one-line usage error)."""
    out = []
    for p in csv(text):
        mult = 1
        if p[-1] in "kK":
            p, mult = p[:-1], 1024
        try:
            out.append(int(p) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lengths entries must be token counts like 4096 or 4k, got {p!r}") from None
    return out


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as an output folder that exists or can be made: ValueError (one line) when it is a file,
    lies under a file, or its nearest existing folder is not writable. Nothing is created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a folder")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{flag} {out}: {parent} is a file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: {parent} is not writable")
    return out
