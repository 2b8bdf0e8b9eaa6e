"""Train the probe model on the benchmark suite's synthetic tasks (reproducible, one GPU, <= 10 min).

    python -m benchmarks.probe.train --out DIR [--steps N] [--max-minutes M] [--device cuda]
    python -m benchmarks.probe.train --out DIR2 --init-from DIR ...   # a second stage (benchmarks/probe/README.md)
    python -m benchmarks.probe.train eval --model DIR --lengths 4096,8192,16384 --samples 50

What it does:
* builds the word-level tokenizer over `benchmarks.suite.vocab` (benchmarks/probe/tokenizer.py) and
  the small Llama of `benchmarks.probe.model.probe_config`;
* draws samples from `benchmarks.suite.tasks.make_sample` (needles, multi-key needles, passkey,
  kv_retrieval, variable tracking ...), each sample = prompt + answer + </s>, in worker
  processes (a `DataLoader` over a map-style dataset: sample i of a stage always has the same
  task and seed, so the data order is fixed by --seed);
* a curriculum of lengths (default 256/512 -> 1K -> 2K -> 4K -> 4K/8K), a constant number of tokens
  per batch; a stage starts when the run's progress (the larger of step/steps and
  elapsed/max-minutes) passes its start, so a time-limited run still reaches the last stage;
* loss = cross-entropy on the answer tokens + lm_weight x next-token loss on the prompt
  (the repetitive haystack teaches copying, i.e. induction heads, which retrieval builds on);
* auxiliary sequences with a dense signal (`copy_sequence`): repeated random spans, some over
  digits / UUID hex-digit pairs only (a repeat is found by its longer prefix: n-gram induction), and
  associative recall in the suite's formats, some questions echoing the needle's own words;
* `BatchFeed`: while no fresh batch is ready, train again on a recent one (each at most
  --data-echo times), so the GPU does not wait on the generators;
* bf16 autocast on CUDA, SDPA attention (flash kernels: no mask is passed, right padding is
  harmless under a causal mask), AdamW with warmup and cosine decay, gradient clipping;
* held-out accuracy every --eval-every steps (teacher-forced exact match of the answer tokens,
  which equals greedy decoding getting the whole answer right), logged and written to
  DIR/train_log.jsonl;
* stops cleanly at --steps or --max-minutes and always saves DIR (bf16 safetensors, config,
  generation config, tokenizer), also at every held-out evaluation (a checkpoint, in case the run
  is cut short);
* --init-from DIR starts from a saved probe's weights instead of a fresh initialization.

The run is deterministic for a given --seed when --steps binds and --no-echo-when-idle is given
(stage switches by time, and reuse while the generators lag, depend on the machine's speed).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("train_probe")

DEFAULT_TASKS = "niah_single_1:1,niah_multikey_2:3,niah_multikey_3:1,passkey:1,kv_retrieval:4,vt:1"
EVAL_TASKS = ("niah_single_1", "niah_multikey_2", "passkey", "kv_retrieval")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (the CLI flags mirror these fields)."""

    out: str = "out/probe"
    seed: int = 0
    device: str = "auto"
    steps: int = 100000  # the shipped run is bounded by max_minutes
    max_minutes: float = 8.8
    # "length:start" pairs: the stage of `length` starts at that fraction of the run;
    # "4096+8192:0.8" alternates batches of those lengths.
    curriculum: str = "256+512:0,1024:0.2,2048:0.3,4096:0.4,4096+8192:0.55"
    tokens_per_batch: int = 65536
    # "task:weight" pairs, sampled in proportion to the weights.
    tasks: str = DEFAULT_TASKS
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lm_weight: float = 0.2
    # Fraction of sequences that are a random token string followed by its repeat (loss on the
    # repeat, weight copy_weight): a dense copying signal that grows induction heads early.
    copy_fraction: float = 0.5
    copy_weight: float = 1.0
    copy_until: float = 0.6
    # Until this fraction of the run, every sequence is random tokens followed by their repeat
    # (loss on the repeat): induction heads form within ~100 steps on this signal, and without
    # them the sparse answer loss of the tasks never starts to fall (see benchmarks/probe/README.md).
    induction_until: float = 0.04
    # Share of the auxiliary sequences that are associative recall in the suite's formats (the
    # rest: random spans that repeat earlier spans); see `copy_sequence`.
    recall_fraction: float = 0.6
    # Share of the recall questions that echo the needle's own words (see `copy_sequence`).
    recall_echo: float = 0.3
    # Share of the random-span sequences drawn from digits / hex digits only (see `copy_sequence`).
    copy_ngram: float = 0.6
    # Architecture (benchmarks.probe.model.probe_config's arguments).
    layers: int = 6
    intermediate_size: int = 256
    heads: int = 8
    kv_heads: int = 2
    # Up to this many training steps per generated batch (`BatchFeed`): the generators (tokenizing
    # each prompt several times to hit its length) feed one GPU more slowly than it trains, and a
    # reused batch costs no CPU. With echo_when_idle a batch is reused only while no fresh one is
    # ready (machine-dependent: the run is then not bit-reproducible); without, every batch is
    # used exactly data_echo times, newest first (b0, b1 b0, b2 b1, ...).
    data_echo: int = 3
    echo_when_idle: bool = True
    eval_every: int = 400
    eval_samples: int = 16
    workers: int = -1
    log_every: int = 100
    precision: str = "bf16"  # "bf16" (autocast on CUDA) or "fp32"
    # Start from the weights in this folder (a saved probe with the same tokenizer) instead of a
    # fresh initialization: a second, short stage of training (see benchmarks/probe/README.md).
    init_from: str = ""

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if not 0 <= self.induction_until < 1:
            raise ValueError(f"induction_until must be in [0, 1), got {self.induction_until}")
        if not 0 <= self.copy_fraction < 1:
            raise ValueError(f"copy_fraction must be in [0, 1), got {self.copy_fraction}")
        if not 0 <= self.copy_ngram <= 1:
            raise ValueError(f"copy_ngram must be in [0, 1], got {self.copy_ngram}")
        if not 0 <= self.recall_echo <= 1:
            raise ValueError(f"recall_echo must be in [0, 1], got {self.recall_echo}")
        if not 0 <= self.recall_fraction <= 1:
            raise ValueError(f"recall_fraction must be in [0, 1], got {self.recall_fraction}")
        if self.layers <= 0 or self.intermediate_size <= 0 or self.heads <= 0 or self.kv_heads <= 0:
            raise ValueError("layers, intermediate_size, heads and kv_heads must be positive")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.data_echo < 1:
            raise ValueError(f"data_echo must be >= 1, got {self.data_echo}")
        if self.tokens_per_batch <= 0:
            raise ValueError(f"tokens_per_batch must be positive, got {self.tokens_per_batch}")
        stages = self.stages  # validates
        if stages[0][1] != 0:
            raise ValueError(f"curriculum must start at fraction 0, got {self.curriculum!r}")
        if any(max(lengths) > self.tokens_per_batch for lengths, _ in stages):
            raise ValueError(f"tokens_per_batch={self.tokens_per_batch} is smaller than a curriculum length")
        self.task_weights  # validates

    @property
    def stages(self) -> list[tuple[tuple[int, ...], float]]:
        """[(lengths, start fraction)] in order of start."""
        try:
            pairs = [
                (tuple(int(x) for x in a.split("+")), float(b)) for a, b in (p.split(":") for p in self.curriculum.split(","))
            ]
        except ValueError as exc:
            raise ValueError(f"curriculum must be 'length:start,...', got {self.curriculum!r}") from exc
        if any(x <= 0 for lengths, _ in pairs for x in lengths):
            raise ValueError(f"curriculum lengths must be positive, got {self.curriculum!r}")
        if [s for _, s in pairs] != sorted(s for _, s in pairs) or any(not 0 <= s < 1 for _, s in pairs):
            raise ValueError(f"curriculum starts must be increasing fractions in [0, 1), got {self.curriculum!r}")
        return pairs

    @property
    def task_weights(self) -> list[tuple[str, float]]:
        out = []
        for part in self.tasks.split(","):
            name, _, weight = part.partition(":")
            try:
                w = float(weight) if weight else 1.0
            except ValueError as exc:
                raise ValueError(f"tasks entry {part!r} must be 'task' or 'task:weight'") from exc
            if w <= 0:
                raise ValueError(f"tasks entry {part!r} needs a positive weight")
            out.append((name.strip(), w))
        return out

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


