"""benchmarks/perf/kernel_resources: the decode kernels compiled for sm_90 on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from benchmarks.perf.kernel_resources import parse_variant  # noqa: E402


def test_parse_variant():
    assert parse_variant("default") == {}
    assert parse_variant("num_warps=2:asm_cvt=false") == {"num_warps": 2, "asm_cvt": False}


def test_default_launch_compiles_to_tensor_cores_and_async_copies(tmp_path):
    # the conftest runs kernels in the interpreter; compiling needs the real JIT, so a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.kernel_resources", "--variants", "default",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "FileNotFoundError" in proc.stderr:  # a Triton wheel without the bundled CUDA tools
        pytest.skip(proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert r["block_g"] in (4, 16)  # the GQA group unpadded where the Triton in use pads the dot itself
    assert 0 < r["registers"] <= 255
    assert r["programs_per_sm_by_registers"] == 65536 // (32 * r["registers"])
    mix = r["loop_mix"]
    assert mix.get("HMMA", 0) > 0, mix  # QK and PV on tensor cores
    assert mix.get("LDGSTS", 0) > 0, mix  # pages copied asynchronously (num_stages pipelining)
    assert r["loop_instructions"] == sum(mix.values())


def test_full_kernel_default_launch_compiles_to_tensor_cores_and_async_copies(tmp_path):
    """The kernel over bf16 pages (FULL_LAUNCH): K and V^T tiles copied asynchronously into shared memory
    and read by tensor-core dots."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.kernel_resources", "--pages", "bf16", "--variants",
                           "default", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "FileNotFoundError" in proc.stderr:  # a Triton wheel without the bundled CUDA tools
        pytest.skip(proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())
    assert r["pages"] == "bf16" and 0 < r["registers"] <= 255 and r["stack_bytes"] == 0  # no spills
    mix = r["loop_mix"]
    assert mix.get("HMMA", 0) > 0 and mix.get("LDGSTS", 0) > 0, mix


def test_kernel_variants_compile_for_sm90():
    """What the interpreter runs, the GPU compiler must take too: fp32 and 16-bit queries, one or two
    scale groups, with and without the low tier, emitted logits, the masking high tier (the interpreter
    once passed a constexpr assigned twice in an unrolled loop that sm_90 compilation refused); and the
    kernel over 16-bit and fp32 pages (`compile_full_variants`); and the step's other kernels (retrieved
    attention and its merge, the fused fetch, the cache admission, LeanKV's score update) at their launch
    settings without a spill (`compile_step_kernels`: the admission spilled 6.6 KB a thread at 256 entries a
    loop step)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.kernel_resources", "--check-variants", "ci"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode and "FileNotFoundError" in proc.stderr:  # a Triton wheel without the bundled CUDA tools
        pytest.skip(proc.stderr[-300:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 failed" in proc.stderr
