"""AnswerRule: extraction per format, normalisation, numeric equality, reference(), math-verify."""

import pickle
import threading

import pytest

from effsft.corpus.answer import ANSWER_FORMATS, AnswerRule, normalize_answer

PREFIX = AnswerRule("answer_prefix")
NUMBER = AnswerRule("last_number")
GSM8K = AnswerRule("gsm8k")
BOXED = AnswerRule("boxed")


# --- answer_prefix --------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("342 + 100 = 442\nAnswer: 442", "442"),
    ("Answer: 42", "42"),
    ("steps\nAnswer: 42\n", "42"),
    ("Answer: 1\nAnswer: 2", "2"),  # last wins
    ("no answer here", None),
    ("", None),
    ("Answer:", None),  # empty after the marker: no answer
    ("Answer:   \n\n", None),
    ("Answer:\n42", "42"),  # the marker on its own line, answer on the next
    ("Answer: PLANET\nI hope this helps!", "PLANET"),  # only the first line after the marker
    ("The input is 'planet' (6 letters).\nAnswer: TENALP", "TENALP"),
    ("Answer: {\"name\": \"Kalo\", \"age\": 5}", "{\"name\": \"Kalo\", \"age\": 5}"),
    ("The word Answer: appears in the question. Let me think.\nAnswer: 7", "7"),
    ("Answer: 7\nWait, let me double-check.\nAnswer: 8", "8"),
    ("answer: 5", None),  # the marker is case-sensitive
    ("Final Answer: 12", "12"),
    ("**Answer:** 42", "** 42"),  # markdown is left to normalisation
    ("Answer:  -3.5  ", "-3.5"),
    ("Answer: \u22123", "\u22123"),
    ("Answer: New York City", "New York City"),
    ("Answer: 1,234.", "1,234."),
    ("The letters are p, l, a, n, e, t.\nAnswer: 1", "1"),
])
def test_answer_prefix_extract(text, expected):
    assert PREFIX.extract(text) == expected


@pytest.mark.parametrize("completion,gold,ignore_case,expected", [
    ("Answer: PLANET", "PLANET", False, True),
    ("Answer: planet", "PLANET", False, False),  # the "upper case" task must not accept lower case
    ("Answer: planet", "PLANET", True, True),
    ("Answer: Planet.", "planet", True, True),
    ("Answer: 442.", "442", False, True),
    ("Answer: **42**", "42", False, True),
    ("**Answer:** 42", "42", False, True),
    ("Answer: 42.0", "42", False, True),
    ("Answer: 43", "42", False, False),
    ("Answer: New  York", "New York", False, True),
    ("Answer: NewYork", "New York", False, False),
    ("no answer", "42", False, False),
    ("Answer:", "", False, False),  # an empty answer never matches, not even an empty gold
    ("Answer: {\"name\": \"Kalo\", \"age\": 5}", "{\"name\": \"Kalo\", \"age\": 5}", False, True),
    ("Answer: {\"name\": \"Kalo\", \"age\": 5}", "{\"name\": \"Kalo\", \"age\": 6}", False, False),
    ("Answer: 'tenalp'", "tenalp", False, True),
])
def test_answer_prefix_match(completion, gold, ignore_case, expected):
    assert AnswerRule("answer_prefix", ignore_case=ignore_case).match(completion, gold) is expected


# --- last_number ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("So, 3 + 4 = 7. Therefore the answer is 7.", "7"),
    ("I think 12 apples, no wait 13", "13"),  # last wins
    ("The answer is $1,234.", "1,234"),
    ("She has 1,234,567 dollars", "1,234,567"),
    ("Temperature: -3.5 degrees", "-3.5"),
    ("x = \u22124", "\u22124"),  # unicode minus
    ("Half of it: 3/4 of the cake", "3/4"),
    ("The answer is 3/4.", "3/4"),
    ("The ratio is $\\frac{3}{4}$.", "3/4"),
    ("H2O has 3 atoms", "3"),  # digits inside a word are not a number
    ("I used gpt4 for this", None),
    ("COVID-19 started then", None),
    ("version v1.2.3", None),
    ("So the answer is...42", "42"),
    ("Release 3.5.1 is out", "3.5"),
    ("no numbers here", None),
    ("", None),
    ("10 - 3 = 7\n\nSo 7 remain.\n", "7"),
    ("10-3", "3"),  # a hyphen between digits is subtraction, not a sign
    ("It costs .5 dollars", ".5"),
    ("It is 12cm long.", "12"),
    ("Values: 1, 2, 3", "3"),
    ("The total is 2,000, not 3,000.", "3,000"),
    ("+7 points", "+7"),
    ("**42**", "42"),
])
def test_last_number_extract(text, expected):
    assert NUMBER.extract(text) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("The answer is $1,234.", "1234", True),
    ("The answer is 42.", "42.0", True),
    ("The answer is 42,", "42", True),
    ("So the answer is 0.5", "1/2", True),
    ("So the answer is 1/2", "0.5", True),
    ("The answer is \u22123", "-3", True),
    ("The answer is -3", "3", False),
    ("About 0.333", "1/3", False),  # exact rationals, no rounding
    ("The answer is 7.", "Natalia sold 48 clips ... 48 + 24 = 72 clips.\n#### 72", False),
    ("The answer is 72.", "Natalia sold 48 clips ... 48 + 24 = 72 clips.\n#### 72", True),
    ("x is 5", "x = 5", True),
    ("nothing", "5", False),
])
def test_last_number_match(completion, gold, expected):
    assert NUMBER.match(completion, gold) is expected


