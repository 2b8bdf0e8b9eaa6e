"""kvstore-bench quick, --methods available, the --max-minutes guard, OOM back-off, batching, report."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import benchmarks.probe.model as probe_model
import benchmarks.suite.runner as runner
from benchmarks import cli
from benchmarks.suite.methods import (BUDGETED, METHODS, QUICK_METHODS, MethodUnavailable, available_methods,
                                      expand_methods)
from benchmarks.suite.report import summary_markdown, write_report
from benchmarks.suite.runner import RunSpec, random_model, read_rows, run_method, run_suite
from benchmarks.suite.tasks import make_sample

LENGTH = 300


@pytest.fixture(scope="module")
def tiny():
    return random_model(seed=0)


def test_quick_falls_back_to_random_with_a_warning_and_prints_the_table(monkeypatch, tmp_path, capsys, caplog):
    monkeypatch.setattr(probe_model, "PROBE_DIR", tmp_path / "no-probe")
    out = tmp_path / "quick"
    with caplog.at_level(logging.WARNING):
        code = cli.main(["quick", "--tasks", "passkey", "--lengths", str(LENGTH), "--samples", "1", "--out", str(out),
                         "--quiet", "--no-plots"])
    assert code == 0
    assert "accuracy is meaningless" in caplog.text
    printed = capsys.readouterr()
    expected = [m for m in QUICK_METHODS if available_methods()[m] is None]
    assert "full" in expected and len(expected) >= 4  # full, quant, leankv, pqcache at least
    rows = read_rows(out / "results.jsonl")
    assert {r["model"] for r in rows} == {"random"}
    assert [r["method"] for r in rows] == expected  # every available quick method, in order
    defaults = cli.build_parser().parse_args(["quick"])
    assert defaults.tasks == list(cli.QUICK_TASKS) and defaults.lengths == list(cli.QUICK_LENGTHS)
    assert defaults.model is None and defaults.methods is None and defaults.samples == cli.QUICK_SAMPLES
    assert "| passkey | 300 |" in printed.out and "## Per method" in printed.out
    header = next(line for line in printed.out.splitlines() if line.startswith("| task | length |"))
    for name in expected:
        assert name in header
    assert f"{len(rows)} rows" in printed.err
    # an explicit --model probe without the files is an error that says how to get them
    assert cli.main(["quick", "--model", "probe", "--out", str(tmp_path / "q2"), "--quiet"]) == 2
    assert "benchmarks.probe.train" in capsys.readouterr().err


def test_methods_available_expands_and_skips_what_the_store_lacks(monkeypatch, caplog):
    every = expand_methods(["available"], ["0.2", "0.05"])
    names = [m.name for m in every]
    assert names == [n for n in METHODS for _ in range(2 if n in BUDGETED else 1) if available_methods()[n] is None]
    assert {m.budget for m in every if m.name == "pqcache"} == {"c=0.2", "c=0.05"}
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_methods(["full", "nope"])
    with pytest.raises(ValueError, match="budget"):
        expand_methods(["full"], ["0.2", "x"])
    import kvstore.cold.selectors

    monkeypatch.setattr(kvstore.cold.selectors, "SELECTORS", {})  # a store without any selector
    with caplog.at_level(logging.WARNING):
        kept = expand_methods(["available"])
    assert [m.name for m in kept] == ["full", "quant", "leankv"] and "pqcache skipped" in caplog.text
    with pytest.raises(MethodUnavailable):
        expand_methods(["full", "pqcache"])  # named explicitly: an error
    assert [m.name for m in expand_methods(["full", "pqcache"], skip_unavailable=True)] == ["full"]


def test_max_minutes_stops_cleanly_and_the_same_run_resumes(tiny, tmp_path):
    model, tok = tiny
    spec = dict(tasks=["passkey", "niah_single_1"], lengths=[LENGTH], methods=["full", "quant"], out=str(tmp_path),
                samples=1, progress=False, max_new_tokens=2)
    stopped = run_suite(model, tok, RunSpec(**spec, max_minutes=1e-9), "random")
    assert stopped.stopped and "max_minutes" in stopped.stopped and not stopped.finished
    assert stopped.completed == 0 and read_rows(tmp_path / "results.jsonl") == []
    done = run_suite(model, tok, RunSpec(**spec, max_minutes=60), "random")
    assert done.finished and done.completed == 4 and len(done.rows) == 4
    again = run_suite(model, tok, RunSpec(**spec), "random")
    assert again.planned == 0 and again.completed == 0 and len(again.rows) == 4
    # between batches: a deadline already past abandons the row before its first batch
    samples = [make_sample("passkey", LENGTH, s, tok, 0.5) for s in range(2)]
    with pytest.raises(runner.DeadlineReached):
        run_method(model, tok, samples, expand_methods(["full"])[0], batch_size=1, deadline=0.0)


def test_lengths_run_shortest_first_and_an_oom_halves_the_batch(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    real = runner.run_method
    calls = []

    def flaky(model, tokenizer, samples, method, batch_size, *args, **kwargs):
        calls.append((samples[0].length, method.name, batch_size))
        if batch_size > 1 and samples[0].length == 2 * LENGTH:
            raise torch.OutOfMemoryError("test: out of memory")
        return real(model, tokenizer, samples, method, batch_size, *args, **kwargs)

    monkeypatch.setattr(runner, "run_method", flaky)
    res = run_suite(model, tok, RunSpec(tasks=["passkey"], lengths=[2 * LENGTH, LENGTH], methods=["full", "quant"],
                                        out=str(tmp_path), samples=2, progress=False, max_new_tokens=2), "random")
    assert res.finished and res.completed == 4
    assert calls == [(LENGTH, "full", 2), (LENGTH, "quant", 2), (2 * LENGTH, "full", 2), (2 * LENGTH, "full", 1),
                     (2 * LENGTH, "quant", 1)]
    assert [(r["length"], r["batch_size"]) for r in res.rows] == [(LENGTH, 2), (LENGTH, 2), (2 * LENGTH, 1), (2 * LENGTH, 1)]


def test_default_batches_are_balanced_and_larger_on_cuda():
    spec = RunSpec(tasks=["passkey"], lengths=[4096], methods=["full"], out="x", samples=20)
    assert spec.batch_for(4096) == 4 and spec.batch_for(16384) == 1  # CPU: ~16K tokens per batch
    assert spec.batch_for(4096, "cuda") == 20 and spec.batch_for(8192, "cuda") == 10 and spec.batch_for(16384, "cuda") == 7
    assert RunSpec(tasks=["passkey"], lengths=[1], methods=["full"], out="x", samples=20, batch_size=3).batch_for(16384, "cuda") == 3
    with pytest.raises(ValueError, match="max_minutes"):
        RunSpec(tasks=["passkey"], lengths=[1], methods=["full"], out="x", max_minutes=0)


def test_report_speed_by_length_and_duplicate_samples(tmp_path):
    base = dict(task="passkey", method="pqcache", budget="c=0.2", accuracy=1.0, samples=1, gpu_kv_bytes=100.0,
                dense_kv_bytes=400.0, host_kv_bytes=500.0, ttft_s=0.5, tt2t_s=0.6, tpot_s=0.01, tokens_per_s=50.0,
                category="retrieval", budget_definition="d", batch_size=4, model="m", device="cuda:0",
                device_name="NVIDIA H100 80GB HBM3", dtype="bfloat16")
    rows = [dict(base, length=4096), dict(base, length=8192, ttft_s=1.5, batch_size=2)]
    text = summary_markdown(rows)
    assert "cuda:0 (NVIDIA H100 80GB HBM3)" in text and "(bfloat16)" in text
    assert "| pqcache@c=0.2 | 4096 | 4 | 4.00x | 0.500 |" in text
    assert "| pqcache@c=0.2 | 8192 | 2 | 4.00x | 1.500 |" in text
    assert "Speed by length" not in summary_markdown(rows[:1])
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample = dict(task="passkey", length=4096, method="pqcache", budget="c=0.2", seed=0, depth=0.5, score=0.0)
    lines = [sample, dict(sample, score=1.0), dict(sample, length=8192, score=1.0)]  # the first one written twice
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    from benchmarks.suite.report import _read_samples

    got = _read_samples(tmp_path / "samples.jsonl")
    assert len(got) == 2 and all(s["score"] == 1.0 for s in got)
    write_report(tmp_path, plots=True)
    assert (tmp_path / "accuracy_by_depth.png").stat().st_size > 1000


def test_a_failing_method_is_left_out_and_the_run_goes_on(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    real = runner.run_method

    def broken_quant(model, tokenizer, samples, method, *args, **kwargs):
        if method.name == "quant":
            raise RuntimeError("test: kernel failure")
        return real(model, tokenizer, samples, method, *args, **kwargs)

    monkeypatch.setattr(runner, "run_method", broken_quant)
    spec = dict(tasks=["passkey", "niah_single_1"], lengths=[LENGTH], methods=["quant", "full"], out=str(tmp_path),
                samples=1, progress=False, max_new_tokens=2)
    res = run_suite(model, tok, RunSpec(**spec, keep_going=True), "random")
    assert [(r["task"], r["method"]) for r in res.rows] == [("passkey", "full"), ("niah_single_1", "full")]
    assert list(res.failed) == ["quant all"] and "test: kernel failure" in res.failed["quant all"]
    with pytest.raises(RuntimeError, match="kernel failure"):
        run_suite(model, tok, RunSpec(**spec), "random")  # keep_going=False (the library default)
    monkeypatch.setattr(probe_model, "PROBE_DIR", tmp_path / "no-probe")
    code = cli.main(["quick", "--tasks", "passkey", "--lengths", str(LENGTH), "--samples", "1", "--methods", "quant,full",
                     "--out", str(tmp_path / "cli"), "--quiet", "--no-plots"])
    assert code == 1 and "FAILED quant all" in capsys.readouterr().err
    assert [r["method"] for r in read_rows(tmp_path / "cli" / "results.jsonl")] == ["full"]


def test_method_options_override_config_fields_and_label_the_column():
    from benchmarks.suite.methods import parse_method

    assert parse_method("leankv@alpha_p=0.002:alpha_q=0.5") == ("leankv", {"alpha_prune": 0.002, "alpha_quant": 0.5})
    assert parse_method("pqcache") == ("pqcache", {})
    methods = expand_methods(["leankv", "leankv@alpha_p=0.002", "tiered@alpha_p=0.002", "pqcache@window_share=0.25"],
                             ["0.2", "0.05"])
    by_key = {m.key: m for m in methods}
    assert set(by_key) == {("leankv", "alpha_p=0.02"), ("leankv", "alpha_p=0.002"), ("tiered", "c=0.2:alpha_p=0.002"),
                           ("tiered", "c=0.05:alpha_p=0.002"), ("pqcache", "c=0.2:window_share=0.25"),
                           ("pqcache", "c=0.05:window_share=0.25")}
    assert by_key[("leankv", "alpha_p=0.002")].config.alpha_prune == 0.002
    assert "prune below 0.002/n" in by_key[("leankv", "alpha_p=0.002")].budget_definition
    tiered = by_key[("tiered", "c=0.05:alpha_p=0.002")].config
    assert (tiered.alpha_prune, tiered.budget_fraction, tiered.hot_policy) == (0.002, 0.05, "leankv")
    assert "int((n-S)*0.2*0.25)" in by_key[("pqcache", "c=0.2:window_share=0.25")].budget_definition
    for bad, match in [("leankv@foo=1", "KVStoreConfig field"), ("leankv@alpha_p", "field=value"),
                       ("leankv@alpha_p=x", "not a float"), ("leankv@alpha_p=-1", "alpha_prune"),
                       ("nope@alpha_p=1", "unknown method"), ("pqcache@budget_fraction=0.1", "--budgets")]:
        with pytest.raises(ValueError, match=match):
            expand_methods([bad])


def test_decode_ops_counts_the_kernels_of_a_layers_decode():
    """benchmarks/perf/decode_ops.py: the count a CUDA-graph step pays per layer (no GPU needed).
    A budget, not a timing: quant's step is its write and its attention kernels, and no preset's
    decode reads a device value on the host."""
    from benchmarks.perf.decode_ops import count

    rows = {p: count(p, steps=2, lens=(64, 40)) for p in ("quant", "leankv")}
    assert rows["quant"]["triton_launches_per_layer"] >= 2 and rows["quant"]["kernels_per_layer"] <= 6
    assert rows["leankv"]["kernels_per_layer"] <= 8
    assert all(r["host_reads_per_layer"] == 0 for r in rows.values())
    # the plan's host syncs, batched (`kvstore.plan.host_ints`): quant 4 and leankv 13 a step before
    assert rows["quant"]["plan_syncs_per_step"] <= 1 and rows["leankv"]["plan_syncs_per_step"] <= 3


def test_decode_ops_counts_the_retrieval_path_with_its_kernels():
    """pqcache and tiered select, fetch, merge and admit within decode_ops' short prompt (tiered: LeanKV
    prunes, so it has candidates), through the fused fetch, the retrieved-attention and the GPU cache's lookup
    and admission kernels and the new token's PQ coding: 155 kernels a layer for tiered and 149 for pqcache before
    those kernels, 33.5 and 30.5 with them (decode_ops' prompt)."""
    from benchmarks.perf.decode_ops import count

    for preset in ("pqcache", "tiered"):
        row = count(preset, steps=2, lens=(96, 64))
        assert row["selected_per_head"] > 0, preset
        launched = row["triton_kernels"]
        assert {"_fetch_kernel", "_retrieved_split_kernel", "_merge_hot_kernel", "_lookup_kernel",
                "_admit_kernel", "_encode_kernel"} <= set(launched)
        assert row["kernels_per_layer"] <= 40 and row["host_reads_per_layer"] == 0, preset
        # 5 and 18 before the batched reads; the three `.cpu()` reads of the host tier's step writes are counted
        # since 2026-12-05 (they were there before, uncounted: a CPU run has no device copy to see)
        assert row["plan_syncs_per_step"] <= {"pqcache": 5, "tiered": 7}[preset], preset


def test_profile_step_writes_the_profile_of_each_method(tmp_path, capsys):
    """benchmarks/perf/profile_step.py end to end on the CPU (a GPU profiles CUDA kernels instead)."""
    from benchmarks.perf import profile_step

    assert profile_step.main(["--model", "tiny", "--length", "128", "--batch", "2", "--methods", "quant",
                              "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert [r["method"] for r in rows] == ["quant"] and rows[0]["kernels_per_step"] > 0
    assert rows[0]["top_kernels"] and "quant" in (tmp_path / "summary.md").read_text()
    phases = rows[0]["host_phases_ms_per_step"]  # the engine's profiler ranges
    # the step's phases (graph_replay: CUDA only) and the plan's parts (quant: no cold path)
    assert set(phases) == {"plan", "plan.policy", "plan.apply", "plan.workspace", "sample"}
    assert all(v > 0 for v in phases.values()) and phases["plan"] >= phases["plan.apply"]
    plain = rows[0]["unprofiled_ms_per_step"]  # the same steps timed without the profiler
    parts = {"plan.policy", "plan.apply", "plan.workspace"}  # the plan's parts, timed as the phases are
    assert set(plain) == {"wall", "plan", "launch", "wait", "other", *parts} and plain["wall"] > 0
    assert plain["plan"] >= sum(plain[k] for k in parts) > 0
    assert plain["launch"] == 0  # no graph on a CPU
    assert "without the profiler" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit):
        profile_step.main(["--methods", "hf", "--out", str(tmp_path)])
    assert "hf has no engine" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --budget as throughput takes it, checked before any model is built
        profile_step.main(["--methods", "tiered", "--budget", "-1", "--out", str(tmp_path)])
    assert "budget" in capsys.readouterr().err


def test_hot_attend_times_each_presets_hot_tier_and_reports_its_pages(tmp_path, capsys):
    """benchmarks/perf/hot_attend.py end to end on the CPU (the reference path: a smoke test)."""
    from benchmarks.perf import hot_attend

    out = tmp_path / "hot.json"
    assert hot_attend.main(["--length", "256", "--batch", "1", "--reps", "1", "--presets", "quant,tiered",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["preset"], r["variant"]) for r in rows] == [
        ("quant", "as the step runs it"), ("tiered", "as the step runs it"), ("tiered", "without the policy's logits")]
    assert all(r["ms"] > 0 and r["hot_bytes"] > 0 and r["high_pages_max"] >= 1 for r in rows)
    assert rows[0]["low_pages_max"] == 0  # quant has no low tier
    with pytest.raises(SystemExit):
        hot_attend.main(["--presets", "nope", "--out", str(out)])
    assert "unknown preset 'nope'" in capsys.readouterr().err
