"""Issue 19: every bad argument exits 2 with one line before any model, dataset or Ray starts.

Covers `kvstore-bench run/quick/report/list/throughput`, `python -m cluster.launch` and the perf
scripts. In-process cases replace the loaders with functions that fail the test when called; the
subprocess cases check the real exit status and that the launcher never imported ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.suite.runner as runner
import benchmarks.perf.throughput as throughput
import kvstore.adapters.model_dir as model_dir
from benchmarks import cli

REPO = Path(__file__).resolve().parent.parent
LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only torch")


def _folder(root: Path, name: str, config: dict | None, *files: str) -> Path:
    path = root / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for f in files:
        (path / f).write_bytes(b"")
    return path


@pytest.fixture
def folders(tmp_path):
    """Model folders a user may pass by mistake, and a file where a folder belongs."""
    (tmp_path / "file.txt").write_text("not a folder")
    return {
        "FILE": tmp_path / "file.txt",
        "GPT2": _folder(tmp_path, "gpt2", {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4},
                        "model.safetensors", "tokenizer.json"),
        "NOTOK": _folder(tmp_path, "llama-no-tokenizer", LLAMA_CONFIG, "model.safetensors"),
        "SPONLY": _folder(tmp_path, "llama-sentencepiece", LLAMA_CONFIG, "model.safetensors", "tokenizer.model"),
        "NOWEIGHTS": _folder(tmp_path, "llama-no-weights", LLAMA_CONFIG, "tokenizer.json"),
        "SLIDING": _folder(tmp_path, "mistral-sliding", {**LLAMA_CONFIG, "model_type": "mistral", "sliding_window": 4096},
                           "model.safetensors", "tokenizer.json"),
        "NOCONFIG": _folder(tmp_path, "empty", None),
        "OTHERRUN": _other_run(tmp_path),
        "EMPTY": _folder(tmp_path, "empty-out", None),
    }


def _other_run(root: Path) -> Path:
    out = root / "other-run"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"task": "passkey", "length": 300, "method": "full",
                                                   "budget": "all", "model": "probe"}) + "\n")
    return out


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a model is loaded or built, a suite (its datasets) runs, or a bandwidth is measured."""

    def forbidden(*args, **kwargs):
        pytest.fail("heavy work started before the arguments were checked")

    for module, name in ((runner, "load_model"), (runner, "run_suite"), (runner, "random_model"),
                         (throughput, "build_model"), (throughput, "measure_bandwidth")):
        monkeypatch.setattr(module, name, forbidden)


def _resolve(argv: list[str], names: dict) -> list[str]:
    """Replace a leading placeholder (FILE, GPT2, OUT ... or FILE/sub) by its path."""
    out = []
    for a in argv:
        head, sep, tail = a.partition("/")
        out.append(f"{names[head]}{sep}{tail}" if head in names else a)
    return out


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:
        return exc.code


RUN = ["run", "--model", "random", "--tasks", "passkey", "--lengths", "300", "--methods", "full", "--samples", "1"]
TP = ["throughput", "--model", "tiny", "--lengths", "256", "--methods", "hf", "--new-tokens", "4"]


