"""Dense shaping rewards for smoke tests and demos (same signature as every reward function:
``f(prompts, completions, **columns) -> list[float | None]``).

Why: an untrained model almost never gets an exact-match reward, so every group has equal
rewards, zero advantages and a zero gradient; a dense reward gives the groups variance.
"""
from __future__ import annotations


def digit_ratio(prompts, completions, **columns) -> list[float]:
    """Fraction of the completion's non-space characters that are digits (0 for an empty one)."""
    out = []
    for c in completions:
        chars = [ch for ch in str(c) if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0)
    return out


def answer_format(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion has an ``Answer: <x>`` line (the synthetic corpus' format)."""
    return [1.0 if "Answer:" in str(c) else 0.0 for c in completions]
