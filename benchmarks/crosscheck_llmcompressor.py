"""Cross-check effsft's uniform Wanda / SparseGPT against llm-compressor's modifiers.

Runs, on deep copies of one tiny Llama and on the *same* calibration token ids:

* llm-compressor's ``WandaPruningModifier`` and ``SparseGPTModifier`` through ``oneshot``
  (sequential pipeline, pruned-output propagation, sparsity 0.5, mask ``0:0``, dampening
  0.01, block size 128, every ``Linear`` except ``lm_head``), and
* effsft's ``prune_model`` with ``method=uniform``, ``sparsity=0.5``, criterion wanda /
  sparsegpt (same damping and block size, ``batch_size`` equal to the dataloader's),

then compares per matrix the masks (fraction of identical entries, exact equality) and the
sparsity, and the perplexity of each pruned model on held-out windows (one plain HF forward,
the same evaluator for all models).

An aligned variant per criterion (``<criterion>/public-count``; skip with ``--no_align``)
switches off the one documented difference, the pruned *count*:

* SparseGPT: llm-compressor (like the reference SparseGPT code) selects
  ``tmp <= sort(tmp)[int(s·n)]`` per 128-column block, i.e. ``int(s·n) + 1`` weights (plus
  ties); effsft selects exactly ``round(s·n)``.
* Wanda: llm-compressor keeps ``sort(score)[:, :int(in·s)]`` per row (floor); effsft uses
  round-half-up. At s = 0.5 with an even ``in`` the two counts coincide.

The aligned run swaps effsft's ``exact_count`` for the public rule during the call.

Needs a Python environment with llmcompressor (transformers <= 5.17), separate from
effsft's main one; effsft's prune layer only needs torch + numpy there::

    PYTHONPATH=$PWD /tmp/venv-llmc/bin/python benchmarks/crosscheck_llmcompressor.py
    PYTHONPATH=$PWD /tmp/venv-llmc/bin/python benchmarks/crosscheck_llmcompressor.py \
        --model /tmp/effsft-prune-exp/model --corpus /tmp/effsft-prune-exp/corpus

Without ``--model`` a random-init Llama (hidden 256, intermediate 768, 2 blocks, vocab 512)
is built and calibrated/evaluated on seeded random token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from effsft.prune import blockwise, criteria
from effsft.prune.blocks import block_linears, find_layout
from effsft.prune.blockwise import PruneSettings, prune_model
from effsft.prune.calibration import make_windows, sample_calibration


# ----------------------------------------------------------------------------- model and data


def random_llama(hidden: int, inter: int, layers: int, vocab: int, seed: int) -> tf.LlamaForCausalLM:
    """Random-init Llama in fp32 (heads of 64, 2 KV groups)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).float().eval()
    # why: oneshot re-reads AutoConfig.from_pretrained(config.name_or_path) to look for a
    # quantization config, so an in-memory model needs its config on disk
    cfg_dir = tempfile.mkdtemp(prefix="llmc-crosscheck-")
    cfg.save_pretrained(cfg_dir)
    model.config._name_or_path = cfg_dir
    return model


def placeholder_tokenizer(vocab: int) -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer ``t0 … t{V-1}``: oneshot insists on a processor even for token-id data."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {f"t{i}": i for i in range(vocab)}
    return tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="t0")))