# --- gsm8k ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 72", "72"),
    ("####72", "72"),
    ("#### 1,234", "1,234"),
    ("#### -5", "-5"),
    ("#### 7\n", "7"),
    ("12 then\n#### 5\nthen 9", "5"),  # the rest of that line, not the last number
    ("#### 3\n#### 4", "4"),  # last wins
    ("####", None),
    ("#### \nmore text", None),  # empty line after the marker
    ("no marker 42", None),
    ("", None),
    ("#### 18 dollars", "18 dollars"),
    ("#### $18.", "$18."),
    ("Step 1: 2 * 3 = 6\nStep 2: 6 + 1 = 7\n#### 7", "7"),
    ("## 7", None),
    ("The answer:\n#### \u221212", "\u221212"),
    ("#### 0.25", "0.25"),
    ("#### 3/4", "3/4"),
    ("#### yes", "yes"),
    ("#### 42 #### 43", "43"),
    ("####  9  ", "9"),
])
def test_gsm8k_extract(text, expected):
    assert GSM8K.extract(text) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("Janet has 16 - 3 - 4 = 9 eggs.\n#### 9", "Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 9", True),
    ("#### 18 dollars", "#### 18", False),
    ("#### $18.", "#### 18", True),
    ("#### 1,234", "1234", True),
    ("#### 10", "#### 9", False),
    ("The answer is 9", "#### 9", False),  # no marker in the completion
])
def test_gsm8k_match(completion, gold, expected):
    assert GSM8K.match(completion, gold) is expected


# --- boxed ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("so the result is \\boxed{42}.", "42"),
    ("first \\boxed{3} then \\boxed{4}", "4"),  # last wins
    ("\\boxed{x^{2}+1}", "x^{2}+1"),  # nested braces
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("The final answer is $\\boxed{-7}$.", "-7"),
    ("\\fbox{5}", "5"),
    ("\\boxed{1} and finally \\fbox{2}", "2"),
    ("\\fbox{1} and finally \\boxed{2}", "2"),
    ("\\boxed{", None),  # unbalanced
    ("\\boxed{\\frac{1}{2}", None),
    ("\\boxed{3} and then \\boxed{4", None),  # the last box is unbalanced: no answer
    ("\\boxed{}", None),  # empty
    ("no box 42", None),
    ("", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not nest
    ("\\boxed{\\text{yes}}", "\\text{yes}"),
    ("\\boxed{ 12 }", "12"),
    ("Thus:\n\\[\n\\boxed{\n  3\n}\n\\]", "3"),
    ("\\boxed{a}{b}", "a"),
    ("boxed{5}", None),  # no backslash: not a box
    ("\\boxed{{{1}}}", "{{1}}"),
])
def test_boxed_extract(text, expected):
    assert BOXED.extract(text) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("so the result is \\boxed{42}.", "42", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),  # \frac{1}{2} normalises to 1/2 == 0.5
    ("\\boxed{x^{2}+1}", "\\boxed{x^{2} + 1}", True),
    ("\\boxed{-3}", "3", False),
    ("\\boxed{\\text{yes}}", "yes", True),
    ("\\boxed{yes}", "no", False),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{2}", "The answer is \\boxed{2}.", True),
])
def test_boxed_match(completion, gold, expected):
    assert BOXED.match(completion, gold) is expected


