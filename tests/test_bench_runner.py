"""kvstore-bench end to end on a tiny random Llama saved to disk: JSONL schema, resume, report."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import cli
from benchmarks.suite.methods import METHODS, MethodUnavailable, available_methods, make_method, parse_budget
from benchmarks.suite.runner import RESULT_FIELDS, RunSpec, random_model, read_rows, run_method
from benchmarks.suite.tasks import make_sample

LENGTH = 400


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = random_model(seed=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _run(args):
    return cli.main(["run", "--quiet", "--no-plots"] + args)


def test_cli_writes_schema_resumes_and_reports(tiny, tmp_path):
    path, _, _ = tiny
    out = tmp_path / "bench"
    common = ["--model", str(path), "--tasks", "passkey,cwe", "--lengths", str(LENGTH), "--samples", "2", "--out", str(out)]
    assert _run(common + ["--methods", "full"]) == 0
    rows = read_rows(out / "results.jsonl")
    assert [(r["task"], r["method"], r["budget"]) for r in rows] == [("passkey", "full", "all"), ("cwe", "full", "all")]
    for r in rows:
        assert set(RESULT_FIELDS) <= set(r)
        assert r["length"] == LENGTH and r["samples"] == 2 and 0.0 <= r["accuracy"] <= 1.0
        assert r["dense_kv_bytes"] > 0 and r["gpu_kv_bytes"] >= r["dense_kv_bytes"]  # full: every token + metadata
        assert r["host_kv_bytes"] == 0
        assert r["ttft_s"] > 0 and r["tt2t_s"] >= r["ttft_s"] and r["tokens_per_s"] > 0
        assert r["budget_definition"] and r["model"] == str(path)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["task"] for s in samples} == {"passkey", "cwe"}
    # resume: nothing new for rows already there; a new method adds only its rows
    assert _run(common + ["--methods", "full"]) == 0
    assert len(read_rows(out / "results.jsonl")) == 2
    assert _run(common + ["--methods", "full,quant"]) == 0
    rows = read_rows(out / "results.jsonl")
    assert [(r["task"], r["method"]) for r in rows][2:] == [("passkey", "quant"), ("cwe", "quant")]
    quant = rows[2]
    assert quant["gpu_kv_bytes"] < quant["dense_kv_bytes"] / 2  # K8V4 pages
    summary = (out / "summary.md").read_text()
    assert "| passkey | 400 |" in summary and "quant" in summary and "Budget definitions" in summary
    # plots from the same files
    assert cli.main(["report", "--out", str(out)]) == 0
    for name in ("accuracy_vs_compression.png", "accuracy_by_depth.png", "accuracy_by_length.png"):
        assert (out / name).stat().st_size > 1000


def test_full_preset_predictions_equal_the_unattached_model(tiny, tmp_path):
    path, model, tok = tiny
    samples = [make_sample("niah_single_1", LENGTH, s, tok, depth=0.5) for s in range(2)]
    row, records = run_method(model, tok, samples, make_method("full"), batch_size=2)
    ids = torch.tensor([s.input_ids for s in samples])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=samples[0].max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = [tok.decode(r, skip_special_tokens=True) for r in ref[:, LENGTH:].tolist()]
    assert [r["prediction"] for r in records] == expected
    assert row["samples"] == 2 and row["batch_size"] == 2


@pytest.mark.parametrize("name", ["full", "quant", "pqcache", "tiered", "snapkv"])
def test_the_engine_path_predicts_what_the_generate_path_does(tiny, name):
    _, model, tok = tiny
    samples = [make_sample("niah_single_1", LENGTH, s, tok, depth=d) for s, d in ((0, 0.2), (1, 0.7), (2, 0.5))]
    method = make_method(name, "0.25")
    row_g, rec_g = run_method(model, tok, samples, method, batch_size=2, path="generate")
    row_e, rec_e = run_method(model, tok, samples, method, batch_size=2, path="engine")
    assert [r["prediction"] for r in rec_e] == [r["prediction"] for r in rec_g]
    assert row_e["path"] == "engine" and row_g["path"] == "generate" and row_e["decode_path"] == "eager"
    # the store's bytes of the same sequences (the engine reads them one step before the first ends)
    assert row_e["gpu_kv_bytes"] == pytest.approx(row_g["gpu_kv_bytes"], rel=0.1)
    assert row_e["dense_kv_bytes"] == pytest.approx(row_g["dense_kv_bytes"], rel=0.1)


@pytest.mark.parametrize("name", METHODS)
def test_every_available_method_runs_through_the_runner(tiny, name):
    why = available_methods()[name]
    if why is not None:
        pytest.skip(f"{name}: {why}")
    _, model, tok = tiny
    samples = [make_sample("passkey", LENGTH, s, tok, depth=0.3) for s in range(2)]
    method = make_method(name, "0.25")
    row, records = run_method(model, tok, samples, method, batch_size=2, max_new_tokens=4)
    assert len(records) == 2 and row["method"] == name and row["budget"] == method.budget
    assert row["gpu_kv_bytes"] > 0 and row["dense_kv_bytes"] > 0
    if method.config.cold_tier:
        assert row["host_kv_bytes"] > 0
    if name in ("pqcache", "oracle", "streaming", "h2o", "snapkv", "quest"):
        assert row["budget"] == "c=0.25" and "0.25" in row["budget_definition"]


def test_budgets_parse_and_unavailable_methods_fail_clearly(monkeypatch, tiny, tmp_path, capsys):
    assert parse_budget("0.1") == ("fraction", 0.1)
    assert parse_budget("512") == ("tokens", 512)
    assert parse_budget("1") == ("fraction", 1.0)
    for bad in ("0", "2.5", "x", "-3"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    assert make_method("full").budget == "all"
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope")
    import kvstore.cold.selectors

    monkeypatch.setattr(kvstore.cold.selectors, "SELECTORS", {})  # a store without any selector
    with pytest.raises(MethodUnavailable, match="selector='pq'"):
        make_method("pqcache", "0.2")
    code = _run(["--model", str(tiny[0]), "--tasks", "passkey", "--lengths", "300", "--methods", "pqcache",
                 "--samples", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "selector='pq'" in capsys.readouterr().err
    assert _run(["--model", "no/such/dir", "--tasks", "passkey", "--lengths", "300", "--methods", "full",
                 "--samples", "1", "--out", str(tmp_path / "y")]) == 2
    assert "not 'probe', 'random' or a local folder" in capsys.readouterr().err


def test_runspec_validation():
    with pytest.raises(ValueError, match="samples"):
        RunSpec(tasks=["passkey"], lengths=[100], methods=["full"], out="x", samples=0)
    with pytest.raises(ValueError, match="depths"):
        RunSpec(tasks=["passkey"], lengths=[100], methods=["full"], out="x", depths=[2.0])
    spec = RunSpec(tasks=["passkey"], lengths=[100], methods=["full"], out="x", samples=5)
    assert [spec.depth_of(i) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_the_engine_path_keeps_one_engine_across_a_methods_tasks(tiny, tmp_path, monkeypatch):
    """run_suite's engine path runs a length method by method, one engine serving every task of a method
    (`EngineCache`: its store and captured graphs reused), closed when the method changes; the
    predictions are the generate path's, row for row."""
    import kvstore
    from benchmarks.suite.runner import run_suite

    _, model, tok = tiny
    built = []

    class Counted(kvstore.Engine):
        def __init__(self, *a, **kw):
            built.append(a[1].name)
            super().__init__(*a, **kw)

    monkeypatch.setattr(kvstore, "Engine", Counted)
    spec = dict(tasks=["passkey", "niah_single_1"], lengths=[LENGTH], methods=["full", "quant"], samples=2,
                progress=False, max_new_tokens=3)
    eng = run_suite(model, tok, RunSpec(**spec, out=str(tmp_path / "e"), path="engine"), "random")
    gen = run_suite(model, tok, RunSpec(**spec, out=str(tmp_path / "g"), path="generate"), "random")
    assert eng.completed == gen.completed == 4 and built == ["full", "quant"]
    assert [(r["method"], r["task"]) for r in eng.rows] == [("full", "passkey"), ("full", "niah_single_1"),
                                                           ("quant", "passkey"), ("quant", "niah_single_1")]

    def predictions(out):
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        return {(r["task"], r["method"], r["seed"]): r["prediction"] for r in rows}

    assert predictions(tmp_path / "e") == predictions(tmp_path / "g")
