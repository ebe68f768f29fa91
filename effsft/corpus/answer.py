"""The answer rule: how a completion's final answer is found and compared with the gold answer.

One rule serves eval's exact match (:func:`effsft.eval.metrics.exact_match`) and GRPO's rewards
(:mod:`effsft.grpo.rewards`), so a model is scored the same way in both. Pure Python.

Formats (``AnswerRule.format``); each finds the *last* candidate, since chat models restate
intermediate results before the final one:

* ``answer_prefix``: the first line of the text after the last ``Answer:`` (the synthetic
  corpus's responses end with ``Answer: <x>``).
* ``last_number``: the last number: integers, decimals, thousands separators (``1,234``),
  signs (ASCII or the unicode minus), simple fractions (``3/4``, also ``\\frac{3}{4}``). A number
  glued after a letter (``H2O``, ``gpt4``, ``v1.2``, ``COVID-19``) is part of a word, not a number.
* ``gsm8k``: the rest of the line after the last ``####``.
* ``boxed``: the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces may nest; an
  unbalanced last box gives no answer).
* ``regex``: the last match of ``AnswerRule.pattern``: its group 1 if the pattern has a group,
  else the whole match. Write ``(?i)`` in the pattern to match it case-insensitively.

An empty candidate (``"Answer:"`` with nothing after it, ``\\boxed{}``) counts as no answer:
``extract`` returns None and nothing matches it.

Normalisation (:func:`normalize_answer`, applied to both sides before comparing):

1. unicode minus and dashes become ``-``;
2. ``\\text{x}`` (also ``\\textbf``, ``\\mathrm``, ``\\mbox``) becomes ``x``;
   ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``) becomes ``a/b`` (``(a)/(b)`` for compound parts);
3. surrounding whitespace, ``$``, markdown ``*``/backticks, quotes and trailing punctuation
   (``. , ; : ! ?``) are stripped, repeatedly (``**42**.`` -> ``42``);
4. thousands separators inside numbers are dropped (``1,234`` -> ``1234``);
5. whitespace runs collapse to one space, and whitespace next to a symbol is dropped
   (``x^{2} + 1`` == ``x^{2}+1``, while ``New York`` keeps its space);
6. case-folding only with ``ignore_case`` (case-sensitive by default, like lm-eval-harness: an
   "upper case" task must not accept a lower-case answer).

Comparison (:meth:`AnswerRule.equivalent`): when both normalised sides are numbers they are
compared exactly as :class:`fractions.Fraction` (``42 == 42.0``, ``1/2 == 0.5``, ``0.333 != 1/3``);
otherwise as strings. When they differ and ``math_verify`` is set, the ``math-verify`` package
decides mathematical equivalence (``\\frac{\\sqrt{2}}{2}`` == ``sqrt(2)/2``), but only for
sides that look like mathematics (no word of two or more letters outside LaTeX commands and
function names) and do not differ by case alone: it reads a word as a product of symbols and
folds case, so it would accept ``Kaol`` for ``Kalo`` and ``a`` for ``A``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field
from fractions import Fraction

ANSWER_FORMATS = ("answer_prefix", "last_number", "gsm8k", "boxed", "regex")

_PREFIX = "Answer:"
_HASHES = "####"
_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_DASHES = re.compile("[\u2010\u2011\u2012\u2013\u2014\u2212\ufe63\uff0d]")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_SIMPLE = re.compile(r"-?[\w.]+")
_WRAPPERS = " \t\r\n$*`\"'\u201c\u201d\u2018\u2019"
_TRAILING = ".,;:!?"
_THOUSANDS = re.compile(r"(?<![\d,])\d{1,3}(?:,\d{3})+(?![\d])(?!,\d)")
# A number: not glued after a letter, digit or underscore, nor continuing a dotted run
# (``v1.2.3``), nor after a hyphen that follows a letter (``COVID-19``). Thousands groups are
# tried before plain digit runs.
_NUMBER = re.compile(
    r"(?<!\w)(?<!\d\.)(?<![A-Za-z]-)"
    r"(?:[-+\u2212](?=\.?\d))?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+/\d+(?!\.?\d)|\d+(?:\.\d+)?|(?<!\.)\.\d+)"
)
_NUMERIC = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\d+/\d+")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_FUNCTION_NAMES = re.compile(r"(?<![A-Za-z])(?:sqrt|sin|cos|tan|log|ln|exp|pi|oo|inf)(?![A-Za-z])")
_WORD = re.compile(r"[A-Za-z]{2,}")
_MATH_EXTRA = "math-verify is not installed: pip install 'effsft[math]' (the `math` extra)"


@dataclass(frozen=True)
class AnswerRule:
    """How to find a completion's final answer and compare it with the gold answer.

    Attributes:
        format: one of :data:`ANSWER_FORMATS` (see the module docstring).
        pattern: for format ``regex`` only (required there): the answer is the last match's
            group 1 if the pattern has a group, else the whole match.
        ignore_case: compare case-insensitively (default: case-sensitive).
        math_verify: when the normalised answers differ, also accept mathematical equivalence
            decided by the ``math-verify`` package (the ``math`` extra).

    Raises:
        ValueError: unknown format, a pattern missing for ``regex`` or given for another
            format, a pattern that does not compile (the message names ``answer.format`` or
            ``answer.pattern``).
        ImportError: ``math_verify`` set but the package is not installed.
    """

    format: str = "answer_prefix"
    pattern: str | None = None
    ignore_case: bool = False
    math_verify: bool = False
    _regex: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.format not in ANSWER_FORMATS:
            raise ValueError(f"answer.format must be one of {list(ANSWER_FORMATS)}, got {self.format!r}")
        if self.format != "regex":
            if self.pattern is not None:
                raise ValueError(f"answer.pattern is only for answer.format 'regex' (format is {self.format!r})")
        else:
            object.__setattr__(self, "_regex", _compile(self.pattern))
        if self.math_verify and importlib.util.find_spec("math_verify") is None:
            raise ImportError(f"AnswerRule(math_verify=True): {_MATH_EXTRA}")

    def extract(self, text: str) -> str | None:
        """The candidate answer of a completion (stripped), or None when the format finds none."""
        if self.format == "answer_prefix":
            found = _after_last_prefix(text)
        elif self.format == "last_number":
            found = _last_number(text)
        elif self.format == "gsm8k":
            found = _after_last_hashes(text)
        elif self.format == "boxed":
            found = _last_boxed(text)
        else:
            found = _last_regex_match(self._regex, text)
        found = found.strip() if found is not None else None
        return found or None  # an empty answer is no answer

    def reference(self, gold: str) -> str:
        """The gold answer as compared: reduced by :meth:`extract` when it carries the format's
        marker (a GSM8K solution ``... #### 42`` -> ``42``, ``\\boxed{3}`` -> ``3``), else whole.

        For ``last_number`` the marker is a number: a gold that is not itself a number is
        reduced to its last number (``x = -3`` -> ``-3``); for ``regex`` it is a pattern match.
        """
        gold = str(gold).strip()
        if self.format == "last_number" and _as_number(normalize_answer(gold)) is not None:
            return gold  # already a number, e.g. \frac{1}{2}, whose digits are not its last number
        reduced = self.extract(gold) if self._has_marker(gold) else None
        return gold if reduced is None else reduced

    def match(self, completion: str, gold: str) -> bool:
        """Whether the completion's extracted answer equals the gold answer under this rule."""
        return self.equivalent(self.extract(completion), self.reference(gold))

    def equivalent(self, candidate: str | None, reference: str | None) -> bool:
        """Compare two already-extracted answers: numbers exactly, else normalised strings,
        else (with ``math_verify``) mathematical equivalence. None or empty never matches."""
        if candidate is None or reference is None:
            return False
        a = normalize_answer(candidate, ignore_case=self.ignore_case)
        b = normalize_answer(reference, ignore_case=self.ignore_case)
        if not a or not b:
            return False
        na, nb = _as_number(a), _as_number(b)
        if (na is not None and nb is not None and na == nb) or a == b:
            return True
        return self.math_verify and _math_equivalent(normalize_answer(candidate), normalize_answer(reference))

    def _has_marker(self, gold: str) -> bool:
        if self.format == "answer_prefix":
            return _PREFIX in gold
        if self.format == "gsm8k":
            return _HASHES in gold
        if self.format == "boxed":
            return any(opener in gold for opener in _BOX_OPENERS)
        return True  # last_number, regex: the extractor itself is the marker test


def normalize_answer(text: str, *, ignore_case: bool = False) -> str:
    """An answer in the canonical form compared by :class:`AnswerRule` (see the module docstring)."""
    s = _DASHES.sub("-", text)
    s = _TEXT.sub(r"\1", s)
    s = _rewrite_fracs(s)
    s = _strip_wrappers(s)
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r" (?=\W)|(?<=\W) ", "", s)  # spaces around symbols carry no meaning: x + 1 == x+1
    return s.casefold() if ignore_case else s


