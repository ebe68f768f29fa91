"""Prefix Grouper benchmark: grouped vs repeated GRPO forward+backward (docs/algorithms/prefix_grouper_grpo.md §2 Benchmarks).

For G in {4, 8, 16} and r = Lp/Lr in {1, 4, 16}: median wall time of forward + backward of the summed
completion log-probs (after warm-up), and memory, for
  * repeated: one row [P; R_i] per completion, LM head only at completion positions (= logits_to_keep);
  * grouped:  effsft's packed [P; R_1..R_G] rows with the two-call grouped attention;
  * pkg:      the same packed rows through the `prefix_grouper` package's attention `forward`
              (its ungroup/group autograd functions; SDPA with its 2-D key mask, bottom-right causal).
Memory: CUDA max allocated on GPU; on CPU the bytes autograd saves for backward (exact, the activation
memory) and the peak RSS increase sampled by a thread (approximate: the allocator keeps freed pages).

    python benchmarks/bench_prefix_grouper.py --quick            # 2 CPU cores, a few minutes
    python benchmarks/bench_prefix_grouper.py --device cuda      # Llama hidden 512, 8 layers
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import threading
import time

import torch
import transformers

import common
from effsft.grpo import attention as pga
from effsft.grpo import prefix_grouper as pgm
from effsft.grpo.group_plan import build_plan


# ------------------------------------------------------------------ memory probes
class SavedBytes:
    """Sum of the tensor bytes autograd saves for backward (activation memory)."""

    def __init__(self):
        self.total = 0
        self._seen = set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:  # views of one storage count once
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak RSS increase over the block, sampled every millisecond (approximate)."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.delta = max(self.peak - self.base, 0)


# ------------------------------------------------------------------ the prefix_grouper package path
def _pkg_attn_func(q, k, v, attn_mask, scale=None):
    """The package's attn_func contract: [b,h,s,d] in, [b,s,h,d] out, 2-D key mask, bottom-right causal."""
    Lq, Lk = q.shape[2], k.shape[2]
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)
    allowed = causal[None, None] & attn_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)


def _pkg_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, pg_grouper=None, **kw):
    n_rep = query.shape[1] // key.shape[1]
    key, value = pga._repeat_kv(key, n_rep), pga._repeat_kv(value, n_rep)
    return pg_grouper.forward(_pkg_attn_func, query, key, value, scale=scaling), None


def _register_pkg():
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("bench_prefix_grouper_pkg", _pkg_attention)
    AttentionMaskInterface.register("bench_prefix_grouper_pkg", lambda *a, **k: None)


def pkg_logprobs(model, prompts, completions):
    from prefix_grouper import PrefixGrouper

    plan = build_plan(prompts, completions)
    info = [[p.numel()] + [c.numel() for c in cs] for p, cs in zip(prompts, completions)]
    grouper = PrefixGrouper(info, device=plan.input_ids.device, padding_mode="right")
    original = model.config._attn_implementation
    model.set_attn_implementation("bench_prefix_grouper_pkg")
    try:
        hidden = pgm._decoder_hidden(model, plan.input_ids, plan.position_ids, pg_grouper=grouper)
    finally:
        model.set_attn_implementation(original)
    return [pgm._gathered_logprobs(model, hidden, plan.pred_idx, plan.targets, 1.0)]


# ------------------------------------------------------------------ measurement
def make_batch(n_prompts, G, Lp, Lr, vocab, device):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (Lp,), generator=g).to(device) for _ in range(n_prompts)]
    comps = [[torch.randint(0, vocab, (Lr,), generator=g).to(device) for _ in range(G)] for _ in range(n_prompts)]
    return prompts, comps


def fwd_bwd(model, fn, prompts, comps):
    model.zero_grad(set_to_none=True)
    loss = sum(x.sum() for x in fn(model, prompts, comps))
    loss.backward()


