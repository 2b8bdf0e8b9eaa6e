"""The probe model: tokenizer, shipped weights, retrieval at 2K tokens on CPU, training smoke test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.probe.model import PROBE_DIR, load_probe, probe_config
from benchmarks.probe.tokenizer import build_tokenizer, default_strings, load_tokenizer

TEXT = (
    "The grass is green. The sky is blue. One of the special magic numbers for tiger is: 7041932. "
    "Key: a3f2c1d0-bb01-4c2e-9f00-123456789abc Value: 00ff31e2-0000-4abc-8def-0123456789ab"
)


@pytest.fixture(scope="module")
def probe():
    return load_probe(PROBE_DIR, dtype=torch.float32, device="cpu")


def test_tokenizer_round_trip_digits_separate(tmp_path):
    tok = build_tokenizer(["The grass is green.", "One of the special magic numbers for tiger is:", "Key: Value:"])
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    pieces = tok.convert_ids_to_tokens(ids)
    # Whole words are single tokens; every digit is its own token.
    assert "grass" in pieces and "special" in pieces
    assert all(len(p.removeprefix("##")) == 1 for p in pieces if any(c.isdigit() for c in p))
    assert tok.convert_tokens_to_ids("##7") != tok.convert_tokens_to_ids("7")
    # A UUID is 16 hex-digit pairs and 4 dashes; outside a complete UUID, hex stays one character
    # per token.
    uuid = "a3f2c1d0-bb01-4c2e-9f00-123456789abc"
    for text, count in ((uuid, 20), (f'"{uuid}":', 23), (f"is: {uuid}.", 23)):  # " 20 " : and is : 20 .
        tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert len(tokens) == count, (text, tokens)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    for not_uuid in (uuid + "0", "x" + uuid, uuid[:-1], uuid.upper(), "-" + uuid, uuid.replace("-", "_", 1)):
        tokens = tok.convert_ids_to_tokens(tok(not_uuid, add_special_tokens=False)["input_ids"])
        assert len(tokens) == len(not_uuid), (not_uuid, tokens)
        assert tok.decode(tok(not_uuid)["input_ids"], skip_special_tokens=True) == not_uuid
    two = f"{uuid} {uuid[::-1].replace('-', '0')} {uuid},{uuid}"
    assert tok.decode(tok(two)["input_ids"], skip_special_tokens=True) == two
    # Whitespace runs collapse to one space: the only normalization.
    assert tok.decode(tok("a  b\n\nc")["input_ids"], skip_special_tokens=True) == "a b c"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again(TEXT)["input_ids"] == ids
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 2, 3)


def test_tokenizer_same_vocabulary_every_build():
    strings = ["zeta alpha beta.", "gamma, delta"]
    assert build_tokenizer(strings).get_vocab() == build_tokenizer(list(reversed(strings))).get_vocab()
    with pytest.raises(ValueError, match="must be str"):
        build_tokenizer(["ok", 3])


def test_shipped_tokenizer_covers_the_generators(probe):
    from benchmarks.suite.tasks import make_sample

    _, tok = probe
    shipped = tok.get_vocab()
    assert build_tokenizer(default_strings()).get_vocab() == shipped, \
        "benchmarks/suite/vocab.py changed: retrain the probe"
    for task in ("niah_single_1", "niah_multikey_2", "passkey", "kv_retrieval"):
        sample = make_sample(task, 512, 3, tok)
        ids = tok(sample.prompt)["input_ids"]
        assert tok.unk_token_id not in ids, task


def test_shipped_model_loads(probe):
    model, tok = probe
    assert model.config.model_type == "llama"
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
    assert model.config.vocab_size >= len(tok)
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    assert (PROBE_DIR / "model.safetensors").stat().st_size <= 8 * 2**20
    assert (PROBE_DIR.parent / "README.md").is_file()  # the model card, beside weights/


# Answers out of 10 at 2K (seeds 1000-1009, fp32 on CPU) the shipped probe gave when it was committed:
# 10 on each task. The floor leaves room for one miss; a model that does not retrieve scores 0.
AT_LEAST_2K = {"passkey": 9, "niah_single_1": 9, "niah_multikey_2": 9, "kv_retrieval": 9}


@pytest.mark.parametrize("task", list(AT_LEAST_2K))
def test_full_attention_answers_at_2k(probe, task):
    """Greedy decoding over the whole context, through kvstore's exact `full` preset."""
    from benchmarks.suite.tasks import make_sample
    from benchmarks.probe.train import answer_text, sample_prompt_ids, score_answer
    from kvstore import KVStoreClient, KVStoreConfig

    model, tok = probe
    hits = 0
    seeds = range(10)
    for seed in seeds:
        sample = make_sample(task, 2048, 1000 + seed, tok)
        ids = torch.tensor([sample_prompt_ids(sample, tok)])
        n_answer = len(tok(" " + answer_text(sample), add_special_tokens=False)["input_ids"])
        client = KVStoreClient(KVStoreConfig.preset("full"))
        with client.attach(model):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_answer + 2, do_sample=False)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hits += score_answer(text, sample)
    assert hits >= AT_LEAST_2K[task], f"{task}: {hits}/{len(seeds)} answered"


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    from benchmarks.probe.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path / "probe"), steps=16, curriculum="256:0", tokens_per_batch=2048, warmup_steps=4,
        lr=3e-3, tasks="passkey,niah_single_1", eval_every=0, eval_samples=2, workers=0, log_every=1, device="cpu", induction_until=0.0,
    )
    info = train(cfg)
    rows = [r for r in map(__import__("json").loads, (tmp_path / "probe" / "train_log.jsonl").read_text().splitlines()) if "answer_loss" in r]
    first, last = rows[0], rows[-1]
    assert info["steps"] == 16
    assert last["answer_loss"] < 0.7 * first["answer_loss"], (first, last)
    assert last["lm_loss"] < first["lm_loss"], (first, last)
    model, tok = load_probe(tmp_path / "probe")
    assert model.dtype == torch.float32 and len(tok) == info["vocab"]
    # A second stage starts from those weights: its first loss is the first stage's last, not a fresh model's.
    again = dataclasses.replace(cfg, out=str(tmp_path / "stage2"), steps=1, init_from=str(tmp_path / "probe"))
    train(again)
    row = __import__("json").loads((tmp_path / "stage2" / "train_log.jsonl").read_text().splitlines()[0])
    assert row["answer_loss"] < 0.7 * first["answer_loss"], (first, row)
    with pytest.raises(ValueError, match="architecture"):
        train(dataclasses.replace(again, out=str(tmp_path / "stage3"), layers=2))


