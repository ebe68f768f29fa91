"""Rollout actors and reward tasks for ``effsft grpo`` (docs/algorithms/prefix_grouper_grpo.md §4: Ray plumbing around pure code).

:class:`RolloutWorker` is a plain class (testable without Ray); the recipe wraps it with
``ray.remote(num_cpus=..., num_gpus=...)``. It samples G completions per prompt with HF
``generate`` and returns **token ids + masks** (the trainer never re-tokenises text), and
loads new weights that the trainer's rank 0 ``ray.put`` once per sync (Ray resolves the
object ref argument to the state dict, read from the object store).

vLLM is not wired in (its in-place weight loading is version dependent, docs/algorithms/prefix_grouper_grpo.md §4 uncertain);
the actor interface (``generate`` / ``update_weights`` / ``weights_checksum``) is what a vLLM
actor would implement.
"""

from __future__ import annotations

import hashlib
import time
from typing import Sequence

import torch


def state_checksum(state: dict) -> str:
    """BLAKE2b over (name, dtype, shape, bytes) of every tensor, names sorted: equal iff the
    weights are bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trim_at_eos(gen: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion mask of sampled tokens: everything up to and including the first EOS.

    Args:
        gen: ``[N, T]`` sampled ids (after the prompt).
        eos_ids: token ids that end a completion.

    Returns:
        ``(gen, mask)``: ``mask`` ``[N, T]`` bool; ids after the first EOS are left as sampled
        (HF pads them) but masked out.
    """
    is_eos = torch.isin(gen, torch.tensor(list(eos_ids), dtype=gen.dtype))  # [N, T]
    # position of the first EOS (T when none): tokens at positions <= it are kept
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((gen.shape[0],), gen.shape[1]))
    mask = torch.arange(gen.shape[1])[None] <= first[:, None]
    return gen, mask


class RolloutWorker:
    """Samples completions with a local copy of the policy.

    Args:
        model_path: HF model directory (the trainer's starting weights).
        dtype: ``auto|float32|bfloat16|float16``.
        device: ``cpu`` or ``cuda`` (the actor's own GPU when given ``num_gpus``).
        num_threads: torch intra-op threads (0 = leave torch's default).
    """

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "cpu",
                 trust_remote_code: bool = False, attn_implementation: str | None = None,
                 num_threads: int = 0):
        from effsft.models.loading import load_model, load_tokenizer, stop_token_ids

        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.device = torch.device(device)
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.model = load_model(model_path, dtype=dtype, device=self.device,
                                trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        self.version = 0
        self.eos_ids = stop_token_ids(self.model, self.tok)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> dict:
        """G sampled completions per prompt.

        Args:
            prompts: P token-id lists (the chat-templated prompts).
            num_generations: G.
            max_new_tokens: completion length cap (``max_completion_length``).
            seed: sampling seed (the controller derives it from the step and actor index).

        Returns:
            ``completion_ids`` ``[P * G, T]`` (prompt-major), ``completion_mask`` ``[P * G, T]``
            bool (through the first EOS), ``version`` of the weights used, ``seconds``,
            ``tokens`` (sampled tokens under the mask).
        """
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        pad = self.tok.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=att.to(self.device), do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            num_return_sequences=num_generations, pad_token_id=pad, eos_token_id=self.eos_ids)
        gen, mask = trim_at_eos(out[:, width:].cpu(), self.eos_ids)  # [P*G, T]
        return {"completion_ids": gen, "completion_mask": mask, "version": self.version,
                "seconds": time.perf_counter() - t0, "tokens": int(mask.sum())}

    def update_weights(self, state: dict, version: int) -> int:
        """Load a full state dict (Ray resolves the trainer's object ref to it)."""
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        self.version = int(version)
        return self.version

    def weights_checksum(self) -> str:
        return state_checksum(self.model.state_dict())

    def get_version(self) -> int:
        return self.version


def score_task(fn_spec: str, prompts: list[str], completions: list[str], columns: dict,
               rule=None, timeout_s: float | None = None) -> tuple[list[float], str | None]:
    """One reward function over a batch, as a Ray task body (the function is resolved by its
    import path inside the task, so user code only has to be importable on the cluster).
    Returns ``(rewards, error)``: a call that raises, hangs past ``timeout_s`` or returns a
    bad column scores 0 for every completion, with the error (effsft.grpo.reward_guard)."""
    from effsft.grpo.controller import rewards_column
    from effsft.grpo.reward_guard import call_with_timeout, failed_rewards
    from effsft.grpo.rewards import load_reward_fn

    def run():
        fn = load_reward_fn(fn_spec, rule)
        return rewards_column(fn(prompts, completions, **columns), len(completions))

    values, error = call_with_timeout(run, timeout_s=timeout_s)
    return (failed_rewards(len(completions)), error) if error else (values, None)


def score(fn_specs: Sequence[str], weights: Sequence[float], prompts: list[str], completions: list[str],
          columns: dict, mode: str = "inline", num_cpus: float = 0.25, rule=None, timeout_s: float | None = None,
          errors: list | None = None):
    """Rewards of a rollout batch: ``(total [N], per_func [N, K])``; one Ray task per reward
    function with ``mode="task"``, in this process with ``mode="inline"``. ``rule`` is the
    job's :class:`~effsft.corpus.answer.AnswerRule` (for the built-in ``exact_match``).
    A function that fails or runs past ``timeout_s`` gives 0s; ``(fn, error)`` goes to ``errors``."""
    from effsft.grpo.controller import combine_per_func
    from effsft.grpo.reward_guard import GRACE_S, failed_rewards

    if mode == "task":
        import ray

        task = ray.remote(num_cpus=num_cpus, max_retries=0)(score_task)
        args = (ray.put(prompts), ray.put(completions), ray.put(columns))
        refs = [task.remote(f, *args, rule, timeout_s) for f in fn_specs]
        results = []
        for f, ref in zip(fn_specs, refs):
            try:
                results.append(ray.get(ref, timeout=None if timeout_s is None else timeout_s + GRACE_S))
            except Exception as e:  # the task itself died or hung past the grace period
                ray.cancel(ref, force=True)
                results.append((failed_rewards(len(completions)), f"{type(e).__name__}: {e}"[:500]))
    else:
        results = [score_task(f, prompts, completions, columns, rule, timeout_s) for f in fn_specs]
    if errors is not None:
        errors += [(f, err) for f, (_, err) in zip(fn_specs, results) if err]
    return combine_per_func([values for values, _ in results], weights)