def _compile(pattern) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"answer.pattern is required for answer.format 'regex' (a regular expression), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"answer.pattern {pattern!r} is not a valid regular expression: {e}") from e


def _after_last_prefix(text: str) -> str | None:
    i = text.rfind(_PREFIX)
    if i < 0:
        return None
    rest = text[i + len(_PREFIX):].strip()
    return rest.splitlines()[0] if rest else ""


def _after_last_hashes(text: str) -> str | None:
    i = text.rfind(_HASHES)
    if i < 0:
        return None
    return text[i + len(_HASHES):].split("\n", 1)[0]


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(_rewrite_fracs(text))
    return found[-1] if found else None


def _last_boxed(text: str) -> str | None:
    start, opener = max((text.rfind(o), o) for o in _BOX_OPENERS)
    if start < 0:
        return None
    i = start + len(opener)
    depth, j = 1, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # an escaped brace \{ or \} does not nest
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[i:j]
        j += 1
    return None  # unbalanced: no answer


def _last_regex_match(regex: re.Pattern, text: str) -> str | None:
    last = None
    for last in regex.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if regex.groups else last.group(0)


def _rewrite_fracs(s: str) -> str:
    """``\\frac{a}{b}`` -> ``a/b`` (inner fractions first; compound parts parenthesised)."""
    def part(x: str) -> str:
        x = x.strip()
        return x if _SIMPLE.fullmatch(x) else f"({x})"

    for _ in range(8):  # nesting depth bound; each pass rewrites the innermost fractions
        new = _FRAC.sub(lambda m: f"{part(m.group(1))}/{part(m.group(2))}", s)
        if new == s:
            break
        s = new
    return s


