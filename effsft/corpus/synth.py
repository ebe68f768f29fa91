"""Synthetic instruction corpus with labelled noise, near-duplicates and garbage rows.

Why: no dataset hub here, and selection methods need ground truth. Every row records in
``meta`` its task, whether its answer is wrong (``noisy``), whether it is a near-duplicate
(``dup``, ``dup_of``) or garbage, and the exact-match ``answer``.

Task families (each response ends with a line ``Answer: <x>``, the exact-match target):
  * ``arith``  multi-digit +, -, * with worked steps
  * ``string`` reverse / upper-case / sort the letters of a word
  * ``fact``   key -> value lookup in a seeded fictional world (learnable knowledge)
  * ``count``  occurrences of a letter in a word, with the letters spelled out
  * ``format`` ``key=value`` pairs -> JSON

Splits: ``train/`` (Parquet shards), ``eval.parquet`` (clean, held out by a hash partition of
the prompt, so no eval prompt occurs in train), ``grpo.parquet`` (prompts + verifiable answers).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from effsft.corpus.schema import CANONICAL_SCHEMA, MESSAGE_TYPE

TASKS = ("arith", "string", "fact", "count", "format")
_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "zu", "bel", "qui", "dar", "sen", "po", "lix",
        "mar", "tu", "gen", "ol", "fi", "nax", "re"]
_WORDS = ["planet", "garden", "silver", "rocket", "window", "pencil", "forest", "bridge",
          "candle", "mirror", "basket", "thunder", "marble", "lantern", "harbor", "meadow",
          "castle", "pepper", "violin", "saddle", "banana", "cobalt", "orange", "puzzle"]
_ATTRS = {"capital": None, "river": None, "color": ["red", "blue", "green", "amber", "violet",
                                                     "teal", "ochre", "silver"],
          "founder": None}
_FILLER = ["This question is part of a practice set.", "Read the task carefully.",
           "Give a short, exact answer.", "Show your reasoning briefly.",
           "The user is studying for an exam.", "Precision matters here.",
           "Take your time before answering.", "Answer in the requested format."]
_KEYS = ["name", "age", "city", "score", "level", "team"]

HELDOUT_PERCENT = 3  # prompts whose hash falls here belong to eval/grpo, never to train

GRPO_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE_TYPE)),
                         ("answer", pa.string()), ("task", pa.string())])
EVAL_SCHEMA = pa.schema(list(CANONICAL_SCHEMA) + [("answer", pa.string()), ("task", pa.string())])


@dataclass
class SynthSettings:
    rows: int = 20_000
    noise: float = 0.1          # fraction of rows with a wrong but plausible answer
    dup: float = 0.05           # fraction of near-duplicate rows
    garbage: float = 0.0        # fraction of rows that must be rejected by the normaliser
    length_spread: int = 4      # up to this many filler sentences before the task
    task_mix: dict = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    eval_rows: int = 500
    grpo_rows: int = 500
    n_entities: int = 200
    seed: int = 0
    shard_rows: int = 50_000


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


class World:
    """A seeded fictional world: entity -> attribute -> value (the 'fact' task's knowledge)."""

    def __init__(self, n: int, seed: int):
        rng = random.Random(f"world-{seed}")
        names: list[str] = []
        while len(names) < n:
            nm = _name(rng, rng.randint(2, 3))
            if nm not in names:
                names.append(nm)
        self.entities = names
        self.facts = {e: {a: (rng.choice(v) if v else _name(rng, 2)) for a, v in _ATTRS.items()}
                      for e in names}


def _heldout(prompt: str) -> bool:
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return h % 100 < HELDOUT_PERCENT


class Generator:
    def __init__(self, s: SynthSettings, stream: str):
        self.s = s
        self.rng = random.Random(f"{stream}-{s.seed}")
        self.world = World(s.n_entities, s.seed)
        tasks = [t for t in TASKS if s.task_mix.get(t, 0) > 0]
        if not tasks:
            raise ValueError("task_mix: at least one task needs a positive weight")
        self.tasks, self.weights = tasks, [s.task_mix[t] for t in tasks]

    # Each task returns (prompt, steps, answer, wrong_answer).
    def arith(self):
        r = self.rng
        op = r.choice("+-*")
        if op == "*":
            a, b = r.randint(12, 999), r.randint(2, 99)
            tens, ones = b - b % 10, b % 10
            ans = a * b
            steps = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones}"
        else:
            a, b = r.randint(10, 9999), r.randint(10, 9999)
            ans = a + b if op == "+" else a - b
            cur, lines = a, []
            for place in sorted({len(str(b)) - 1 - i for i in range(len(str(b)))}, reverse=True):
                part = (b // 10 ** place % 10) * 10 ** place
                if part:
                    nxt = cur + part if op == "+" else cur - part
                    lines.append(f"{cur} {op} {part} = {nxt}")
                    cur = nxt
            steps = "\n".join(lines)
        wrong = ans + r.choice([-1, 1]) * r.choice([1, 2, 10, 100])
        phr = r.choice(["Compute {a} {op} {b}.", "What is {a} {op} {b}?", "Calculate {a} {op} {b}."])
        return phr.format(a=a, op=op, b=b), steps, str(ans), str(wrong)

    def string(self):
        r = self.rng
        w = r.choice(_WORDS) + (r.choice(_WORDS) if r.random() < 0.3 else "")
        kind = r.choice(["reverse", "upper", "sort"])
        ans = {"reverse": w[::-1], "upper": w.upper(), "sort": "".join(sorted(w))}[kind]
        lst = list(ans)
        i = r.randrange(len(lst) - 1)
        lst[i], lst[i + 1] = lst[i + 1], lst[i]
        wrong = "".join(lst) if "".join(lst) != ans else ans + ans[-1]
        prompt = {"reverse": f"Reverse the string '{w}'.", "upper": f"Write '{w}' in upper case.",
                  "sort": f"Sort the letters of '{w}' alphabetically."}[kind]
        return prompt, f"The input is '{w}' ({len(w)} letters).", ans, wrong

    def fact(self):
        r = self.rng
        e = r.choice(self.world.entities)
        a = r.choice(list(_ATTRS))
        ans = self.world.facts[e][a]
        other = r.choice([x for x in self.world.entities if self.world.facts[x][a] != ans] or [e])
        wrong = self.world.facts[other][a] if other != e else ans + "a"
        prompt = r.choice(["What is the {a} of {e}?", "In the world of the atlas, name the {a} of {e}.",
                           "Tell me the {a} of {e}."]).format(a=a, e=e)
        return prompt, f"Looking up {e} in the atlas: {a}.", ans, wrong

    def count(self):
        r = self.rng
        w = r.choice(_WORDS) + r.choice(_WORDS)
        ch = r.choice(sorted(set(w)))
        ans = w.count(ch)
        wrong = ans + (1 if ans <= 1 or r.random() < 0.5 else -1)
        return (f"How many times does the letter '{ch}' appear in '{w}'?",
                f"The letters are {', '.join(w)}.", str(ans), str(wrong))

    def format(self):
        r = self.rng
        keys = r.sample(_KEYS, r.randint(2, 4))
        vals = {k: (r.randint(1, 99) if k in ("age", "score", "level") else _name(r, 2)) for k in keys}
        ans = json.dumps(vals)
        k0 = r.choice(keys)
        bad = dict(vals)
        bad[k0] = (vals[k0] + 1) if isinstance(vals[k0], int) else vals[k0] + "x"
        prompt = "Convert to JSON: " + "; ".join(f"{k}={v}" for k, v in vals.items())
        return prompt, f"There are {len(keys)} fields.", ans, json.dumps(bad)

    def item(self, want_heldout: bool):
        """One task instance on the requested side of the train/held-out partition."""
        while True:
            task = self.rng.choices(self.tasks, self.weights)[0]
            prompt, steps, ans, wrong = getattr(self, task)()
            if _heldout(prompt) == want_heldout:
                return task, prompt, steps, ans, wrong

    def filler(self) -> str:
        k = self.rng.randint(0, self.s.length_spread) if self.s.length_spread > 0 else 0
        return " ".join(self.rng.choice(_FILLER) for _ in range(k))


def _msgs(user: str, assistant: str | None) -> list[dict]:
    m = [{"role": "user", "content": user}]
    if assistant is not None:
        m.append({"role": "assistant", "content": assistant})
    return m


def _response(steps: str, answer: str) -> str:
    return f"{steps}\nAnswer: {answer}" if steps else f"Answer: {answer}"


def _garbage(rng: random.Random, prompt: str) -> list[dict]:
    kind = rng.randrange(4)
    if kind == 0:
        return _msgs(prompt, "   ")                    # empty_response
    if kind == 1:
        return [{"role": "robot", "content": prompt}, {"role": "assistant", "content": "ok"}]
    if kind == 2:
        return []                                       # missing_field
    return _msgs(prompt, None)                          # no response


def train_rows(s: SynthSettings):
    """Yield canonical train records (dicts), deterministic for the settings."""
    g = Generator(s, "train")
    recent: list[tuple[str, str, str, dict]] = []
    for i in range(s.rows):
        rid = f"syn{s.seed}-{i:08d}"
        u = g.rng.random()
        if u < s.garbage:
            _, prompt, _, _, _ = g.item(False)
            yield {"id": rid, "messages": _garbage(g.rng, prompt), "source": "synth",
                   "meta": json.dumps({"garbage": True})}
            continue
        if u < s.garbage + s.dup and recent:
            oid, prompt, resp, meta = g.rng.choice(recent)
            variant = g.rng.choice([prompt + " ", prompt.lower(), prompt + " Please answer.",
                                    "  " + prompt, prompt.replace("?", " ?")])
            m = dict(meta, dup=True, dup_of=oid)
            yield {"id": rid, "messages": _msgs(variant, resp), "source": "synth",
                   "meta": json.dumps(m)}
            continue
        task, prompt, steps, ans, wrong = g.item(False)
        noisy = g.rng.random() < s.noise
        fill = g.filler()
        user = f"{fill} {prompt}".strip()
        resp = _response(steps, wrong if noisy else ans)
        meta = {"task": task, "noisy": noisy, "dup": False, "answer": ans}
        if len(recent) < 512:
            recent.append((rid, user, resp, meta))
        else:
            recent[g.rng.randrange(512)] = (rid, user, resp, meta)
        yield {"id": rid, "messages": _msgs(user, resp), "source": "synth", "meta": json.dumps(meta)}


def heldout_rows(s: SynthSettings, n: int, stream: str):
    g = Generator(s, stream)
    seen = set()
    while len(seen) < n:
        task, prompt, steps, ans, _ = g.item(True)
        if prompt in seen:
            continue
        seen.add(prompt)
        yield {"id": f"{stream}{s.seed}-{len(seen) - 1:06d}", "task": task, "prompt": prompt,
               "response": _response(steps, ans), "answer": ans}


def write_synth(s: SynthSettings, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Write ``train/shard-*.parquet``, ``eval.parquet`` and ``grpo.parquet`` under ``out_dir``."""
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "noisy": 0, "dup": 0, "garbage": 0, "shards": 0}
    buf: list[dict] = []

    def flush():
        t = pa.Table.from_pylist(buf, schema=CANONICAL_SCHEMA)
        pq.write_table(t, out / "train" / f"shard-{counts['shards']:05d}.parquet", compression="zstd")
        counts["shards"] += 1
        buf.clear()

    for row in tqdm(train_rows(s), total=s.rows, desc="synth train", disable=not progress,
                    mininterval=2, unit="row"):
        meta = json.loads(row["meta"])
        for k in ("noisy", "dup", "garbage"):
            counts[k] += bool(meta.get(k))
        buf.append(row)
        counts["train"] += 1
        if len(buf) >= s.shard_rows:
            flush()
    if buf:
        flush()
    ev = list(heldout_rows(s, s.eval_rows, "eval"))
    pq.write_table(pa.Table.from_pylist(
        [{"id": r["id"], "messages": _msgs(r["prompt"], r["response"]), "source": "synth-eval",
          "meta": json.dumps({"task": r["task"], "answer": r["answer"]}), "answer": r["answer"],
          "task": r["task"]} for r in ev], schema=EVAL_SCHEMA), out / "eval.parquet")
    gr = list(heldout_rows(s, s.grpo_rows, "grpo"))
    pq.write_table(pa.Table.from_pylist(
        [{"id": r["id"], "messages": _msgs(r["prompt"], None), "answer": r["answer"],
          "task": r["task"]} for r in gr], schema=GRPO_SCHEMA), out / "grpo.parquet")
    counts.update(eval=len(ev), grpo=len(gr))
    return {"settings": asdict(s), "counts": counts}
