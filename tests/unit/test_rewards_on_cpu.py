"""math_exact_match, exact_match_reward and the reward-function resolver."""

import pytest

from effsft.corpus.answer import AnswerRule
from effsft.grpo.rewards import exact_match_reward, load_reward_fn, math_exact_match


@pytest.mark.parametrize("completion,answer,expected", [
    ("so the result is \\boxed{42}.", "#### 42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # exact rationals: 1/2 == 0.5
    ("first \\boxed{3} then \\boxed{4}", "4", 1.0),  # last boxed wins
    ("\\boxed{x^{2}+1}", "\\boxed{x^{2} + 1}", 1.0),  # nested braces, whitespace stripped
    ("The answer is $1,234.", "Natalia sold ... #### 1234", 1.0),  # $, thousands separator, trailing period
    ("I think 12 apples, no wait 13", "13", 1.0),  # last number
    ("#### 7\n", "7.0", 1.0),
    ("0.333", "1/3", 0.0),  # not exactly equal
    ("\\boxed{-3}", "3", 0.0),
    ("no number here", "5", 0.0),
    ("\\boxed{yes}", "yes", 1.0),  # string compare
    ("\\boxed{yes}", "no", 0.0),
])
def test_math_exact_match(completion, answer, expected):
    assert math_exact_match(["p"], [completion], answer=[answer]) == [expected]


def test_chat_completions_and_missing_reference():
    comps = [[{"role": "assistant", "content": "\\boxed{2}"}], "2"]
    assert math_exact_match(["a", "b"], comps, answer=["2", None]) == [1.0, None]


@pytest.mark.parametrize("completion,answer,expected", [
    ("12 then\n#### 5\nthen 9", "5", 1.0),  # #### (rest of line) beats the last number
    ("12 then\n#### 5\nthen 9", "9", 0.0),
    ("\\boxed{1} #### 5", "1", 1.0),  # boxed beats ####
    ("\\boxed{1} #### 5", "5", 0.0),
    ("\\boxed{1 #### 5", "5", 1.0),  # an unbalanced box is no answer: #### next
    ("nothing", "nothing", 0.0),  # no answer in the completion
])
def test_extract_order(completion, answer, expected):
    assert math_exact_match(["p"], [completion], answer=[answer]) == [expected]


def test_exact_match_reward():
    fn = exact_match_reward(AnswerRule("answer_prefix"))
    comps = ["steps\nAnswer: PLANET", [{"role": "assistant", "content": "Answer: planet"}], "no answer", "x"]
    assert fn(["p"] * 4, comps, answer=["PLANET", "PLANET", "PLANET", None], task=["string"] * 4) == [1.0, 0.0, 0.0, None]
    assert exact_match_reward(AnswerRule("answer_prefix", ignore_case=True))(["p"], ["Answer: planet"], answer=["PLANET"]) == [1.0]
    gsm = exact_match_reward(AnswerRule("gsm8k"))
    assert gsm(["p", "p"], ["so 9\n#### 9", "#### 8"], answer=["16 - 3 - 4 = 9\n#### 9"] * 2) == [1.0, 0.0]
    assert gsm.__name__ == "exact_match_gsm8k"
    with pytest.raises(ValueError):
        fn(["p"], ["a", "b"], answer=["a"])  # completions and answers must pair up


def test_load_reward_fn():
    assert load_reward_fn("effsft.grpo.rewards:math_exact_match") is math_exact_match
    assert load_reward_fn("math_exact_match") is math_exact_match
    assert load_reward_fn("os.path:join")("a", "b").endswith("b")
    for bad, msg in [("nocolon", "package.module:callable"), ("no_such_mod_xyz:f", "cannot import"),
                     ("effsft.grpo.rewards:nope", "no attribute"), ("effsft.grpo.rewards:BUILTIN_REWARDS", "not callable")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(bad)