def random_ids(n: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    """``[n, t]`` token ids from a seeded Zipf-like unigram law (not uniform: some tokens frequent)."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), n * t, replacement=True, generator=g).view(n, t)


def corpus_docs(tokenizer, paths: list[str], limit: int) -> list[list[int]]:
    """Token ids per conversation (chat template rendered, no extra special tokens)."""
    import pyarrow.parquet as pq

    docs: list[list[int]] = []
    for path in paths:
        for row in pq.read_table(path, columns=["messages"]).to_pylist():
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(docs) >= limit:
                return docs
    return docs


def load_data(args) -> tuple[tf.PreTrainedModel, object, torch.Tensor, torch.Tensor, str]:
    """Model, tokenizer, calibration ids ``[N, T]``, eval windows ``[W, T]`` and a description."""
    if args.model is None:
        model = random_llama(args.hidden, args.inter, args.layers, args.vocab, args.seed)
        calib = random_ids(args.n_calib, args.seqlen, args.vocab, args.seed + 1)
        evals = random_ids(args.n_eval, args.seqlen, args.vocab, args.seed + 2)
        desc = (f"random-init Llama hidden {args.hidden}, intermediate {args.inter}, {args.layers} blocks, "
                f"vocab {args.vocab}; Zipf random token ids")
        return model, placeholder_tokenizer(args.vocab), calib, evals, desc
    model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(args.model)
    train = sorted(glob.glob(os.path.join(args.corpus, "train", "*.parquet")))
    calib = sample_calibration(corpus_docs(tok, train, args.max_docs), args.n_calib, args.seqlen, args.seed,
                               tok.eos_token_id)
    stream = [t for d in corpus_docs(tok, [os.path.join(args.corpus, "eval.parquet")], args.max_docs) for t in d]
    evals = make_windows(torch.tensor(stream), args.seqlen, args.n_eval)
    c = model.config
    desc = (f"trained Llama from {args.model} (hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
            f"{c.num_hidden_layers} blocks, vocab {c.vocab_size}); calibration from {args.corpus}/train, "
            f"eval windows from eval.parquet")
    return model, tok, calib, evals, desc


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """``exp(mean NLL)`` of tokens 1..T-1 of every window, plain HF forward (no effsft code)."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        y = windows[i : i + batch_size]  # [b, T]
        logits = model(input_ids=y, use_cache=False).logits.float()  # [b, T, V]
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(),
                                                       reduction="sum"))
        count += y[:, 1:].numel()
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- the two pruners


def run_llmcompressor(model: torch.nn.Module, tokenizer, calib: torch.Tensor, criterion: str, sparsity: float,
                      batch_size: int, blocksize: int, percdamp: float) -> float:
    """Prune ``model`` in place with llm-compressor's oneshot; returns seconds."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    common = dict(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if criterion == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(**common, block_size=blocksize, dampening_frac=percdamp)
    # why a plain DataLoader of {"input_ids"}: oneshot then skips tokenisation/shuffling and both
    # sides see the same windows in the same order (no attention_mask: effsft calls model(ids) too)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in calib], batch_size=batch_size,
                                         shuffle=False)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=loader, pipeline="sequential",
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False, batch_size=batch_size)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def public_count(criterion: str):
    """Make effsft count pruned weights like llm-compressor (and the reference code).

    * wanda: ``sort(...)[:, :int(in·s)]``, i.e. ``floor(s·in)`` per row (effsft: round half up);
    * sparsegpt: ``tmp <= sort(tmp)[int(s·n)]`` per block, i.e. ``int(s·n) + 1`` (effsft: round).
    """
    if criterion == "wanda":  # blockwise imported the name, so patch it there
        return _patched(blockwise, "exact_count", lambda s, n: min(n, int(s * n)))
    return _patched(criteria, "exact_count", lambda s, n: min(n, int(s * n) + 1))


def run_effsft(model: torch.nn.Module, calib: torch.Tensor, criterion: str, sparsity: float, batch_size: int,
               blocksize: int, percdamp: float) -> float:
    """Prune ``model`` in place with effsft's uniform ``prune_model``; returns seconds."""
    cfg = PruneSettings(method="uniform", criterion=criterion, sparsity=sparsity, batch_size=batch_size,
                        sparsegpt_blocksize=blocksize, sparsegpt_percdamp=percdamp)
    t0 = time.perf_counter()
    prune_model(model, calib, cfg)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- comparison


