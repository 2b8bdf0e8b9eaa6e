"""Synthetic long-context tasks (RULER and InfiniteBench styles), generated, never downloaded.

    sample = make_sample("niah_single_1", 4096, seed=0, tokenizer=tok, depth=0.5)
    sample.input_ids        # exactly 4096 ids (special tokens included), the model's input
    sample.answers          # what a correct continuation contains, e.g. ("7041932",)

Every generator is seeded and deterministic (same task, length, seed, depth and tokenizer: same
ids), tokenizer-agnostic (lengths are measured with the tokenizer it is given) and builds its text
from `benchmarks.suite.vocab` plus digits, hex digits, upper-case letters and punctuation.

A prompt has three parts::

    head (instruction) \n context (haystack with needles, pad) \n tail (question + answer prefix)
                          ^ depth 0.0                  depth 1.0 ^

The model is expected to continue the answer prefix with the answers joined by spaces.
`depth` is the needle's place inside the context (0 = first, 1 = last): the requested value is
`Sample.depth`; where the needles really landed, in tokens, is `Sample.needle_positions`.

Exact length: the number of context units (haystack sentences, list entries, JSON pairs...) is
searched for the largest count whose prompt fits, then pad words (noise words or dots) fill the
gap; if a tokenizer merges pad words so the count cannot be hit in text, the last few ids are
filled at the token level (then `Sample.prompt`, the decoded ids, may tokenize differently, and
`input_ids` is the authority). `meta["token_pad"]` counts such ids (0 with word-level tokenizers).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.suite import vocab

# Retrieval tasks find needles; aggregation tasks (cwe, fwe) count over the whole context,
# which is where top-k attention is known to break (report them separately).
RETRIEVAL_TASKS = (
    "niah_single_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "passkey",
    "number_string",
    "kv_retrieval",
)
MULTIHOP_TASKS = ("vt",)
AGGREGATION_TASKS = ("cwe", "fwe")
TASKS = RETRIEVAL_TASKS + MULTIHOP_TASKS + AGGREGATION_TASKS
# Tasks without needles: depth does not apply.
DEPTHLESS_TASKS = AGGREGATION_TASKS


@dataclass(frozen=True)
class Sample:
    """One generated prompt and what a correct answer contains.

    input_ids: the prompt's token ids, exactly `length` of them (special tokens included).
    prompt: the prompt text (`tokenizer.decode(input_ids, skip_special_tokens=True)` when the
      last ids had to be padded at the token level, the built text otherwise).
    answers: the strings a correct continuation contains (all of them; order is not scored).
    depth: the requested needle depth in [0, 1] (None for tasks without needles).
    needle_positions: token index in `input_ids` where each needle starts.
    max_new_tokens: enough new tokens for the answers joined by spaces, plus slack.
    category: "retrieval", "multihop" or "aggregation".
    """

    task: str
    length: int
    seed: int
    prompt: str
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    depth: float | None
    needle_positions: tuple[int, ...]
    max_new_tokens: int
    category: str
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def answer(self) -> str:
        """The answers joined by spaces: the continuation a model is trained to produce."""
        return " ".join(self.answers)


@dataclass
class _Parts:
    """A task's prompt before length fitting: head, context units, needles, tail."""

    head: str
    units: list[str]
    needle_units: list[int]  # indices into units where needles are
    tail: str
    answers: list[str]
    pad_words: tuple[str, ...]
    meta: dict = field(default_factory=dict)


def _tpl(template: str, **kw) -> str:
    return vocab.TEMPLATES[template].format(**kw)


def _noise(i: int) -> str:
    return vocab.NOISE_SENTENCES[i % len(vocab.NOISE_SENTENCES)]


# Pad words: the noise sentences' words without punctuation (one token each for word-level tokenizers).
NOISE_WORDS = tuple(w.strip(string.punctuation) for w in " ".join(vocab.NOISE_SENTENCES).split())