def _strip_wrappers(s: str) -> str:
    while True:
        new = s.strip(_WRAPPERS).rstrip(_TRAILING)
        if new == s:
            return s
        s = new


def _as_number(s: str) -> Fraction | None:
    if not _NUMERIC.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _looks_mathematical(s: str) -> bool:
    s = _FUNCTION_NAMES.sub(" ", _LATEX_COMMAND.sub(" ", s))
    return not _WORD.search(s)


def _math_equivalent(a: str, b: str) -> bool:
    """math-verify's judgement on two normalised answers (False when either is not maths)."""
    if a.casefold() == b.casefold() or not (_looks_mathematical(a) and _looks_mathematical(b)):
        return False
    mv = _math_verify()
    # timeout_seconds=None: its timeout uses SIGALRM, which raises outside the main thread
    # (Ray runs tasks in worker threads).
    return bool(mv.verify(_math_parse(b), _math_parse(a), timeout_seconds=None))


@functools.lru_cache(maxsize=4096)  # a GRPO group compares many completions with one gold
def _math_parse(s: str):
    return _math_verify().parse(f"${s}$", parsing_timeout=None)


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError(f"AnswerRule(math_verify=True): {_MATH_EXTRA}") from e
    return math_verify


# ---- the config section (eval's exact match and GRPO's exact_match reward) -----------------
from typing import Literal, Optional  # noqa: E402

from pydantic import model_validator  # noqa: E402

from effsft.config import Strict  # noqa: E402


class AnswerSpec(Strict):
    """``answer.*``: the answer rule of a job (see :class:`AnswerRule`)."""

    format: Literal["answer_prefix", "last_number", "gsm8k", "boxed", "regex"] = "answer_prefix"
    pattern: Optional[str] = None     # format regex: the answer is the last match (its group 1)
    ignore_case: bool = False
    math_verify: bool = False         # also accept mathematical equivalence (the `math` extra)

    @model_validator(mode="after")
    def _valid(self):
        try:
            self.rule()
        except ImportError as e:
            raise ValueError(str(e)) from None
        return self

    def rule(self) -> AnswerRule:
        return AnswerRule(self.format, self.pattern, self.ignore_case, self.math_verify)
