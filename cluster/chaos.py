"""`--chaos KIND@STEP`: kill one actor after a batch's decode step (no Ray here: launch parses it
before Ray starts)."""

from __future__ import annotations

from dataclasses import dataclass

CHAOS_KINDS = ("kill-worker", "kill-cold-tier")


@dataclass(frozen=True)
class Chaos:
    """Kill one actor after a batch's decode step `step` (1 = the first step after prefill).

    A batch asking for n new tokens runs decode steps 1 .. n-1 (prefill gives the first token),
    so `step` must be below every request's max_new_tokens for the kill to happen (last_step).
    """

    kind: str
    step: int

    @classmethod
    def parse(cls, text: str) -> "Chaos":
        kind, sep, step = text.partition("@")
        if kind not in CHAOS_KINDS or not sep or not step.isdigit() or int(step) < 1:
            raise ValueError(f"--chaos {text!r}: expected one of {', '.join(k + '@STEP' for k in CHAOS_KINDS)}, STEP >= 1")
        return cls(kind, int(step))

    @staticmethod
    def last_step(max_new_tokens: int) -> int:
        """The last decode step a batch of requests for `max_new_tokens` tokens runs (0: none)."""
        return max_new_tokens - 1
