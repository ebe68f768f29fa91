"""Reward functions for GRPO (spec §3 Rewards).

A reward function is ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's calling
convention: the dataset's extra columns arrive as keyword lists; ``None`` = "no opinion", skipped
in the advantage statistics). Functions are named in configs as ``"pkg.mod:callable"``.
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Callable

RewardFn = Callable[..., list]

_BOXED = "\\boxed{"
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces may nest), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: treat as absent


def extract_answer(text: str) -> str | None:
    """Final answer of a solution: last ``\\boxed{}``, else ``#### x``, else the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(ans: str) -> str:
    """Strip whitespace, ``$``, thousands separators and a trailing period; ``\\frac{a}{b}`` -> ``a/b``."""
    s = ans.replace("$", "").strip()
    s = _FRAC.sub(r"\1/\2", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = s.rstrip(".").strip()
    return re.sub(r"\s+", "", s)


def _as_rational(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Exact rational equality when both parse as numbers, else normalised string equality."""
    if pred is None or ref is None:
        return False
    p, r = normalize_answer(pred), normalize_answer(ref)
    pq, rq = _as_rational(p), _as_rational(r)
    if pq is not None and rq is not None:
        return pq == rq
    return p == r


def _text(completion) -> str:
    """A completion as text: a string, or a chat message list (last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return _text(completion[-1])
    return str(completion)


def math_exact_match(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    Args:
        prompts: unused (kept for the reward-function signature).
        completions: N completions (strings or chat message lists).
        answer: N reference solutions/answers (the ``answer`` column); a missing one gives None.

    Returns:
        N rewards.
    """
    out: list[float | None] = []
    for comp, ref in zip(completions, answer, strict=True):
        if ref is None:
            out.append(None)
            continue
        ref_text = str(ref)
        ref_ans = extract_answer(ref_text)
        if ref_ans is None:  # a bare reference like "yes" has no number: compare it whole
            ref_ans = ref_text
        out.append(1.0 if answers_match(extract_answer(_text(comp)), ref_ans) else 0.0)
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {"math_exact_match": math_exact_match}


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve ``"pkg.mod:callable"`` (or a built-in name such as ``"math_exact_match"``).

    Raises:
        ValueError: malformed spec, module not importable, attribute missing or not callable.
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r} must look like 'package.module:callable' "
            f"(or be a built-in: {sorted(BUILTIN_REWARDS)})"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is not callable (got {type(obj).__name__})")
    return obj