def test_data_echo_reuses_each_batch(tmp_path):
    """data_echo=2, deterministic: 7 steps train on 4 fresh batches (b0, b1 b0, b2 b1, b3 b2)."""
    from benchmarks.probe.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(tmp_path / "echo"), steps=7, curriculum="256:0", tokens_per_batch=1024, warmup_steps=1, data_echo=2,
        echo_when_idle=False, tasks="passkey", eval_every=0, eval_samples=1, workers=0, log_every=1, device="cpu",
        induction_until=0.0, copy_fraction=0.0,
    )
    info = train(cfg)
    rows = [r for r in map(__import__("json").loads, (tmp_path / "echo" / "train_log.jsonl").read_text().splitlines()) if "answer_loss" in r]
    fresh = [r["fresh_tokens"] for r in rows]
    # A new batch arrives at steps 1, 2, 4 and 6 only; the other steps reuse one.
    assert [b > a for a, b in zip([0] + fresh, fresh)] == [True, True, False, True, False, True, False]
    assert info["fresh_tokens"] == fresh[-1] < info["tokens"]
    with pytest.raises(ValueError, match="data_echo"):
        TrainConfig(data_echo=0)


def test_batch_feed_echoes_only_while_waiting():
    """when_idle: a ready batch is always taken; while none is, recent ones are reused up to `echo` uses."""
    import threading

    from benchmarks.probe.train import BatchFeed

    gate = threading.Semaphore(0)

    def loader():
        for i in range(100):
            gate.acquire()
            yield {"i": i}
        raise RuntimeError("generator broke")

    feed = BatchFeed(loader(), echo=3, when_idle=True)
    gate.release()
    assert feed.next()[:2] == ({"i": 0}, True)  # blocks: nothing to reuse yet
    # Nothing ready: batch 0 again, twice (3 uses in all), then the feed waits for batch 1.
    assert [feed.next()[:2] for _ in range(2)] == [({"i": 0}, False)] * 2
    gate.release()
    assert feed.next()[:2] == ({"i": 1}, True)
    # Batch 1 has the fewest uses; batch 0 has none left.
    assert [feed.next()[0]["i"] for _ in range(2)] == [1, 1]
    for _ in range(3):
        gate.release()
    import time

    time.sleep(0.5)
    assert feed.next()[:2] == ({"i": 2}, True)  # a ready batch wins over reuse
    for _ in range(97):
        gate.release()
    with pytest.raises(RuntimeError, match="generator broke"):
        for _ in range(1000):
            feed.next()
    feed.close()


def test_aux_sequences_ngram_and_echo():
    """Digit/hex-only span copies hold nothing else; echo questions repeat the needle's words."""
    import random

    from benchmarks.probe.train import copy_sequence

    tok = build_tokenizer(default_strings())
    from benchmarks.probe.tokenizer import UUID_CHAR

    digits = set(tok.convert_tokens_to_ids(["##" + c for c in "0123456789"]))
    pairs = set(tok.convert_tokens_to_ids(["##" + a + b for a in UUID_CHAR.values() for b in UUID_CHAR.values()]))
    assert len(pairs) == 256 and tok.unk_token_id not in pairs
    kinds = set()
    for seed in range(8):
        ids, weights = copy_sequence(random.Random(seed), 300, tok, recall_fraction=0.0, ngram=1.0)
        assert len(ids) == len(weights) == 300 and ids[0] == tok.bos_token_id
        assert set(ids[1:]) <= digits or set(ids[1:]) <= pairs
        kinds.add(set(ids[1:]) <= digits)
    assert kinds == {True, False}
    for seed in range(6):
        ids, weights = copy_sequence(random.Random(seed), 400, tok, recall_fraction=1.0, echo=1.0)
        text = tok.decode(ids, skip_special_tokens=True)
        assert "What is the special" not in text and "Key:" not in text
        assert sum(weights) > 0


def test_train_config_errors():
    from benchmarks.probe.train import TrainConfig

    with pytest.raises(ValueError, match="curriculum"):
        TrainConfig(curriculum="512:0.2,1024:0.1")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="tasks entry"):
        TrainConfig(tasks="passkey:-1")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        TrainConfig(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="copy_ngram"):
        TrainConfig(copy_ngram=1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        probe_config(0)
