"""Perplexity grid of the pruning layer: {uniform, OWL, DLP(mean), DLP(median)} x {wanda, sparsegpt}
x sparsity {0.5, 0.6, 0.7}, with prune time and peak memory.

Usage:
    # fresh tiny random Llama, random tokens (shows the machinery works; numbers are meaningless)
    python benchmarks/bench_prune.py
    # a trained HF model directory with its tokenizer and text files
    python benchmarks/bench_prune.py --model DIR --calib-text c4_sample.txt --eval-text wiki.test.raw \
        --device cuda --n-calib 128 --seqlen 2048 --out results.json

``--calib-text``: documents separated by blank lines (sampled like Wanda's C4 loader).
``--eval-text``: the evaluation split, joined with "\\n\\n" and cut into non-overlapping windows.
Without text files, calibration and evaluation use random token ids from the model's vocabulary.
Each configuration starts from a fresh copy of the dense model (reloaded from ``--model`` when
given, so host memory holds one copy at a time).
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from effsft.prune.blockwise import PruneSettings, prune_model  # noqa: E402
from effsft.prune.calibration import calib_seqlen, make_windows, sample_calibration_with_info  # noqa: E402
from effsft.prune.streaming import perplexity  # noqa: E402

METHODS = [("uniform", "mean"), ("owl", "mean"), ("dlp", "mean"), ("dlp", "median")]
CRITERIA = ["wanda", "sparsegpt"]


def tiny_random_llama(seed: int = 0):
    """A 4-block random Llama (hidden 128) built from a config: no hub access needed."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def load_dense(args):
    import transformers as tf

    if args.model is None:
        return tiny_random_llama(args.seed)
    return tf.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).eval()


def token_data(args, model):
    """Calibration windows ``[N, T]`` and evaluation windows ``[W, T]``."""
    T = calib_seqlen(model.config, args.seqlen)
    vocab = model.config.vocab_size
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    if args.calib_text or args.eval_text:
        import transformers as tf

        tok = tf.AutoTokenizer.from_pretrained(args.model)
    if args.calib_text:
        docs = [d for d in Path(args.calib_text).read_text().split("\n\n") if d.strip()]
        docs = [tok(d, add_special_tokens=False).input_ids for d in docs]
    else:
        g = torch.Generator().manual_seed(args.seed)
        docs = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
                for n in torch.randint(T // 2, 3 * T, (64,), generator=g)]
    calib, info = sample_calibration_with_info(docs, args.n_calib, T, args.seed, eos)
    if args.eval_text:
        stream = tok("\n\n".join(Path(args.eval_text).read_text().split("\n\n")), return_tensors="pt").input_ids[0]
    else:
        stream = torch.randint(0, vocab, (args.eval_windows * T,), generator=torch.Generator().manual_seed(args.seed + 1))
    return calib, make_windows(stream, T, args.eval_windows), info


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (cumulative)


def run(args) -> list[dict]:
    dense = load_dense(args)
    calib, windows, info = token_data(args, dense)
    print(f"# calibration: {tuple(calib.shape)} ({info['mode']}), eval windows: {tuple(windows.shape)}", flush=True)
    dense_ppl = perplexity(dense, windows, args.device, args.batch_size)
    rows = [{"method": "dense", "stat": "-", "criterion": "-", "sparsity": 0.0, "ppl": dense_ppl,
             "achieved": 0.0, "prune_s": 0.0, "peak_mib": peak_memory_mib(args.device)}]
    for s in args.sparsities:
        for criterion in CRITERIA:
            for method, stat in METHODS:
                model = load_dense(args) if args.model else copy.deepcopy(dense)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(args.device)
                cfg = PruneSettings(method=method, criterion=criterion, sparsity=s, alpha=args.alpha, stat=stat,
                                    owl_lambda=args.owl_lambda, owl_m=args.owl_m, device=args.device,
                                    batch_size=args.batch_size)
                rep, prune_s = common.timed(prune_model, model, calib, cfg)
                peak = peak_memory_mib(args.device)
                ppl = perplexity(model, windows, args.device, args.batch_size)
                rows.append({"method": method, "stat": stat, "criterion": criterion, "sparsity": s, "ppl": ppl,
                             "achieved": rep["global"]["achieved_prunable"], "prune_s": prune_s, "peak_mib": peak,
                             "targets": [b["target"] for b in rep["blocks"]], "shift_c": rep["shift_c"]})
                print(f"  {method:7s} {stat:6s} {criterion:9s} s={s:.2f} ppl={ppl:10.3f} "
                      f"t={prune_s:6.2f}s peak={peak:8.1f}MiB", flush=True)
                del model
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | stat | criterion | s | achieved | ppl | prune s | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['stat']} | {r['criterion']} | {r['sparsity']:.2f} | {r['achieved']:.4f} "
                     f"| {r['ppl']:.3f} | {r['prune_s']:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: a fresh tiny random Llama)")
    p.add_argument("--dtype", default="float32", help="dtype for --model (float16, bfloat16, float32)")
    p.add_argument("--calib-text")
    p.add_argument("--eval-text")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--alpha", type=float, default=0.15)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy box)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print()
    print(table(rows))
    if args.out:
        common.write_json(args.out, {"args": vars(args), "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