@pytest.mark.parametrize("argv, message", [
    (RUN + ["--out", "FILE"], "exists and is not a folder"),  # was FileExistsError
    (["quick", "--out", "FILE/sub"], "is a file, not a folder"),
    (["report", "--out", "OUT/missing"], "no such folder"),  # was FileNotFoundError
    (["report", "--out", "FILE"], "not a folder"),
    (["report", "--out", "EMPTY"], "holds no results.jsonl"),
    pytest.param(RUN + ["--out", "OUT/r", "--device", "cuda"], "sees no CUDA device", marks=NO_CUDA),  # was AssertionError
    pytest.param(["quick", "--out", "OUT/r", "--device", "cuda:0"], "sees no CUDA device", marks=NO_CUDA),
    (RUN + ["--out", "OUT/r", "--device", "tpu"], "not a device name"),
    (RUN + ["--out", "OUT/r", "--dtype", "fp8"], "dtype must be auto or one of"),
    (RUN[:2] + ["NOTOK"] + RUN[3:] + ["--out", "OUT/r"], "has no tokenizer files"),  # was "install sentencepiece"
    (RUN[:2] + ["SPONLY"] + RUN[3:] + ["--out", "OUT/r"], "needs sentencepiece"),
    (RUN[:2] + ["GPT2"] + RUN[3:] + ["--out", "OUT/r"], "model family 'gpt2' (config.json model_type) is not supported"),
    (RUN[:2] + ["SLIDING"] + RUN[3:] + ["--out", "OUT/r"], "sliding-window attention layers"),
    (RUN[:2] + ["NOWEIGHTS"] + RUN[3:] + ["--out", "OUT/r"], "no weight files"),
    (RUN[:2] + ["NOCONFIG"] + RUN[3:] + ["--out", "OUT/r"], "no config.json"),
    (RUN[:2] + ["OUT/nope"] + RUN[3:] + ["--out", "OUT/r"], "not 'probe', 'random' or a local folder"),
    (RUN + ["--out", "OTHERRUN"], "holds results of model ['probe'], not 'random'"),
    (RUN + ["--out", "OUT/r", "--tasks", "nope"], "unknown task(s) nope"),
    (RUN + ["--out", "OUT/r", "--methods", "nope"], "unknown method 'nope'"),
    (RUN + ["--out", "OUT/r", "--samples", "0"], "samples must be >= 1"),
    (RUN + ["--out", "OUT/r", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (RUN + ["--out", "OUT/r", "--depths", "x"], "argument --depths"),
    (RUN + ["--out", "OUT/r", "--lengths", "4q"], "argument --lengths"),
    (["list", "--verbose"], "unrecognized arguments: --verbose"),
    (TP + ["--out", "FILE/sub"], "is a file, not a folder"),
    pytest.param(TP + ["--out", "OUT/t", "--device", "cuda"], "sees no CUDA device", marks=NO_CUDA),
    (TP[:2] + ["GPT2"] + TP[3:] + ["--out", "OUT/t"], "model family 'gpt2'"),
    (TP[:2] + ["NOWEIGHTS"] + TP[3:] + ["--out", "OUT/t"], "no weight files"),
])
def test_kvstore_bench_bad_arguments_exit_2_with_one_line_before_any_work(folders, no_heavy_work, tmp_path, capsys,
                                                                          argv, message):
    out = tmp_path / "out"
    argv = _resolve(argv, {**folders, "OUT": out})
    assert _exit_code(cli.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kvstore-bench {argv[0]}: error: ") or last.startswith("kvstore-bench: error: "), err
    assert message in last, err
    assert [line for line in err.splitlines() if "error:" in line] == [last]  # one message
    assert not out.exists()  # nothing created


def test_a_valid_model_folder_passes_the_checks(tmp_path):
    """What the checks accept: a Llama folder with weights and a tokenizer.json (the probe's)."""
    from tests.conftest import tiny_model

    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    assert model_dir.tokenizer_problem(path) is not None
    (path / "tokenizer.json").write_bytes((REPO / "benchmarks" / "probe" / "weights" / "tokenizer.json").read_bytes())
    assert runner.check_model(str(path)) == str(path)
    assert model_dir.check_model_dir(path).model_type == "llama"
    assert model_dir.check_model_dir(path, tokenizer=False, weights="safetensors").num_hidden_layers == 2
    assert runner.check_model("random") == "random"
    assert str(runner.resolve_device("cpu")) == "cpu"


def test_run_refuses_a_bad_out_as_a_real_command(tmp_path):
    """The reported case end to end: `python -m benchmarks.cli run --out FILE` exits 2, one line on stderr."""
    target = tmp_path / "results.txt"
    target.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", *RUN, "--out", str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"kvstore-bench run: error: --out {target}: exists and is not a folder"]
    assert target.read_text() == "x"


# ---- python -m cluster.launch ------------------------------------------------------------------

LAUNCH_CASES = [
    (["--chaos", "nonsense"], "--chaos 'nonsense': expected one of kill-worker@STEP"),
    (["--requests", "0"], "--requests must be >= 1, got 0"),
    (["--model", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["--chaos", "kill-worker@999"], "step 999 is never reached: with --max-new-tokens 24 a batch runs steps 1..23"),
    (["--chaos", "kill-cold-tier@2", "--max-new-tokens", "2"], "step 2 is never reached"),
    (["--model", "GPT2"], "model family 'gpt2'"),
    (["--model", "NOWEIGHTS"], "no weight files (*.safetensors)"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--store", "token_budget=-1"], "token_budget"),
    (["--prompt-tokens", "9,4"], "expected 1 <= lo <= hi"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-seqs", "0"], "--max-seqs must be >= 1"),
    (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["--dtype", "float33"], "--dtype 'float33'"),
    (["--log-level", "loud"], "--log-level 'loud'"),
    (["--summary-json", "FILE/sub.json"], "is a file, not a folder"),
]


@pytest.mark.parametrize("argv, message", LAUNCH_CASES)
def test_launch_bad_arguments_exit_2_with_one_line_before_ray(folders, monkeypatch, capsys, argv, message):
    from cluster import launch

    monkeypatch.setattr(launch, "_start_ray", lambda args: pytest.fail("Ray started before the arguments were checked"))
    assert _exit_code(launch.main, _resolve(argv, folders)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m cluster.launch: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


@NO_CUDA
def test_launch_gpus_yes_without_a_gpu(monkeypatch, capsys):
    from cluster import launch

    monkeypatch.setattr(launch, "_start_ray", lambda args: pytest.fail("Ray started"))
    assert _exit_code(launch.main, ["--gpus", "yes"]) == 2
    assert "--gpus yes: this machine has 0 GPU(s)" in capsys.readouterr().err


def test_launch_never_imports_ray_for_bad_arguments(folders, tmp_path):
    """In a fresh interpreter: every bad case exits 2 and `ray` is never imported; a real
    `python -m cluster.launch --chaos nonsense` exits 2 with one error line."""
    cases = [_resolve(argv, folders) for argv, _ in LAUNCH_CASES]
    script = (
        "import contextlib, io, json, sys\n"
        "from cluster import launch\n"
        "out = []\n"
        f"for argv in {cases!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = launch.main(argv)\n"
        "        except SystemExit as exc:\n"
        "            code = exc.code\n"
        "    out.append([code, err.getvalue().strip().splitlines()[-1]])\n"
        "print(json.dumps({'results': out, 'ray': 'ray' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ray"] is False
    for (code, line), (_, message) in zip(got["results"], LAUNCH_CASES):
        assert code == 2 and message in line, (line, message)
    proc = subprocess.run([sys.executable, "-m", "cluster.launch", "--chaos", "nonsense"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        "python -m cluster.launch: error: --chaos 'nonsense': expected one of kill-worker@STEP, kill-cold-tier@STEP, "
        "STEP >= 1"]


def test_launch_accepts_the_last_reachable_chaos_step():
    from cluster.chaos import Chaos
    from cluster.launch import parse_args

    args = parse_args(["--chaos", "kill-worker@23", "--max-new-tokens", "24", "--model", "random"])
    assert args.chaos_spec == Chaos("kill-worker", 23) and Chaos.last_step(24) == 23
    assert parse_args(["--model", "meta-llama/Llama-3.1-8B"]).model == "meta-llama/Llama-3.1-8B"  # a Hub repo id


# ---- perf scripts ----------------------------------------------------------------------------------


@NO_CUDA
@pytest.mark.parametrize("module, argv, message", [
    ("perf.decode_attention", ["--out", "OUT.json"], "needs a CUDA GPU"),
    ("perf.retrieval", ["--out", "OUT.json"], "the full sizes need a CUDA GPU"),
    ("perf.retrieval", ["--skip", "scoring,fetch,ttft", "--quick"], "--skip leaves nothing to run"),
    ("perf.retrieval", ["--skip", "nope", "--quick"], "unknown part(s) nope"),
    ("perf.decode_attention", ["--out", "OUT.json", "--variants", "warps4"], "--variants 'warps4'"),
    ("perf.decode_attention", ["--out", "OUT.json", "--lengths", "100"], "multiples of the 32-token page"),
])
def test_perf_scripts_refuse_in_one_line(tmp_path, capsys, module, argv, message):
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    argv = _resolve(argv, {"OUT.json": tmp_path / "OUT.json"})
    assert _exit_code(mod.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m benchmarks.{module}: error: ") and message in err[-1], err
    assert not (tmp_path / "OUT.json").exists()


def test_perf_retrieval_shows_progress(monkeypatch, capsys):
    import benchmarks.perf.retrieval as perf

    def fake_ttft(device, layers, prompt, quick, progress=None):
        for _ in range(3):
            progress.update(1)
        return {"layers": layers, "prompt": prompt, "rows": []}

    monkeypatch.setattr(perf, "bench_ttft", fake_ttft)
    perf.main(["--quick", "--skip", "scoring,fetch"])
    err = capsys.readouterr().err
    assert "perf_retrieval" in err and "3/3" in err
