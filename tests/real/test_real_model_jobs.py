"""Every job on the real pretrained model (SmolLM2-135M-Instruct), on the session's local Ray.

* ``effsft eval`` perplexity and ``effsft select --method ce`` scores equal a plain transformers
  computation (the tokenizer's chat template, response tokens) to 1e-4 relative, on rows this
  project never used anywhere else;
* one SFT step on 2 ZeRO-2 workers, one LoRA step; ``prune`` at 50 % Wanda gives a loadable
  model with a finite, reported perplexity; one GRPO step.
"""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")

# Hand-written for this test only (never in a corpus, a tokenizer's training data or a model's).
UNSEEN = [
    ("Which planet in our solar system has the most moons?", "Saturn, with well over a hundred known moons."),
    ("Give me a synonym for 'quick'.", "Swift."),
    ("Translate 'good morning' into French.", "Bonjour."),
    ("What do bees make?", "Honey, and also beeswax."),
    ("If I have 3 apples and eat one, how many are left?", "You have 2 apples left."),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius."),
    ("Name the largest ocean.", "The Pacific Ocean."),
    ("Spell 'necessary' backwards.", "yrassecen"),
    ("What colour do you get by mixing blue and yellow?", "Green."),
    ("How many legs does a spider have?", "Eight."),
    ("Suggest a name for a grey cat.", "Ash, Smokey or Pebble."),
]


def _rows(system: bool = False):
    out = []
    for i, (q, a) in enumerate(UNSEEN):
        msgs = ([{"role": "system", "content": "Answer briefly."}] if system and i % 3 == 0 else [])
        out.append({"id": f"unseen-{i}", "messages": msgs + [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]})
    return out


@pytest.fixture(scope="module")
def unseen_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("unseen") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(system=True)))
    return path


@pytest.fixture(scope="module")
def reference(real_model_dir):
    """Plain transformers: per row, (sum of response-token NLLs, response tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()
    out = {}
    for r in _rows(system=True):
        msgs = r["messages"]
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = tok(tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        nll = -sum(float(logp[t - 1, full[t]]) for t in range(len(prompt), len(full)))
        out[r["id"]] = (nll, len(full) - len(prompt))
    return out


def test_eval_perplexity_equals_plain_transformers(real_model_dir, unseen_jsonl, reference, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(real_model_dir), "--data", str(unseen_jsonl), "--output", str(out),
                 "model.dtype=float32", "batch_size=4"]) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    got = m["metrics"]["perplexity"]
    nll, n = sum(v[0] for v in reference.values()), sum(v[1] for v in reference.values())
    assert got["tokens"] == n and got["rows"] == len(UNSEEN)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert m["inputs"]["model"]["template"] == "chat"


def test_select_ce_scores_equal_plain_transformers(real_model_dir, unseen_jsonl, reference, tmp_path, capsys):
    out = tmp_path / "select"
    assert main(["select", "--input", str(unseen_jsonl), "--method", "ce", "--budget", "4", "--model",
                 str(real_model_dir), "--output", str(out), "model.dtype=float32", "scorer.micro_batch_size=4",
                 f"cache_dir={tmp_path / 'cache'}", "plots=false"]) == 0, capsys.readouterr().err
    scores = {r["id"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    assert len(scores) == len(UNSEEN)
    col = next(c for c in next(iter(scores.values())) if c in ("score_ce", "score"))
    for rid, (nll, n) in reference.items():
        assert scores[rid][col] == pytest.approx(nll / n, rel=1e-4), rid
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"]["model"]["template"] == "chat"
    best = sorted(reference, key=lambda k: -reference[k][0] / reference[k][1])[:4]
    assert sorted(r["id"] for r in pq.read_table(out / "selected.parquet").to_pylist()) == sorted(best)


def _sft(real_model_dir, data, out, *extra):
    return main(["sft", "--model", str(real_model_dir), "--data", str(data), "--output", str(out),
                 "model.dtype=float32", "tokenize.max_len=128", "train.micro_batch_size=2", "train.max_steps=1",
                 "train.lr=1e-4", *extra])


def test_sft_one_step_zero2_and_one_step_lora(real_model_dir, unseen_jsonl, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(real_model_dir))
    for name, extra in [("zero2", ["train.num_workers=2", "train.zero_stage=2"]),
                        ("lora", ["train.num_workers=1", "lora.enabled=true", "lora.r=4"])]:
        out = tmp_path / name
        assert _sft(real_model_dir, unseen_jsonl, out, *extra) == 0, capsys.readouterr().err
        m = json.loads((out / "manifest.json").read_text())
        assert m["metrics"]["steps"] == 1 and math.isfinite(m["metrics"]["final_loss"])
        assert m["counts"]["rows_ok"] == len(UNSEEN) and m["inputs"]["model"]["template"] == "chat"
        trained = AutoModelForCausalLM.from_pretrained(str(out / "model"))
        changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
        assert any(changed), name
        tok_cfg = out / "model" / "chat_template.jinja"
        assert tok_cfg.exists() or "chat_template" in (out / "model" / "tokenizer_config.json").read_text()


def test_prune_wanda_50_gives_a_loadable_model(real_model_dir, unseen_jsonl, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(real_model_dir), "--data", str(unseen_jsonl), "--eval_data",
                 str(unseen_jsonl), "--sparsity", "0.5", "--method", "uniform", "--criterion", "wanda",
                 "--output", str(out), "model.dtype=float32", "prune.calib.n_samples=4", "prune.calib.seqlen=32",
                 "prune.eval.n_windows=2", "prune.batch_size=4"]) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    before, after = m["metrics"]["ppl_dense"], m["metrics"]["ppl_pruned"]
    assert math.isfinite(before) and math.isfinite(after) and after > before
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    w = model.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_grpo_one_step(real_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}? "
                                                          "End with 'Answer: <number>'."}],
                                           "answer": str(a + b)}) + "\n"
                               for a, b in [(2, 3), (10, 7), (4, 4), (6, 9)]))
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(real_model_dir), "--data", str(prompts), "--output", str(out),
                 "model.dtype=float32", "train.num_workers=1", "train.max_steps=1", "train.micro_batch_size=2",
                 "rollout.prompts_per_step=2", "num_generations=2", "max_completion_length=16",
                 "answer.format=last_number"]) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["steps"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and math.isfinite(rows[0]["loss"]) and 0 <= rows[0]["reward_mean"] <= 1
