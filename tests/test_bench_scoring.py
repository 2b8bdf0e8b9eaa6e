"""RULER string-match scoring."""

from __future__ import annotations

import pytest

from benchmarks.suite.scoring import exact_match, score_sample


def test_single_answer_substring_case_insensitive():
    assert score_sample(" The pass key is 71432.", ["71432"]) == 1.0
    assert score_sample("71433", "71432") == 0.0
    assert score_sample("  ZEBRA and lion", ["zebra"]) == 1.0


def test_partial_credit_for_multiple_answers():
    assert score_sample("1234567, 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert exact_match("a b c", ["a", "c"]) and not exact_match("a b", ["a", "c"])


def test_only_the_first_line_counts_and_spaced_digits_match():
    assert score_sample("nothing here\n71432", ["71432"]) == 0.0
    assert score_sample("\n\n71432\nmore", ["71432"]) == 1.0  # leading blank lines are skipped
    assert score_sample("7 1 4 3 2", ["71432"]) == 1.0
    assert score_sample("red fox", ["redfox"]) == 1.0  # answers without spaces match space-free
    assert score_sample("redfox", ["red fox"]) == 0.0


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        score_sample("x", [])
    with pytest.raises(ValueError, match="non-empty"):
        score_sample("x", [" "])