def _essay(rng: random.Random) -> str:
    return _tpl(
        "essay",
        adj=rng.choice(vocab.ADJECTIVES),
        noun=rng.choice(vocab.NOUNS),
        verb=rng.choice(vocab.VERBS),
        adj2=rng.choice(vocab.ADJECTIVES),
        noun2=rng.choice(vocab.NOUNS),
        prep=rng.choice(vocab.PREPOSITIONS),
        noun3=rng.choice(vocab.NOUNS),
    )


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "adjective-noun" keys (RULER's word keys)."""
    space = len(vocab.ADJECTIVES) * len(vocab.NOUNS)
    if count > space:
        raise ValueError(f"needs {count} distinct keys, the vocabulary has {space}: length too large")
    return [
        f"{vocab.ADJECTIVES[i // len(vocab.NOUNS)]}-{vocab.NOUNS[i % len(vocab.NOUNS)]}"
        for i in rng.sample(range(space), count)
    ]


def _insert(units: list[str], needles: list[str], depths: list[float]) -> tuple[list[str], list[int]]:
    """Insert each needle among `units` at its depth; returns (units, needle indices in order of `needles`)."""
    n = len(units)
    order = sorted(range(len(needles)), key=lambda i: (round(depths[i] * n), i))
    out, where = list(units), [0] * len(needles)
    for shift, i in enumerate(order):
        pos = round(depths[i] * n) + shift
        out.insert(pos, needles[i])
        where[i] = pos  # later insertions land after it: its index stays
    return out, where


def _depths(rng: random.Random, depth: float | None, count: int) -> list[float]:
    """The first needle at `depth` (random when None), the others at random depths."""
    first = rng.random() if depth is None else depth
    return [first] + [rng.random() for _ in range(count - 1)]


# ----------------------------------------------------------------------------------------------
# Task builders: (rng, number of context units, depth) -> _Parts


def _niah(rng, n, depth, *, haystack: str, num_keys: int, num_values: int, uuid: bool) -> _Parts:
    kind, kind_one = ("uuids", "uuid") if uuid else ("numbers", "number")
    keys = [_uuid(rng) for _ in range(num_keys)] if uuid else _keys(rng, num_keys)
    value = (lambda: _uuid(rng)) if uuid else (lambda: _number(rng, 7))
    needles, answers = [], []
    for key in keys:
        for _ in range(num_values):
            v = value()
            needles.append(_tpl("niah_needle", kind=kind, key=key, value=v))
            answers.append(v)
    depths = _depths(rng, depth, len(needles))
    hay_rng = random.Random(rng.random())
    if haystack == "noise":
        units = [_noise(i) for i in range(n)]
    elif haystack == "essay":
        units = [_essay(hay_rng) for _ in range(n)]
    else:  # a haystack of distractor needles with other keys
        if uuid:
            dkeys = [_uuid(hay_rng) for _ in range(n)]
        else:
            dkeys = [k for k in _keys(hay_rng, n + num_keys) if k not in keys][:n]
        units = [
            _tpl("niah_needle", kind=kind, key=k, value=_uuid(hay_rng) if uuid else _number(hay_rng, 7)) for k in dkeys
        ]
    units, where = _insert(units, needles, depths)
    query = keys[0] if num_keys == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    if len(answers) == 1:
        tail = _tpl("niah_question_one", kind_one=kind_one, key=query) + " " + _tpl("niah_answer_one", kind_one=kind_one, key=query)
    else:
        tail = _tpl("niah_question_all", kind=kind, key=query) + " " + _tpl("niah_answer_all", kind=kind, key=query)
    return _Parts(_tpl("niah", kind=kind), units, where, tail, answers, NOISE_WORDS)


def _passkey(rng, n, depth, *, name: str, digits: int) -> _Parts:
    value = _number(rng, digits)
    units = [_noise(i) for i in range(n)]
    units, where = _insert(units, [_tpl(f"{name}_needle", value=value)], _depths(rng, depth, 1))
    tail = _tpl(f"{name}_question") + " " + _tpl(f"{name}_answer")
    return _Parts(_tpl(name), units, where, tail, [value], NOISE_WORDS)


def _kv_retrieval(rng, n, depth) -> _Parts:
    key, value = _uuid(rng), _uuid(rng)
    hay_rng = random.Random(rng.random())
    units = [f'"{_uuid(hay_rng)}": "{_uuid(hay_rng)}",' for _ in range(n)]
    units, where = _insert(units, [f'"{key}": "{value}",'], _depths(rng, depth, 1))
    units = ["{"] + units + ["}"]
    where = [w + 1 for w in where]
    tail = _tpl("kv_retrieval_question", key=key) + " " + _tpl("kv_retrieval_answer")
    return _Parts(_tpl("kv_retrieval"), units, where, tail, [value], (".",))


def _vt(rng, n, depth, *, hops: int = 4) -> _Parts:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    lines = [_tpl("vt_line", name=names[0], value=value)]
    lines += [_tpl("vt_line", name=names[i], value="VAR " + names[i - 1]) for i in range(1, hops + 1)]
    lines = [line + "." for line in lines]
    first = rng.random() if depth is None else depth
    # The chain in order: the first link at `depth`, the rest spread over what follows.
    depths = [first + (1 - first) * i / (hops + 1) for i in range(hops + 1)]
    units, where = _insert([_noise(i) for i in range(n)], lines, depths)
    tail = _tpl("vt_question", value=value) + " " + _tpl("vt_answer", count=hops + 1, value=value)
    return _Parts(_tpl("vt"), units, where, tail, names, NOISE_WORDS)


CWE_COMMON = 10
CWE_POOL = tuple(dict.fromkeys(vocab.NOUNS + vocab.ADJECTIVES + vocab.VERBS))


def _cwe(rng, n, depth) -> _Parts:
    """A numbered list of `n` words: 10 common words ~30% of entries, the rest rare (RULER cwe)."""
    if n < 4 * CWE_COMMON:
        raise ValueError(f"cwe needs at least {4 * CWE_COMMON} list entries, the length allows {n}")
    words = rng.sample(CWE_POOL, len(CWE_POOL))
    common, pool = words[:CWE_COMMON], words[CWE_COMMON:]
    f_common = max(4, round(0.3 * n / CWE_COMMON))
    rest = n - CWE_COMMON * f_common
    num_rare = min(len(pool), max(1, math.ceil(rest / 3)))
    counts = [rest // num_rare + (1 if i < rest % num_rare else 0) for i in range(num_rare)]
    if max(counts) >= f_common:
        raise ValueError(f"cwe: rare words would appear {max(counts)} times, common ones {f_common}")
    entries = [w for w in common for _ in range(f_common)] + [w for w, c in zip(pool, counts) for _ in range(c)]
    rng.shuffle(entries)
    units = [f"{i + 1}. {w}" for i, w in enumerate(entries)]
    tail = _tpl("cwe_question", count=CWE_COMMON) + " " + _tpl("cwe_answer", count=CWE_COMMON)
    return _Parts(_tpl("cwe"), units, [], tail, common, (".",), {"common_count": f_common})


def _fwe(rng, n, depth, *, alpha: float = 2.0, top: int = 3) -> _Parts:
    """`n` coded words drawn with Zipf(alpha) frequencies; the answer is the `top` most frequent."""
    if n < 20:
        raise ValueError(f"fwe needs at least 20 coded words, the length allows {n}")
    words = rng.sample(vocab.CODED_WORDS, len(vocab.CODED_WORDS))
    weights = [1 / (k + 1) ** alpha for k in range(len(words))]
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    counts[0] += n - sum(counts)
    for k in range(top, 0, -1):  # strictly decreasing over the top ranks, ties broken upward
        while counts[k - 1] <= counts[k]:
            counts[k - 1] += 1
            j = max(range(top + 1, len(counts)), key=lambda i: counts[i])
            if counts[j] == 0:
                counts[0] -= 1
            else:
                counts[j] -= 1
    entries = [w for w, c in zip(words, counts) for _ in range(c)]
    rng.shuffle(entries)
    tail = _tpl("fwe_question") + " " + _tpl("fwe_answer")
    return _Parts(_tpl("fwe"), entries, [], tail, words[:top], (".",))


_BUILDERS: dict[str, Callable[..., _Parts]] = {
    "niah_single_1": lambda r, n, d: _niah(r, n, d, haystack="noise", num_keys=1, num_values=1, uuid=False),
    "niah_multikey_2": lambda r, n, d: _niah(r, n, d, haystack="needles", num_keys=1, num_values=1, uuid=False),
    "niah_multikey_3": lambda r, n, d: _niah(r, n, d, haystack="needles", num_keys=1, num_values=1, uuid=True),
    "niah_multivalue": lambda r, n, d: _niah(r, n, d, haystack="essay", num_keys=1, num_values=4, uuid=False),
    "niah_multiquery": lambda r, n, d: _niah(r, n, d, haystack="essay", num_keys=4, num_values=1, uuid=False),
    "passkey": lambda r, n, d: _passkey(r, n, d, name="passkey", digits=5),
    "number_string": lambda r, n, d: _passkey(r, n, d, name="number_string", digits=10),
    "kv_retrieval": _kv_retrieval,
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
}
_MIN_UNITS = {"cwe": 4 * CWE_COMMON, "fwe": 20}
assert set(_BUILDERS) == set(TASKS)


# ----------------------------------------------------------------------------------------------
# Length fitting


def _join(parts: _Parts, pad: list[str]) -> tuple[str, int, int, list[int]]:
    """(text, context start char, context end char, needle start chars)."""
    text = parts.head + "\n"
    start = len(text)
    needle_chars = [0] * len(parts.needle_units)
    where = {u: i for i, u in enumerate(parts.needle_units)}
    pieces = []
    pos = start
    for u, unit in enumerate(parts.units + pad):
        if u in where:
            needle_chars[where[u]] = pos
        pieces.append(unit)
        pos += len(unit) + 1
    context = " ".join(pieces)
    end = start + len(context)
    return text + context + "\n" + parts.tail, start, end, needle_chars


class _Encoder:
    """`tokenizer(text)["input_ids"]`, memoized for one sample.

    The length search measures the same texts more than once (the prompt without pad words is
    both the last unit count and the first pad count; the prompt that fits is measured, then
    encoded), and each full-length encode is most of a sample's cost.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        out = self._ids.get(text)
        if out is None:
            out = self._ids[text] = list(self.tokenizer(text)["input_ids"])
        return out

    def count(self, text: str) -> int:
        return len(self.ids(text))


def _largest_fitting(count: Callable[[int], int], lo: int, target: int, step_hint: float) -> tuple[int, int]:
    """Largest k >= lo with count(k) <= target (count nondecreasing); returns (k, count(k)).

    Secant steps from the measured tokens per unit, then bisection inside the bracket.
    """
    c_lo = count(lo)
    if c_lo > target:
        raise ValueError(f"needs {c_lo} tokens at its smallest, more than the requested length {target}")
    hi = None
    slope = max(step_hint, 1e-3)
    for _ in range(64):
        if hi is not None and hi - lo <= 1:
            break
        if hi is None:
            guess = lo + max(1, int((target - c_lo) / slope))
        else:
            guess = (lo + hi) // 2
        c = count(guess)
        if c <= target:
            if guess > lo and c > c_lo:
                slope = (c - c_lo) / (guess - lo)
            lo, c_lo = guess, c
            if c == target and hi is None:
                hi = lo + 1  # exact already; the next unit cannot fit if tokens grow with units
                if count(hi) <= target:
                    hi = None
        else:
            hi = guess
            if guess > lo:
                slope = max(slope, (c - c_lo) / (guess - lo))
    return lo, c_lo


def make_sample(task: str, length: int, seed: int, tokenizer, depth: float | None = None) -> Sample:
    """Generate one prompt of exactly `length` tokens of `tokenizer` (see the module docstring).

    task: one of TASKS.  length: prompt ids including special tokens.  seed: any int.
    tokenizer: a Hugging Face tokenizer (callable returning "input_ids", with `decode`).
    depth: needle depth in [0, 1] inside the context; None draws it from the seed.
    Raises ValueError for an unknown task, a bad depth, or a length too small for the task.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None, got {depth}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    build = _BUILDERS[task]
    enc = _Encoder(tokenizer)
    built: dict[int, _Parts] = {}

    def parts_for(n: int) -> _Parts:
        if n not in built:
            built[n] = build(random.Random(f"{task}|{seed}"), n, depth)
        return built[n]

    def count_units(n: int) -> int:
        return enc.count(_join(parts_for(n), [])[0])

    lo = _MIN_UNITS.get(task, 0)
    probe = max(lo + 16, 32)
    slope = (count_units(probe) - count_units(lo)) / (probe - lo)
    try:
        n, used = _largest_fitting(count_units, lo, length, slope)
    except ValueError as exc:
        raise ValueError(f"task {task!r}: {exc}") from None
    parts = parts_for(n)

    # Fill the gap with pad words, then, if the tokenizer merges them, with pad ids.
    pad_words = [parts.pad_words[i % len(parts.pad_words)] for i in range(max(0, length - used) * 2 + 2)]

    def count_pad(k: int) -> int:
        return enc.count(_join(parts, pad_words[:k])[0])

    k, used = _largest_fitting(count_pad, 0, length, 1.0) if used < length else (0, used)
    text, ctx_start, ctx_end, needle_chars = _join(parts, pad_words[:k])
    ids = list(enc.ids(text))
    token_pad = length - len(ids)
    if token_pad > 0:
        filler = tokenizer(" " + " ".join(pad_words), add_special_tokens=False)["input_ids"]
        filler = (filler * (token_pad // max(1, len(filler)) + 1))[:token_pad]
        at = enc.count(text[:ctx_end])
        ids = ids[:at] + filler + ids[at:]
        prompt = tokenizer.decode(ids, skip_special_tokens=True)
    else:
        prompt = text
    assert len(ids) == length, (task, length, len(ids))
    positions = tuple(enc.count(text[:c].rstrip()) for c in needle_chars)
    answer_ids = tokenizer(" " + " ".join(parts.answers), add_special_tokens=False)["input_ids"]
    category = "aggregation" if task in AGGREGATION_TASKS else "multihop" if task in MULTIHOP_TASKS else "retrieval"
    meta = dict(parts.meta)
    meta.update(
        units=n,
        pad_words=k,
        token_pad=max(0, token_pad),
        context_tokens=(enc.count(text[:ctx_start].rstrip()), enc.count(text[:ctx_end])),
    )
    return Sample(
        task=task,
        length=length,
        seed=seed,
        prompt=prompt,
        input_ids=tuple(ids),
        answers=tuple(parts.answers),
        depth=None if task in DEPTHLESS_TASKS else depth,
        needle_positions=positions,
        max_new_tokens=len(answer_ids) + 8,
        category=category,
        meta=meta,
    )


def make_samples(task: str, length: int, num: int, tokenizer, seed: int = 0, depths=None) -> list[Sample]:
    """`num` samples of one task and length; sample i has seed `seed * 1_000_003 + i`.

    depths: None (each drawn from its seed), one float for all, or a sequence cycled over samples.
    """
    if depths is None or isinstance(depths, (int, float)):
        depth_of = lambda i: depths  # noqa: E731
    else:
        depths = list(depths)
        depth_of = lambda i: depths[i % len(depths)]  # noqa: E731
    return [make_sample(task, length, seed * 1_000_003 + i, tokenizer, depth_of(i)) for i in range(num)]