# --- regex ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,text,expected", [
    (r"The answer is (\w+)", "The answer is 42.", "42"),
    (r"The answer is (\w+)", "The answer is 4. No wait, The answer is 5.", "5"),  # last match wins
    (r"The answer is (\w+)", "I do not know.", None),
    (r"The answer is (\w+)", "", None),
    (r"(?i)the answer is (\w+)", "THE ANSWER IS PLANET", "PLANET"),
    (r"the answer is (\w+)", "THE ANSWER IS PLANET", None),  # patterns are case-sensitive
    (r"\d+", "12 and 34", "34"),  # no group: the whole match
    (r"[A-D]\)", "I pick B) because ... actually C)", "C)"),
    (r"\(([A-D])\)", "Options (A) (B); my choice is (D)", "D"),
    (r"Final: (.*)", "Final: New York\nFinal: Paris", "Paris"),  # . stops at a newline
    (r"<answer>(.*?)</answer>", "<answer>3</answer> then <answer>4</answer>", "4"),
    (r"<answer>(.*?)</answer>", "<answer></answer>", None),  # empty group: no answer
    (r"<answer>(?s:(.*?))</answer>", "<answer>\nline1\nline2\n</answer>", "line1\nline2"),
    (r"(\d+)(?: apples)?", "5 apples and 6", "6"),
    (r"x = (-?\d+)", "x = -3", "-3"),
    (r"x = (-?\d+)|y = (\d+)", "y = 4", None),  # group 1 did not take part in the match
    (r"=\s*(\S+)\s*$", "a = 1\nb = 2", "2"),
    (r"(?m)^= (\S+)$", "= 1\n= 2\ntext", "2"),
    (r"\*\*(.+?)\*\*", "The answer is **42**.", "42"),
    (r"#### (.*)", "#### 72", "72"),
    (r"Answer: (\w+)", "Answer: yes\nAnswer: no", "no"),
    (r"(\d+)/(\d+)", "ratio 3/4", "3"),  # group 1 only, even with more groups
])
def test_regex_extract(pattern, text, expected):
    assert AnswerRule("regex", pattern=pattern).extract(text) == expected


@pytest.mark.parametrize("pattern,completion,gold,ignore_case,expected", [
    (r"The answer is (\S+)", "The answer is 42.", "42", False, True),
    (r"The answer is (\S+)", "The answer is Paris.", "paris", False, False),
    (r"The answer is (\S+)", "The answer is Paris.", "paris", True, True),
    (r"<answer>(.*?)</answer>", "<answer>7</answer>", "<answer>7.0</answer>", False, True),
    (r"<answer>(.*?)</answer>", "<answer>7</answer>", "7", False, True),  # no match in gold: whole gold
])
def test_regex_match(pattern, completion, gold, ignore_case, expected):
    assert AnswerRule("regex", pattern=pattern, ignore_case=ignore_case).match(completion, gold) is expected


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,names", [
    ({"format": "bogus"}, "answer.format"),
    ({"format": "Boxed"}, "answer.format"),
    ({"format": "regex"}, "answer.pattern"),  # pattern required for regex
    ({"format": "regex", "pattern": ""}, "answer.pattern"),
    ({"format": "regex", "pattern": "(unclosed"}, "answer.pattern"),
    ({"format": "regex", "pattern": "*bad"}, "answer.pattern"),
    ({"format": "boxed", "pattern": r"\d+"}, "answer.pattern"),  # refused for other formats
])
def test_validation_errors(kwargs, names):
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        AnswerRule(**kwargs)


def test_rule_defaults_formats_and_pickling():
    assert AnswerRule() == AnswerRule("answer_prefix")
    assert set(ANSWER_FORMATS) == {"answer_prefix", "last_number", "gsm8k", "boxed", "regex"}
    rule = AnswerRule("regex", pattern=r"is (\d+)", ignore_case=True)
    copy = pickle.loads(pickle.dumps(rule))  # rules travel to Ray workers
    assert copy == rule and hash(copy) == hash(rule) and copy.extract("is 3") == "3"


# --- normalisation and numeric equality -----------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    ("  42  ", "42"),
    ("$42$", "42"),
    ("$1,234.", "1234"),
    ("**42**.", "42"),
    ("`yes`", "yes"),
    ("\"PLANET\"", "PLANET"),
    ("\u201cPLANET\u201d", "PLANET"),
    ("'tenalp'!", "tenalp"),
    ("42;", "42"),
    ("42?!", "42"),
    ("New   York", "New York"),
    ("New\nYork", "New York"),
    ("x^{2} + 1", "x^{2}+1"),
    ("\u22123", "-3"),
    ("\u20133", "-3"),
    ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\frac{1+x}{2}", "(1+x)/2"),
    ("\\frac{\\frac{1}{2}}{3}", "(1/2)/3"),
    ("\\text{yes}", "yes"),
    ("\\text{5 apples}", "5 apples"),
    ("1,234,567", "1234567"),
    ("1,2345", "1,2345"),  # not a thousands grouping
    ("[12, 345]", "[12,345]"),  # a list stays a list
    ("PLANET", "PLANET"),  # no case folding by default
])
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_ignore_case():
    assert normalize_answer("PLANET", ignore_case=True) == normalize_answer("planet", ignore_case=True)
    assert normalize_answer("Stra\u00dfe", ignore_case=True) == "strasse"  # casefold, not lower