def prunable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: weight}`` of every Linear inside the decoder blocks."""
    layout = find_layout(model)
    return {f"{layout.prefix}.{l}.{n}": lin.weight.detach()
            for l, block in enumerate(layout.layers) for n, lin in block_linears(block).items()}


def compare(a: torch.nn.Module, b: torch.nn.Module) -> list[dict]:
    """Per matrix: sparsities, fraction of identical mask entries, exact equality, weight diff."""
    wa, wb = prunable(a), prunable(b)
    assert wa.keys() == wb.keys()
    rows = []
    for name in wa:
        ma, mb = wa[name] == 0, wb[name] == 0  # True = pruned
        rows.append({"matrix": name, "shape": list(ma.shape), "sparsity_effsft": ma.float().mean().item(),
                     "sparsity_llmc": mb.float().mean().item(), "mask_agree": (ma == mb).float().mean().item(),
                     "mask_equal": bool(torch.equal(ma, mb)), "n_differ": int((ma != mb).sum()),
                     "max_abs_weight_diff": (wa[name] - wb[name]).abs().max().item()})
    return rows


def summarize(rows: list[dict]) -> dict:
    total = sum(math.prod(r["shape"]) for r in rows)
    return {"matrices": len(rows), "equal_masks": sum(r["mask_equal"] for r in rows),
            "mask_agree_weighted": sum(r["mask_agree"] * math.prod(r["shape"]) for r in rows) / total,
            "mask_agree_min": min(r["mask_agree"] for r in rows),
            "entries_differ": sum(r["n_differ"] for r in rows), "entries": total,
            "sparsity_effsft": sum(r["sparsity_effsft"] * math.prod(r["shape"]) for r in rows) / total,
            "sparsity_llmc": sum(r["sparsity_llmc"] * math.prod(r["shape"]) for r in rows) / total,
            "max_abs_weight_diff": max(r["max_abs_weight_diff"] for r in rows)}


def print_table(rows: list[dict]) -> None:
    print("| matrix | shape | sparsity effsft | sparsity llmc | mask agree | equal | #differ | max |ΔW| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['sparsity_effsft']:.5f} | "
              f"{r['sparsity_llmc']:.5f} | {r['mask_agree']:.6f} | {r['mask_equal']} | {r['n_differ']} | "
              f"{r['max_abs_weight_diff']:.2e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: random-init Llama)")
    p.add_argument("--corpus", default=None, help="corpus dir with train/*.parquet and eval.parquet (with --model)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--n_calib", type=int, default=32)
    p.add_argument("--n_eval", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max_docs", type=int, default=5000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--criteria", default="wanda,sparsegpt")
    p.add_argument("--no_align", action="store_true", help="skip the aligned variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("effsft").setLevel(logging.WARNING)
    if args.model is not None and args.corpus is None:
        p.error("--model needs --corpus")

    import llmcompressor

    base, tok, calib, evals, desc = load_data(args)
    print(f"torch {torch.__version__}, transformers {tf.__version__}, llmcompressor {llmcompressor.__version__}")
    print(f"model: {desc}")
    print(f"calibration ids {list(calib.shape)}, eval windows {list(evals.shape)}, sparsity {args.sparsity}, "
          f"batch {args.batch_size}")
    ppl_dense = perplexity(base, evals, args.batch_size)
    print(f"dense perplexity {ppl_dense:.4f}")
    kw = dict(sparsity=args.sparsity, batch_size=args.batch_size, blocksize=128, percdamp=0.01)

    results = {"description": desc, "ppl_dense": ppl_dense, "runs": {}}
    for criterion in args.criteria.split(","):
        m_llmc = copy.deepcopy(base)
        t_llmc = run_llmcompressor(m_llmc, tok, calib, criterion, **kw)
        variants = [("default", contextlib.nullcontext)]
        if not args.no_align:
            variants.append(("public-count", lambda c=criterion: public_count(c)))
        ppl_llmc = perplexity(m_llmc, evals, args.batch_size)
        for variant, ctx in variants:
            m_eff = copy.deepcopy(base)
            with ctx():
                t_eff = run_effsft(m_eff, calib, criterion, **kw)
            rows = compare(m_eff, m_llmc)
            ppl_eff = perplexity(m_eff, evals, args.batch_size)
            summary = summarize(rows) | {
                "ppl_effsft": ppl_eff, "ppl_llmc": ppl_llmc, "ppl_rel_diff": (ppl_eff - ppl_llmc) / ppl_llmc,
                "time_effsft_s": t_eff, "time_llmc_s": t_llmc}
            key = f"{criterion}/{variant}"
            results["runs"][key] = {"summary": summary, "matrices": rows}
            print(f"\n### {key}")
            print_table(rows)
            print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