# --------------------------------------------------------------------------------------------
# Data: a thin adapter over benchmarks.suite.tasks


def encode_sample(sample, tokenizer) -> tuple[list[int], int]:
    """(token ids of prompt + answer + </s>, number of prompt ids) for a `benchmarks.suite.tasks` Sample.

    The answer is what the suite's scorer expects the model to generate after the prompt:
    the sample's answers joined by spaces.
    """
    prompt_ids = list(sample_prompt_ids(sample, tokenizer))
    answer_ids = tokenizer(" " + answer_text(sample), add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def sample_prompt_ids(sample, tokenizer) -> list[int]:
    ids = getattr(sample, "input_ids", None)
    if ids is None:
        ids = tokenizer(sample.prompt)["input_ids"]
    return list(ids)


def answer_text(sample) -> str:
    answers = getattr(sample, "answers", None)
    if answers is None:
        answers = [sample.answer]
    if isinstance(answers, str):
        answers = [answers]
    return " ".join(str(a) for a in answers)


def _rng_for(*keys) -> random.Random:
    """A generator seeded by `keys` (str seeds are hashed with SHA-512: stable across runs)."""
    return random.Random("|".join(map(str, keys)))


class StageDataset(torch.utils.data.Dataset):
    """Batch i of a curriculum stage: samples of lengths[i % len(lengths)] tokens, tasks drawn by weight.

    A map-style dataset of whole batches, so the DataLoader's workers each build a batch and the
    order is fixed by (seed, length, i). Items: dict of input_ids [B, T] int64, answer_mask and
    lm_mask [B, T] float32 (weights for predicting token t from tokens < t).
    """

    def __init__(self, tokenizer, lengths: tuple[int, ...], tokens_per_batch: int, task_weights, seed: int,
                 copy_fraction: float = 0.0, induction: bool = False, recall_fraction: float = 0.5,
                 recall_echo: float = 0.0, copy_ngram: float = 0.0):
        self.tokenizer = tokenizer
        self.copy_ngram = copy_ngram
        self.recall_fraction = recall_fraction
        self.recall_echo = recall_echo
        self.copy_fraction = copy_fraction
        self.induction = induction
        self.lengths = tuple(lengths)
        self.tokens_per_batch = tokens_per_batch
        self.tasks = [t for t, _ in task_weights]
        self.weights = [w for _, w in task_weights]
        self.seed = seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> dict:
        from benchmarks.suite.tasks import make_sample

        length = self.lengths[index % len(self.lengths)]
        rng = _rng_for("batch", self.seed, self.lengths, index)
        seqs, prompt_lens, copies = [], [], []
        for _ in range(max(1, self.tokens_per_batch // length)):
            if self.induction:
                copies.append(repeat_sequence(rng, length, self.tokenizer))
                continue
            if rng.random() < self.copy_fraction:
                copies.append(copy_sequence(rng, length, self.tokenizer, self.recall_fraction, self.recall_echo,
                                            self.copy_ngram))
                continue
            task = rng.choices(self.tasks, self.weights)[0]
            sample_seed = rng.getrandbits(62)
            try:
                sample = make_sample(task, length, sample_seed, self.tokenizer, depth=rng.random())
            except ValueError:  # a task that cannot fit this length: fall back to a passkey
                sample = make_sample("passkey", length, sample_seed, self.tokenizer, depth=rng.random())
            ids, n_prompt = encode_sample(sample, self.tokenizer)
            seqs.append(ids)
            prompt_lens.append(n_prompt)
        return collate(seqs, prompt_lens, self.tokenizer.pad_token_id, copies)


def repeat_sequence(rng: random.Random, length: int, tokenizer) -> tuple[list[int], list[float]]:
    """Random ordinary tokens, then the same tokens again (loss on the repeat): (ids, weights).

    A random-length random prefix comes first so the repeat distance varies (content-based
    copying, not a fixed positional offset).
    """
    bos = tokenizer.bos_token_id
    prefix = rng.randrange(0, length // 4 + 1)
    half = (length - 1 - prefix) // 2
    draw = lambda n: [rng.randrange(4, len(tokenizer)) for _ in range(n)]  # noqa: E731
    pre, x = draw(prefix), draw(half)
    ids = [bos] + pre + x + x
    weights = [0.0] * (1 + prefix + half + 1) + [1.0] * (half - 1)
    return ids, weights


def _digit_alphabet(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["##" + c for c in "0123456789"])


def _uuid_alphabet(tokenizer) -> list[int]:
    """The tokens a UUID's hex digits are copied as: the digit-pair tokens of the probe tokenizer
    (`uuid_pairs`), else the single hex characters."""
    from benchmarks.probe.tokenizer import PREFIX, uuid_pair_tokens

    pairs = [t for t in uuid_pair_tokens() if t.startswith(PREFIX) and len(t) == len(PREFIX) + 2]
    ids = tokenizer.convert_tokens_to_ids(pairs)
    if tokenizer.unk_token_id in ids:
        ids = tokenizer.convert_tokens_to_ids(["##" + c for c in "0123456789abcdef"])
    return ids


def copy_sequence(rng: random.Random, length: int, tokenizer, recall_fraction: float = 0.5,
                  echo: float = 0.0, ngram: float = 0.0) -> tuple[list[int], list[float]]:
    """An auxiliary sequence of `length` ids with a dense retrieval signal: (ids, loss weights).

    A share 1 - `recall_fraction` of them are random ordinary tokens in which spans of 4-24 tokens repeat earlier spans
    at random distances (loss on each repeated span after its first token: content-based
    copying, i.e. induction heads; a fixed distance would be learned positionally instead).
    A share `ngram` of those use only digits or UUID hex-digit pairs (spans of 8-40): one token
    of context is then ambiguous and the copy must match a longer prefix.
    The others (a share `recall_fraction`) are associative recall in the suite's own words: noise sentences with many
    needles ("One of the special magic numbers for bold-tiger is: 7041932." or UUID
    key-value pairs) and, after them, many of the suite's questions with their answers
    (loss on the answers), the skill every retrieval task asks for, but dense. A share `echo` of
    those questions repeat the needle's own words up to its value instead ("One of the special
    magic numbers for bold-tiger is:", '"key":'): a stepping stone that multi-token induction
    answers, which grows the key-matching features the suite's questions then reuse.
    """
    from benchmarks.suite import vocab

    bos = tokenizer.bos_token_id
    if rng.random() < 1 - recall_fraction:
        ids, weights = [bos], [0.0]
        if ngram and rng.random() < ngram:
            # Digits or hex digits only: one token of context matches everywhere, so a repeat is
            # found by its longer prefix (n-gram induction, as copying a 7-digit number or a UUID
            # among many needs).
            alphabet = _digit_alphabet(tokenizer) if rng.random() < 0.5 else _uuid_alphabet(tokenizer)
            lo, hi = 8, 40
            draw = lambda n: [rng.choice(alphabet) for _ in range(n)]  # noqa: E731
        else:
            lo, hi = 4, 24
            draw = lambda n: [rng.randrange(4, len(tokenizer)) for _ in range(n)]  # noqa: E731
        while len(ids) < length:
            span = rng.randint(lo, hi)
            if len(ids) > span + 1 and rng.random() < 0.5:
                start = rng.randrange(1, len(ids) - span)
                ids += ids[start : start + span]
                weights += [0.0] + [1.0] * (span - 1)
            else:
                ids += draw(span)
                weights += [0.0] * span
        return ids[:length], weights[:length]

    def uuid() -> str:
        h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    style = rng.choice(("number", "uuid", "kv"))
    pieces: list[tuple[str, bool]] = []
    known: list[tuple[str, str]] = []
    tokens_est = 0
    while tokens_est < length:
        r = rng.random()
        if known and r < 0.3:
            key, value = rng.choice(known)
            if echo and rng.random() < echo:
                # The needle's own words up to its value: plain (multi-token) induction answers it.
                if style == "kv":
                    pieces.append((f'"{key}":', False))
                    value = f'"{value}"'
                else:
                    pieces.append((f"One of the special magic {style}s for {key} is:", False))
            elif style == "kv":
                pieces.append((f'Key: "{key}" The value associated with the specified key is:', False))
            else:
                kind = style
                pieces.append((f"What is the special magic {kind} for {key} mentioned in the provided text? "
                               f"The special magic {kind} for {key} mentioned in the provided text is", False))
            pieces.append((value, True))
            tokens_est += 40 + len(value)
        elif r < 0.7:
            if style == "number":
                key = f"{rng.choice(vocab.ADJECTIVES)}-{rng.choice(vocab.NOUNS)}"
                value = str(rng.randrange(10**6, 10**7))
                pieces.append((f"One of the special magic numbers for {key} is: {value}.", False))
            elif style == "uuid":
                key, value = uuid(), uuid()
                pieces.append((f"One of the special magic uuids for {key} is: {value}.", False))
            else:
                key, value = uuid(), uuid()
                pieces.append((f'"{key}": "{value}",', False))
            known.append((key, value))
            tokens_est += 12 + 2 * len(value) if style != "number" else 20
        else:
            pieces.append((rng.choice(vocab.NOISE_SENTENCES), False))
            tokens_est += 5
    encoded = tokenizer([p for p, _ in pieces], add_special_tokens=False)["input_ids"]
    ids, weights = [bos], [0.0]
    for piece_ids, (_, target) in zip(encoded, pieces):
        ids += piece_ids
        weights += [1.0 if target else 0.0] * len(piece_ids)
    return ids[:length], weights[:length]


def collate(seqs: list[list[int]], prompt_lens: list[int], pad_id: int, copies=()) -> dict:
    """Right-pad `seqs` (then the `copies`, (ids, loss weights)) into a batch with loss masks.

    answer_mask: the answer and </s> of each task sequence; lm_mask: its prompt tokens;
    copy_mask: the weights of each auxiliary sequence (see `copy_sequence`).
    """
    rows = [(s, n, None) for s, n in zip(seqs, prompt_lens)] + [(s, None, r) for s, r in copies]
    width = max(len(s) for s, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    lm_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    copy_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (s, n, r) in enumerate(rows):
        input_ids[b, : len(s)] = torch.tensor(s)
        if r is None:
            lm_mask[b, 1:n] = 1.0  # predicting prompt tokens from their prefix
            answer_mask[b, n : len(s)] = 1.0  # predicting the answer and </s>
        else:
            copy_mask[b, : len(s)] = torch.tensor(r)
    return {"input_ids": input_ids, "answer_mask": answer_mask, "lm_mask": lm_mask, "copy_mask": copy_mask}


class BatchFeed:
    """The training batches of one stage: fresh ones from `loader`, each reused up to `echo` times.

    A thread moves batches from the loader into a one-slot queue, so the training loop can see
    whether a fresh batch is ready without blocking. `next()` returns (batch, fresh, seconds
    waited). With `when_idle`, a fresh batch is taken whenever one is ready, and otherwise the
    least-used recent batch with uses left is trained on again (no wait); only when none has uses
    left does it wait. Without, it waits for a fresh batch every `echo` steps, deterministically.
    Errors in the loader are raised by `next()`.
    """

    def __init__(self, loader, echo: int = 1, when_idle: bool = True):
        self.echo, self.when_idle = echo, when_idle
        self.recent: collections.deque = collections.deque(maxlen=echo)  # [batch, uses], newest first
        self.pending: list = []  # deterministic mode: this window's batches
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(loader,), daemon=True, name="batch-feed")
        self._thread.start()

    def _pull(self, loader) -> None:
        while not self._stop.is_set():
            try:
                item = next(loader)
            except BaseException as exc:  # noqa: BLE001 - handed to the training loop
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _take(self, block: bool) -> list | None:
        """A fresh batch as a new [batch, uses] entry of `recent`, or None (not ready, not blocking)."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        entry = [item, 0]
        self.recent.appendleft(entry)
        return entry

    def next(self) -> tuple[dict, bool, float]:
        entry = None
        if self.when_idle:
            entry = self._take(block=False)
            if entry is None:
                reusable = [e for e in self.recent if e[1] < self.echo]
                # The least-used one; ties go to the newest (recent is newest first).
                entry = min(reusable, key=lambda e: e[1]) if reusable else None
        elif self.pending:
            entry = self.pending.pop(0)
        t = time.perf_counter()
        if entry is None:
            entry = self._take(block=True)
            self.pending = list(self.recent)[1:]
        wait = time.perf_counter() - t
        entry[1] += 1
        return entry[0], entry[1] == 1, wait

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _worker_init(_):
    torch.set_num_threads(1)


def make_loader(dataset: StageDataset, workers: int):
    if workers == 0:
        return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0))
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_worker_init,
        )
    )


# --------------------------------------------------------------------------------------------
# Loss and evaluation


def batch_losses(model, batch: dict, device: str, precision: str = "bf16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, lm loss, copy loss, per-sequence answer exact match) for one batch.

    Exact match is 1 for a sequence whose answer tokens are all argmax predictions (copy
    sequences count as 1: the caller averages over task sequences with `answer_mask`).
    """
    ids = batch["input_ids"].to(device, non_blocking=True)
    ans = batch["answer_mask"].to(device, non_blocking=True)[:, 1:]
    lm = batch["lm_mask"].to(device, non_blocking=True)[:, 1:]
    cp = batch["copy_mask"].to(device, non_blocking=True)[:, 1:]
    amp = device.startswith("cuda") and precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with autocast:
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
    logits = logits.float()
    targets = ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
    answer_loss = (ce * ans).sum() / ans.sum().clamp_min(1)
    lm_loss = (ce * lm).sum() / lm.sum().clamp_min(1)
    copy_loss = (ce * cp).sum() / cp.sum().clamp_min(1)
    wrong = ((logits.argmax(-1) != targets).float() * ans).sum(-1)
    return answer_loss, lm_loss, copy_loss, (wrong == 0).float()


@torch.no_grad()
def heldout_accuracy(model, tokenizer, length: int, tasks, samples: int, seed: int, device: str) -> dict[str, float]:
    """Teacher-forced exact match per task on held-out seeds (disjoint from training's)."""
    from benchmarks.suite.tasks import make_sample

    was_training = model.training
    model.eval()
    out = {}
    batch = max(1, min(samples, 65536 // length))
    for task in tasks:
        hits = 0
        for start in range(0, samples, batch):
            seqs, lens = [], []
            for i in range(start, min(samples, start + batch)):
                rng = _rng_for("heldout", seed, task, length, i)
                sample = make_sample(task, length, rng.getrandbits(62), tokenizer, depth=rng.random())
                ids, n = encode_sample(sample, tokenizer)
                seqs.append(ids)
                lens.append(n)
            _, _, _, exact = batch_losses(model, collate(seqs, lens, tokenizer.pad_token_id), device)
            hits += int(exact.sum().item())
        out[task] = hits / samples
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio over the run's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build(cfg: TrainConfig):
    """(model, tokenizer) freshly initialized from cfg.seed."""
    from transformers import LlamaForCausalLM

    from benchmarks.probe.model import probe_config
    from benchmarks.probe.tokenizer import build_tokenizer, default_strings

    tokenizer = build_tokenizer(default_strings())
    torch.manual_seed(cfg.seed)
    config = probe_config(len(tokenizer), num_hidden_layers=cfg.layers, intermediate_size=cfg.intermediate_size,
                          num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads)
    config._attn_implementation = "sdpa"
    if cfg.init_from:
        from benchmarks.probe.tokenizer import load_tokenizer

        model = LlamaForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, attn_implementation="sdpa")
        if load_tokenizer(cfg.init_from).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"init_from={cfg.init_from!r} was trained with another tokenizer than "
                             "benchmarks.suite.vocab builds")
        if model.config.vocab_size != config.vocab_size or model.config.num_hidden_layers != config.num_hidden_layers:
            raise ValueError(f"init_from={cfg.init_from!r} has another architecture than this configuration")
        return model, tokenizer
    model = LlamaForCausalLM(config)
    return model, tokenizer


def save(model, tokenizer, out: Path, info: dict) -> None:
    """Write the model (bf16 safetensors), its configs and tokenizer into `out` (casts the model)."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        do_sample=False,
        max_new_tokens=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    logger.info("saved %s", out)


def train(cfg: TrainConfig) -> dict:
    """Run training per `cfg`; returns the summary written to OUT/train_info.json."""
    device = cfg.resolved_device()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build(cfg)
    model.to(device).train()
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, vocab %d, device %s", num_params / 1e6, len(tokenizer), device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.startswith("cuda"),
    )
    workers = cfg.workers if cfg.workers >= 0 else max(1, (os.cpu_count() or 2) - 2)
    stages = cfg.stages
    eval_tasks = [t for t in EVAL_TASKS if t in {name for name, _ in cfg.task_weights}] or [cfg.task_weights[0][0]]
    log_file = (out / "train_log.jsonl").open("w")
    start = time.perf_counter()
    stage_idx, loader, tokens_seen, in_induction = -1, None, 0, None
    feed: BatchFeed | None = None
    fresh_tokens, data_wait = 0, 0.0
    history = []
    step = 0
    stop_reason = "steps"
    while step < cfg.steps:
        elapsed = time.perf_counter() - start
        if elapsed > cfg.max_minutes * 60:
            stop_reason = "max_minutes"
            break
        progress = max(step / cfg.steps, elapsed / (cfg.max_minutes * 60))
        want = max(i for i, (_, s) in enumerate(stages) if s <= progress)
        induction = progress < cfg.induction_until
        if want != stage_idx or induction != in_induction:
            stage_idx, in_induction = want, induction
            lengths = stages[stage_idx][0]
            if feed is not None:
                feed.close()
            feed = loader = None  # shut the previous stage's workers down
            copy_fraction = cfg.copy_fraction if stages[stage_idx][1] < cfg.copy_until else 0.0
            dataset = StageDataset(tokenizer, lengths, cfg.tokens_per_batch, cfg.task_weights, cfg.seed, copy_fraction,
                                   induction=induction, recall_fraction=cfg.recall_fraction, recall_echo=cfg.recall_echo, copy_ngram=cfg.copy_ngram)
            loader = make_loader(dataset, workers)
            feed = BatchFeed(loader, cfg.data_echo, cfg.echo_when_idle)
            logger.info("step %d: stage %d, lengths %s, %d tokens per batch%s", step, stage_idx, lengths,
                        cfg.tokens_per_batch, " (induction warm-up: repeated random tokens)" if induction else "")
        batch, is_fresh, waited = feed.next()
        data_wait += waited
        fresh_tokens += batch["input_ids"].numel() if is_fresh else 0
        lr = lr_at(step, progress, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        answer_loss, lm_loss, copy_loss, exact = batch_losses(model, batch, device, cfg.precision)
        loss = answer_loss + cfg.lm_weight * lm_loss + cfg.copy_weight * copy_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += batch["input_ids"].numel()
        step += 1
        if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
            row = {
                "step": step,
                "length": batch["input_ids"].shape[1],
                "answer_loss": answer_loss.item(),
                "lm_loss": lm_loss.item(),
                "copy_loss": copy_loss.item(),
                "train_exact": (exact * (batch["answer_mask"].sum(-1) > 0).to(exact)).sum().item()
                / max(1, int((batch["answer_mask"].sum(-1) > 0).sum())),
                "grad_norm": float(grad_norm),
                "lr": lr,
                "tokens": tokens_seen,
                "elapsed_s": round(time.perf_counter() - start, 1),
                "fresh_tokens": fresh_tokens,
                "data_wait_s": round(data_wait, 3),  # since the previous log line
            }
            data_wait = 0.0
            history.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            logger.info(
                "step %5d len %5d  ans %.3f lm %.3f copy %.3f exact %.2f  gn %.2f lr %.2e  %.0fs  %.1fM tok (%.0f%% fresh)  wait %.2fs",
                step, row["length"], row["answer_loss"], row["lm_loss"], row["copy_loss"], row["train_exact"], row["grad_norm"],
                row["lr"], row["elapsed_s"], tokens_seen / 1e6, 100 * fresh_tokens / max(1, tokens_seen), row["data_wait_s"],
            )
        if cfg.eval_every and step % cfg.eval_every == 0:
            length = max(stages[stage_idx][0])
            acc = heldout_accuracy(model, tokenizer, length, eval_tasks, cfg.eval_samples, cfg.seed, device)
            row = {"step": step, "eval_length": length, **{f"acc_{k}": v for k, v in acc.items()}}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            logger.info("eval step %d at %d tokens: %s", step, length, "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            # A checkpoint with every eval, so a run cut short (a machine's time limit) keeps its weights.
            save(copy.deepcopy(model), tokenizer, out, {"config": dataclasses.asdict(cfg), "checkpoint_step": step,
                                                         "elapsed_s": round(time.perf_counter() - start, 1),
                                                         "heldout_exact": acc, "eval_length": length})
    if feed is not None:
        feed.close()
    feed = loader = None
    wall = time.perf_counter() - start
    final_len = max(stages[max(stage_idx, 0)][0])
    final_acc = heldout_accuracy(model, tokenizer, final_len, eval_tasks, cfg.eval_samples, cfg.seed, device)
    info = {
        "config": dataclasses.asdict(cfg),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "parameters": num_params,
        "vocab": len(tokenizer),
        "steps": step,
        "stop_reason": stop_reason,
        "tokens": tokens_seen,
        "fresh_tokens": fresh_tokens,
        "wall_s": round(wall, 1),
        "final_length": final_len,
        "final_heldout_exact": final_acc,
        "first_losses": history[:1],
        "last_losses": history[-1:],
    }
    logger.info("done: %d steps in %.0fs (%s); held-out at %d: %s", step, wall, stop_reason, final_len, final_acc)
    log_file.close()
    save(model, tokenizer, out, info)
    return info


# --------------------------------------------------------------------------------------------
# Evaluation with the suite's scorer (generation)


def score_answer(prediction: str, sample) -> float:
    """The suite's scorer (RULER string_match_all) of `prediction` against the sample's answers."""
    from benchmarks.suite.scoring import score_sample

    return float(score_sample(prediction, list(sample.answers)))


@torch.no_grad()
def evaluate(model, tokenizer, tasks, lengths, samples: int, seed: int = 12345, device: str = "cpu", batch_tokens: int = 65536) -> list[dict]:
    """Greedy generation scored by the suite's scorer; one row per (task, length)."""
    from benchmarks.suite.tasks import make_sample

    rows = []
    for length in lengths:
        for task in tasks:
            t0 = time.perf_counter()
            items = [make_sample(task, length, seed + i, tokenizer) for i in range(samples)]
            batch = max(1, batch_tokens // length)
            scores = []
            for s in range(0, samples, batch):
                chunk = items[s : s + batch]
                prompts = [sample_prompt_ids(x, tokenizer) for x in chunk]
                width = max(map(len, prompts))
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, p in enumerate(prompts):
                    ids[b, width - len(p) :] = torch.tensor(p)
                    mask[b, width - len(p) :] = 1
                max_new = max(len(tokenizer(" " + answer_text(x), add_special_tokens=False)["input_ids"]) for x in chunk) + 4
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
                for b, x in enumerate(chunk):
                    text = tokenizer.decode(gen[b, width:], skip_special_tokens=True)
                    scores.append(score_answer(text, x))
            rows.append({"task": task, "length": length, "samples": samples, "accuracy": sum(scores) / len(scores),
                         "seconds": round(time.perf_counter() - t0, 1)})
            logger.info("eval %-16s %6d: %.3f", task, length, rows[-1]["accuracy"])
    return rows


# --------------------------------------------------------------------------------------------
# CLI


def _parser_from_dataclass(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):  # --flag / --no-flag (type=bool would take "false" as True)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help=f"(default: {field.default})")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        parser = argparse.ArgumentParser(prog="python -m benchmarks.probe.train eval",
                                         description="Score a probe model with generation.")
        parser.add_argument("--model", default=None, help="model folder (default: the shipped probe)")
        parser.add_argument("--tasks", default=",".join(EVAL_TASKS))
        parser.add_argument("--lengths", default="4096,8192,16384")
        parser.add_argument("--samples", type=int, default=50)
        parser.add_argument("--seed", type=int, default=12345)
        parser.add_argument("--device", default="auto")
        parser.add_argument("--json", default=None, help="write the rows to this file")
        args = parser.parse_args(argv[1:])
        from benchmarks.probe.model import PROBE_DIR, load_probe

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer = load_probe(args.model or PROBE_DIR, dtype=dtype, device=device)
        rows = evaluate(model, tokenizer, args.tasks.split(","), [int(x) for x in args.lengths.split(",")], args.samples, args.seed, device)
        for r in rows:
            print(f"| {r['task']} | {r['length']} | {r['accuracy']:.3f} | {r['samples']} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe.train", description=__doc__.split("\n\n")[0])
    _parser_from_dataclass(parser)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    train(cfg)


if __name__ == "__main__":
    main()