def _memory(model, fn, prompts, comps, device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(model, fn, prompts, comps)
        return torch.cuda.max_memory_allocated() - base, float("nan")
    model.zero_grad(set_to_none=True)
    with PeakRSS() as rss_probe, SavedBytes() as saved:
        loss = sum(x.sum() for x in fn(model, prompts, comps))
        loss.backward()
    return saved.total, rss_probe.delta


def measure_all(model, paths, prompts, comps, warmup, reps, device):
    """{path: (median s, memory bytes, rss bytes, min s)}; repetitions interleave the paths so that
    load from other processes hits all of them alike."""
    for _ in range(warmup):
        for fn in paths.values():
            fwd_bwd(model, fn, prompts, comps)
    times = {k: [] for k in paths}
    for _ in range(reps):
        for k, fn in paths.items():
            times[k].append(common.timed(fwd_bwd, model, fn, prompts, comps, device=device)[1])
    out = {}
    for k, fn in paths.items():
        mem, rss = _memory(model, fn, prompts, comps, device)
        out[k] = (statistics.median(times[k]), mem, rss, min(times[k]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and lengths for 2 CPU cores")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--lr-len", type=int, default=None, help="completion length Lr")
    ap.add_argument("--prompts", type=int, default=1, help="prompt groups per micro-batch")
    ap.add_argument("--groups", default="4,8,16")
    ap.add_argument("--ratios", default="1,4,16", help="r = Lp / Lr")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-pkg", action="store_true", help="skip the prefix_grouper package path")
    a = ap.parse_args(argv)
    q = a.quick
    hidden = a.hidden or (128 if q else 512)
    layers = a.layers or (2 if q else 8)
    heads = a.heads if not q or a.hidden else 4
    vocab = a.vocab or (512 if q else 8192)
    lr_len = a.lr_len or (16 if q else 64)
    warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    reps = a.reps or 5
    dtype = getattr(torch, a.dtype)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=a.kv_heads or heads, max_position_embeddings=65536,
        attn_implementation=a.attn,
    )
    model = transformers.LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype).train()
    c_pw, c_att, c_head = pgm.cost_coefficients(model)
    paths = {"repeated": lambda m, p, c: pgm.completion_logprobs(m, p, c, grouped=False),
             "grouped": lambda m, p, c: pgm.completion_logprobs(m, p, c, grouped=True)}
    if not a.no_pkg:
        try:
            importlib.import_module("prefix_grouper")  # the optional package: its path only where it imports
            _register_pkg()
            paths["pkg"] = pkg_logprobs
        except ImportError:
            pass
    mem_name = "cuda_max_alloc" if a.device == "cuda" else "saved_act"
    print(f"# Llama hidden={hidden} layers={layers} heads={heads} kv_heads={a.kv_heads or heads} vocab={vocab} "
          f"dtype={a.dtype} attn={a.attn} device={a.device} threads={torch.get_num_threads()} "
          f"prompts/micro-batch={a.prompts} Lr={lr_len} warmup={warmup} reps={reps} torch={torch.__version__} "
          f"transformers={transformers.__version__}")
    print("# time = median fwd+bwd; ratio = grouped/repeated (pkg = prefix_grouper package / repeated); "
          f"mem = {mem_name}" + ("" if a.device == "cuda" else ", rss = peak RSS increase (approx.)"))
    head = (f"| G | Lp | Lr | t_rep ms | t_grp ms | time ratio | min-time ratio | pkg time ratio | {mem_name} rep MB | mem ratio | "
            "rss ratio | theo pw | theo attn | theo comb | theo total | time / theo total |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for G in [int(x) for x in a.groups.split(",")]:
        for r in [int(x) for x in a.ratios.split(",")]:
            Lp = r * lr_len
            prompts, comps = make_batch(a.prompts, G, Lp, lr_len, vocab, a.device)
            res = measure_all(model, paths, prompts, comps, warmup, reps, a.device)
            th = pgm.theoretical_ratios(G, Lp, lr_len, c_pw, c_att, c_head)
            rep, grp = res["repeated"], res["grouped"]
            pkg_ratio = f"{res['pkg'][0] / rep[0]:.3f}" if "pkg" in res else "n/a"
            rss_ratio = f"{grp[2] / rep[2]:.3f}" if rep[2] and rep[2] == rep[2] else "n/a"
            print(f"| {G} | {Lp} | {lr_len} | {rep[0] * 1e3:.1f} | {grp[0] * 1e3:.1f} | {grp[0] / rep[0]:.3f} | {grp[3] / rep[3]:.3f} | "
                  f"{pkg_ratio} | {rep[1] / 2**20:.1f} | {grp[1] / rep[1]:.3f} | {rss_ratio} | "
                  f"{th['pointwise']:.3f} | {th['attention']:.3f} | {th['combined']:.3f} | {th['total']:.3f} | "
                  f"{grp[0] / rep[0] / th['total']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
