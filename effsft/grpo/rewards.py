"""Reward functions for GRPO (docs/algorithms/prefix_grouper_grpo.md §3 Rewards).

A reward function is ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's calling
convention: the dataset's extra columns arrive as keyword lists; ``None`` = "no opinion", skipped
in the advantage statistics). Functions are named in configs as ``"pkg.mod:callable"``.
"""

from __future__ import annotations

import importlib
from typing import Callable

from effsft.corpus.answer import AnswerRule

RewardFn = Callable[..., list]

# math_exact_match's precedence: a boxed answer, else a GSM8K "#### x" line, else the last number.
_MATH_CHAIN = (AnswerRule("boxed"), AnswerRule("gsm8k"), AnswerRule("last_number"))


def _first_answer(text: str) -> str | None:
    for rule in _MATH_CHAIN:
        found = rule.extract(text)
        if found is not None:
            return found
    return None


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

    The final answer, of the completion and of the reference alike, is the last ``\\boxed{}``,
    else the ``#### x`` line, else the last number; a reference with none is compared whole.
    Equality is :meth:`AnswerRule.equivalent` (exact rationals, else normalised strings).

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
        ref_text = str(ref).strip()
        ref_ans = _first_answer(ref_text)
        if ref_ans is None:  # a bare reference like "yes" has no number: compare it whole
            ref_ans = ref_text
        out.append(1.0 if _MATH_CHAIN[0].equivalent(_first_answer(_text(comp)), ref_ans) else 0.0)
    return out


def exact_match_reward(rule: AnswerRule) -> RewardFn:
    """A reward function scoring 1.0 when ``rule.match(completion, answer)``, else 0.0.

    Args:
        rule: how to extract and compare answers.

    Returns:
        ``f(prompts, completions, answer, **kwargs) -> list[float | None]`` (completions as
        strings or chat message lists; a missing reference answer gives None).
    """
    def reward(prompts, completions, answer, **kwargs) -> list[float | None]:
        return [None if ref is None else float(rule.match(_text(comp), str(ref)))
                for comp, ref in zip(completions, answer, strict=True)]

    reward.__name__ = f"exact_match_{rule.format}"  # TRL logs rewards under the function's name
    return reward


BUILTIN_REWARDS: dict[str, RewardFn] = {"math_exact_match": math_exact_match}
# ``exact_match``: the job's own answer rule (``answer.*``), the rule eval's exact match uses.
RULE_REWARDS = ("exact_match",)


def load_reward_fn(spec: str, rule: AnswerRule | None = None) -> RewardFn:
    """Resolve ``"pkg.mod:callable"`` or a built-in name: ``exact_match`` (``rule``, default
    :class:`AnswerRule`'s answer_prefix) or ``math_exact_match``.

    Raises:
        ValueError: malformed spec, module not importable, attribute missing or not callable.
    """
    if spec in RULE_REWARDS:
        return exact_match_reward(rule or AnswerRule())
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r} must look like 'package.module:callable' "
            f"(or be a built-in: {sorted([*BUILTIN_REWARDS, *RULE_REWARDS])})"
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
