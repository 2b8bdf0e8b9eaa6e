"""Scoring generated answers (RULER's string match, case-insensitive).

    score_sample(prediction, answers) -> float in [0, 1]

Every task is scored by RULER's `string_match_all`: the fraction of the expected answers that
appear in the prediction as substrings, after lower-casing. For single-answer tasks this is 1
when the answer is in the output and 0 otherwise; for multi-answer tasks (niah_multivalue,
niah_multiquery, vt, cwe, fwe) partial credit counts each answer found. The prediction is cut
at the first line break (models that ramble on a new line are not rewarded for it), and words
split by a word-level tokenizer's decode spaces are handled: digits and hex strings are also
matched with spaces removed, so "7 0 4 1" still matches "7041" for a tokenizer that decodes
digits with spaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_SPACES = re.compile(r"\s+")


def normalize_prediction(prediction: str) -> str:
    """The part of `prediction` that is scored: up to the first non-empty line break, lower-case."""
    text = prediction.strip()
    text = text.split("\n", 1)[0]
    return text.lower()


def _found(answer: str, pred: str, pred_nospace: str) -> bool:
    a = answer.strip().lower()
    if not a:
        raise ValueError("expected answers must be non-empty strings")
    if a in pred:
        return True
    # Answers without inner spaces (numbers, UUIDs, codes) also match with the prediction's
    # spaces removed (tokenizers that decode digit tokens with spaces between them).
    return " " not in a and a in pred_nospace


def score_sample(prediction: str, answers: Sequence[str] | str) -> float:
    """RULER string_match_all: fraction of `answers` contained in `prediction` (see module doc)."""
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise ValueError("a sample needs at least one expected answer")
    pred = normalize_prediction(prediction)
    pred_nospace = _SPACES.sub("", pred)
    return sum(_found(a, pred, pred_nospace) for a in answers) / len(answers)


def exact_match(prediction: str, answers: Sequence[str] | str) -> bool:
    """Whether every answer was found (score 1.0)."""
    return score_sample(prediction, answers) == 1.0


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
