"""`kvstore-bench throughput` end to end on the CPU: the tiny random Llama, real stores, real generate()."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import cli
from benchmarks.perf import throughput
from benchmarks.perf.throughput import ROW_FIELDS

LENGTH = 256
NEW = 4
TINY_DENSE_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x fp32


def _run(out, *extra, methods="hf,full,quant", batch="2"):
    argv = ["throughput", "--model", "tiny", "--lengths", str(LENGTH), "--methods", methods, "--batch", batch,
            "--new-tokens", str(NEW), "--out", str(out), "--quiet", *extra]
    return cli.main(argv)


def _rows(out):
    return json.loads((out / "results.json").read_text())


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def batch2(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch2")
    assert _run(out) == 0
    return out, _rows(out)


def test_rows_have_every_field_with_sane_figures(batch2):
    out, rows = batch2
    assert [(r["method"], r["length"]) for r in rows] == [("hf", LENGTH), ("full", LENGTH), ("quant", LENGTH)]
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["error"] is None and r["note"] is None
        assert r["batch"] == 2 and r["limit"] is None  # an explicit --batch: no memory limit applied
        assert r["layers"] == 2 and r["device_name"] == "cpu"
        assert r["path"] == ("generate" if r["method"] == "hf" else "engine")  # the default path
        assert r["decode_path"] == "eager"  # CUDA graphs need a GPU
        assert r["new_tokens"] == r["generated_tokens"] == NEW  # EOS masked: exactly --new-tokens
        for key in ("ttft_s", "tt2t_s", "tpot_s", "decode_tokens_per_s", "step_bytes", "hbm_bytes_per_s",
                    "roofline_tokens_per_s", "roofline_share", "speedup_vs_hf", "gpu_kv_bytes_per_seq"):
            assert _positive(r[key]), (r["method"], key, r[key])
        assert r["tt2t_s"] > r["ttft_s"]
        assert r["peak_gpu_bytes"] is None  # no GPU
        assert r["decode_tokens_per_s"] == pytest.approx(2 / r["tpot_s"])
        assert r["roofline_tokens_per_s"] == pytest.approx(2 * r["hbm_bytes_per_s"] / r["step_bytes"])
        assert r["roofline_share"] == pytest.approx(r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])
        assert r["speedup_vs_hf"] == pytest.approx(r["decode_tokens_per_s"] / by["hf"]["decode_tokens_per_s"])
        # a step reads the weights (less the untied 512 x 64 fp32 embedding table) and the KV
        assert r["step_weight_bytes"] == r["weight_bytes"] - 512 * 64 * 4
        assert r["step_bytes"] == r["step_weight_bytes"] + r["step_kv_bytes"]
    assert by["hf"]["speedup_vs_hf"] == 1.0
    assert by["hf"]["host_bytes_per_seq"] == 0 and by["hf"]["prefill_chunk_tokens"] is None
    # hf's KV: the dense cache of prompt + new tokens; full and hf read the same dense KV per step
    assert by["hf"]["gpu_kv_bytes_per_seq"] == TINY_DENSE_BYTES_PER_TOKEN * (LENGTH + NEW)
    assert by["full"]["step_kv_bytes"] == by["hf"]["step_kv_bytes"] == TINY_DENSE_BYTES_PER_TOKEN * 2 * (LENGTH + NEW / 2)
    # the store's own figures: full holds every token at fp32 (plus slot metadata), quant K8V4
    assert by["full"]["gpu_kv_bytes_per_seq"] >= by["hf"]["gpu_kv_bytes_per_seq"]
    assert by["quant"]["gpu_kv_bytes_per_seq"] < by["full"]["gpu_kv_bytes_per_seq"] / 2
    assert by["quant"]["step_kv_bytes"] == pytest.approx(2 * by["quant"]["gpu_kv_bytes_per_seq"])
    summary = (out / "summary.md").read_text()
    assert "| hf | 256 | 2 |" in summary and "| quant | 256 | 2 |" in summary
    assert "kvstore-bench throughput --model tiny --lengths 256 --methods hf,full,quant" in summary
    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_batch_max_is_host_limited_on_cpu_and_resume_skips_done_rows(tmp_path):
    out = tmp_path / "max"
    # --max-minutes already spent before the first row: a clean stop, nothing run, exit 0
    assert _run(out, "--max-batch", "3", "--max-minutes", "0.00001", methods="hf,quant", batch="max") == 0
    assert _rows(out) == []
    assert _run(out, "--max-batch", "3", "--resume", methods="hf,quant", batch="max") == 0
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["hf", "quant"]
    for r in rows:
        assert r["error"] is None
        assert r["limit"] == "host" and r["batch"] == 3  # host memory fits far more than 3 tiny sequences
        assert r["fit_batch"] > 3 and "--max-batch 3 capped the batch" in r["note"]
        assert _positive(r["probe_host_bytes_per_seq"]) and _positive(r["decode_tokens_per_s"])
    assert rows[0]["probe_host_bytes_per_seq"] >= TINY_DENSE_BYTES_PER_TOKEN * LENGTH
    # without --resume an existing table is refused; with another --new-tokens too
    with pytest.raises(SystemExit) as exc:
        _run(out, "--max-batch", "3", methods="hf,quant", batch="max")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["throughput", "--model", "tiny", "--lengths", str(LENGTH), "--methods", "hf", "--new-tokens", "8",
                  "--out", str(out), "--resume", "--quiet"])
    assert exc.value.code == 2
    # --resume runs only the missing row and keeps the others as they were
    assert _run(out, "--resume", methods="hf,quant,full", batch="1") == 0
    again = _rows(out)
    assert [r["method"] for r in again] == ["hf", "quant", "full"]
    assert again[:2] == rows
    assert again[2]["batch"] == 1 and again[2]["limit"] is None and again[2]["error"] is None
    summary = (out / "summary.md").read_text()  # the command of each invocation that made rows
    assert "--methods hf,quant --batch max" in summary and "--methods hf,quant,full --batch 1" in summary


def test_out_of_memory_backs_off_and_a_failing_method_gets_an_error_row(batch2, tmp_path):
    _, rows = batch2
    # a hot tier capped at 1.5 sequences' pages: B=3 and B=2 run out of pages, B=1 fits
    cap = int(1.5 * next(r for r in rows if r["method"] == "full")["gpu_kv_bytes_per_seq"])
    out = tmp_path / "oom"
    code = _run(out, "--max-batch", "3", methods=f"full@hot_tier_bytes={cap},full@hot_tier_bytes=1000", batch="max")
    assert code == 1  # a row failed
    ok, failed = _rows(out)
    assert ok["method"] == f"full@hot_tier_bytes={cap}" and ok["error"] is None
    assert ok["batch"] == 1 and "OOM at B=3, B=2, ran B=1" in ok["note"]
    assert _positive(ok["decode_tokens_per_s"])
    # a cap below one token of one sequence is refused when the store is built, with the minimum
    assert failed["error"].startswith("ValueError: KVStoreConfig.hot_tier_bytes=1000 is below this model's minimum of ")
    assert "\n" not in failed["error"]
    assert failed["decode_tokens_per_s"] is None and failed["step_bytes"] is None


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--lengths", "x"], "argument --lengths"),
    (["--batch", "0"], "argument --batch: must be 'max' or a positive integer"),
    (["--lengths", "32"], "32 tokens is too short"),
    (["--new-tokens", "2"], "--new-tokens must be >= 3"),
    (["--methods", "full@no_such_field=1"], "KVStoreConfig field"),
    (["--model", "FOLDER"], "max_position_embeddings=128 < the longest length"),
    (["--budget", "1.5"], "budget '1.5' must be a fraction in (0, 1]"),
])
def test_bad_flags_exit_2_with_one_line_before_loading_a_model(tmp_path, capsys, extra, message):
    folder = tmp_path / "short-model"  # a config alone: loading weights from it would fail differently
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }))
    extra = [str(folder) if e == "FOLDER" else e for e in extra]
    out = tmp_path / "out"
    argv = ["throughput", "--model", "tiny", "--lengths", str(LENGTH), "--methods", "hf", "--new-tokens", "4",
            "--out", str(out), *extra]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kvstore-bench throughput: error: ") and message in err[-1]
    assert not out.exists()  # nothing ran


def test_path_generate_keeps_the_compatible_path_with_the_same_kv_figures(batch2, tmp_path):
    out = tmp_path / "generate"
    assert _run(out, "--path", "generate", methods="quant") == 0
    (row,) = _rows(out)
    engine_row = {r["method"]: r for r in batch2[1]}["quant"]
    assert row["path"] == "generate" and row["error"] is None and row["generated_tokens"] == NEW
    assert _positive(row["tpot_s"]) and row["tt2t_s"] > row["ttft_s"]
    # the same sequences in the same store: per-sequence KV bytes within one decode step's tokens
    assert row["gpu_kv_bytes_per_seq"] == pytest.approx(engine_row["gpu_kv_bytes_per_seq"], rel=0.05)
    assert "kvstore presets through `model.generate()` with `attach`" in (out / "summary.md").read_text()


def test_budget_sets_the_selecting_methods_budget_and_their_label():
    quant, tiered = throughput.parse_methods(["quant", "tiered"], "0.05")
    assert (quant.label, tiered.label) == ("quant", "tiered[0.05]")
    assert tiered.config.budget_fraction == 0.05 and tiered.config.token_budget is None
    (default,) = throughput.parse_methods(["tiered"])
    assert default.label == "tiered" and default.config.budget_fraction == 0.2


def test_path_engine_plain_decodes_through_the_engine_without_the_overlap(tmp_path):
    """--path engine-plain: the engine's loop without launching a step ahead (`Engine(overlap=False)`), the
    baseline the overlap is measured against in the same run; its rows say so."""
    out = tmp_path / "plain"
    assert _run(out, "--path", "engine-plain", methods="quant", batch="1") == 0
    (row,) = _rows(out)
    assert row["path"] == "engine-plain" and row["error"] is None and _positive(row["tpot_s"])
    assert "`kvstore.Engine(overlap=False)`" in (out / "summary.md").read_text()
