"""Task generators: deterministic per seed, exact length, answers present at the stated depth."""

from __future__ import annotations

import collections
import re

import pytest

from benchmarks.suite import vocab
from benchmarks.suite.tasks import AGGREGATION_TASKS, TASKS, make_sample, make_samples


@pytest.fixture(scope="module")
def word_tok():
    from benchmarks.probe.tokenizer import build_tokenizer, default_strings

    return build_tokenizer(default_strings())


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style merges), trained here on the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(vocab.TEMPLATES.values()) + list(vocab.NOISE_SENTENCES)
    texts += [" ".join(vocab.NOUNS), " ".join(vocab.ADJECTIVES), " ".join(vocab.CODED_WORDS), "0123456789 abcdef"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# One test per tokenizer, looping over tasks (each test pays the suite's per-test gc teardown).
@pytest.mark.parametrize("tokenizer", ["word_tok", "bpe_tok"])
def test_exact_length_deterministic_and_answers_in_prompt(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    for task in TASKS:
        _check_exact_length(task, tok)


def _check_exact_length(task, tok):
    for length in (700, 1500):
        a = make_sample(task, length, 7, tok, depth=0.4)
        b = make_sample(task, length, 7, tok, depth=0.4)
        assert len(a.input_ids) == length
        assert a.input_ids == b.input_ids and a.answers == b.answers
        # the prompt text tokenizes back to the ids (padding words, not raw ids, filled the gap)
        assert tuple(tok(a.prompt)["input_ids"]) == a.input_ids
        assert a.answers and all(ans in a.prompt for ans in a.answers)
        assert a.max_new_tokens >= len(tok(" " + a.answer, add_special_tokens=False)["input_ids"])
    other = make_sample(task, 700, 8, tok, depth=0.4)
    assert other.input_ids != make_sample(task, 700, 7, tok, depth=0.4).input_ids


@pytest.mark.parametrize("tokenizer", ["word_tok", "bpe_tok"])
def test_needle_sits_at_the_stated_depth(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    for task in TASKS:
        if task not in AGGREGATION_TASKS:
            for depth in (0.0, 0.5, 1.0):
                _check_depth(task, depth, tok)


def _check_depth(task, depth, tok):
    s = make_sample(task, 2048, 3, tok, depth=depth)
    assert s.depth == depth
    start, end = s.meta["context_tokens"]
    pos = s.needle_positions[0]
    rel = (pos - start) / (end - start)
    # slack: the needle's own length (a UUID needle with the word tokenizer is ~90 of ~2000
    # tokens; vt: the whole 5-link chain follows its first link; at depth 1 it ends, not starts,
    # at the context's end) plus one unit
    slack = 0.1 if task in ("niah_multikey_3", "kv_retrieval", "vt") else 0.05
    assert abs(rel - depth) <= slack, (task, rel, depth)
    # the tokens at the needle position spell the needle with its (first) answer
    window = tok.decode(list(s.input_ids[pos:pos + 160]), skip_special_tokens=True)
    assert s.answers[0] in window  # vt: the first link names the first variable


def test_random_depth_is_drawn_from_the_seed(word_tok):
    a = make_sample("passkey", 1024, 5, word_tok)
    b = make_sample("passkey", 1024, 5, word_tok)
    assert a.depth is None and a.needle_positions == b.needle_positions
    depths = {make_sample("passkey", 1024, s, word_tok).needle_positions[0] for s in range(6)}
    assert len(depths) > 1


def test_cwe_common_words_are_the_most_frequent(word_tok):
    s = make_sample("cwe", 3000, 1, word_tok)
    body = s.prompt.split("\n")[1]
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", body))
    assert len(s.answers) == 10 and len(set(s.answers)) == 10
    least_common = min(counts[w] for w in s.answers)
    most_rare = max(c for w, c in counts.items() if w not in s.answers)
    assert least_common > most_rare
    assert s.depth is None and s.needle_positions == ()
    assert s.category == "aggregation"


def test_fwe_top_three_are_strictly_most_frequent(word_tok):
    s = make_sample("fwe", 2000, 2, word_tok)
    counts = collections.Counter(w for w in s.prompt.split("\n")[1].split() if w in vocab.CODED_WORDS)
    ranked = [w for w, _ in counts.most_common()]
    assert set(ranked[:3]) == set(s.answers)
    assert counts[ranked[2]] > counts[ranked[3]]


def test_vt_chain_links_in_order(word_tok):
    s = make_sample("vt", 1500, 4, word_tok, depth=0.2)
    names = s.answers
    assert len(names) == 5
    value = re.search(rf"VAR {names[0]} = (\d+)\.", s.prompt).group(1)
    for prev, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {prev}." in s.prompt
    assert f"assigned the value {value}" in s.prompt
    assert list(s.needle_positions) == sorted(s.needle_positions)


def test_make_samples_depths_and_seeds(word_tok):
    ss = make_samples("niah_single_1", 600, 3, word_tok, seed=1, depths=[0.0, 1.0])
    assert [s.depth for s in ss] == [0.0, 1.0, 0.0]
    assert len({s.seed for s in ss}) == 3


def test_clear_errors(word_tok):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("nope", 512, 0, word_tok)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", 512, 0, word_tok, depth=1.5)
    with pytest.raises(ValueError, match="more than the requested length"):
        make_sample("cwe", 100, 0, word_tok)
    with pytest.raises(ValueError, match="length"):
        make_sample("passkey", 0, 0, word_tok)