@pytest.mark.parametrize("a,b,expected", [
    ("42", "42.0", True),
    ("42", "42,", True),
    ("42", "042", True),
    ("1/2", "0.5", True),
    ("2/4", "1/2", True),
    ("-3", "3", False),
    ("\u22123", "-3", True),
    ("0.333", "1/3", False),
    ("1,234", "1234", True),
    ("1e3", "1000", True),
    ("+5", "5", True),
    ("1/0", "1/0", True),  # not a number (zero denominator), but the same string
    ("1/0", "2/0", False),
    ("5 apples", "5", False),
    ("yes", "yes", True),
    ("", "", False),  # empty never matches
    ("$", "", False),
    (None, "42", False),
    ("42", None, False),
])
def test_equivalent(a, b, expected):
    assert AnswerRule().equivalent(a, b) is expected


# --- reference ------------------------------------------------------------------------------

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("rule,gold,expected", [
    (GSM8K, GSM8K_GOLD, "72"),
    (GSM8K, "72", "72"),  # no marker: whole gold
    (GSM8K, "####", "####"),  # marker without an answer: whole gold
    (NUMBER, GSM8K_GOLD, "72"),
    (NUMBER, "x = -3", "-3"),
    (NUMBER, "\\frac{1}{2}", "\\frac{1}{2}"),  # already a number: kept whole
    (NUMBER, "yes", "yes"),
    (BOXED, "\\boxed{3}", "3"),
    (BOXED, "The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    (BOXED, "\\boxed{3", "\\boxed{3"),  # unbalanced: whole gold
    (BOXED, " 3 ", "3"),
    (PREFIX, "Answer: 42", "42"),
    (PREFIX, "The input is 'planet'.\nAnswer: TENALP", "TENALP"),
    (PREFIX, "TENALP", "TENALP"),
    (AnswerRule("regex", pattern=r"<a>(.*?)</a>"), "<a>5</a>", "5"),
    (AnswerRule("regex", pattern=r"<a>(.*?)</a>"), "5", "5"),
])
def test_reference(rule, gold, expected):
    assert rule.reference(gold) == expected


# --- math-verify ----------------------------------------------------------------------------

MATH = AnswerRule("boxed", math_verify=True)


@pytest.mark.parametrize("completion,gold,plain,with_math", [
    ("\\boxed{\\frac{1}{2}}", "0.5", True, True),  # already equal after normalisation
    ("\\boxed{\\frac12}", "0.5", False, True),
    ("\\boxed{2^{-1}}", "0.5", False, True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "sqrt(2)/2", False, True),
    ("\\boxed{\\sqrt{4}}", "2", False, True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", False, True),
    ("\\boxed{10\\%}", "0.1", False, True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{3}/2", False, False),
    ("\\boxed{0.333}", "1/3", False, False),
    ("\\boxed{-3}", "3", False, False),
    ("\\boxed{Kaol}", "Kalo", False, False),  # words are not products of symbols
    ("\\boxed{tenalp}", "planet", False, False),
    ("\\boxed{a}", "A", False, False),  # case still matters
    ("no box", "0.5", False, False),
])
def test_math_verify(completion, gold, plain, with_math):
    assert BOXED.match(completion, gold) is plain
    assert MATH.match(completion, gold) is with_math


def test_math_verify_outside_the_main_thread():
    """Ray runs tasks in worker threads, where math-verify's SIGALRM timeouts would raise."""
    got = []
    t = threading.Thread(target=lambda: got.append(MATH.match("\\boxed{\\frac12}", "0.5")))
    t.start()
    t.join()
    assert got == [True]


def test_math_verify_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "math_verify" else real(n, *a))
    with pytest.raises(ImportError, match=r"effsft\[math\]"):
        AnswerRule("boxed", math_verify=True)


def test_answer_prefix_scores_the_synthetic_corpus_as_its_labels_say():
    """Normalisation must neither reject a clean synth answer nor accept a noisy one."""
    import json

    from effsft.corpus.synth import SynthSettings, heldout_rows, train_rows

    s = SynthSettings(rows=1500, noise=0.3, dup=0.0, seed=7)
    for e in heldout_rows(s, 100, "eval"):
        assert PREFIX.match(e["response"], e["answer"]), e
    for r in train_rows(s):
        meta = json.loads(r["meta"])
        assert PREFIX.match(r["messages"][-1]["content"], meta["answer"]) is not meta["noisy"], (r, meta)
