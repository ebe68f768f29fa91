"""DeepSpeed engine set-up and final-model export, for one training worker.

Why a plain ``torch.optim.AdamW``: DeepSpeed's own CPU Adam JIT-builds a C++ op (~40 s) on
first use; passing a torch optimizer avoids it and works for ZeRO 0-3 (ray_notes.md).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from effsft.train.config import LoraSpec, TrainSpec
from effsft.train.schedule import lambda_lr

log = logging.getLogger("effsft.train")


def deepspeed_config(train: TrainSpec, bf16: bool) -> dict:
    """The DeepSpeed JSON config for ``train`` (bf16 on GPU, fp32 on CPU)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # rank 0 can then gather the full weights for save_pretrained
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_trainable_model(model_path: str, dtype: torch.dtype, lora: LoraSpec,
                         trust_remote_code: bool = False, attn_implementation: str | None = None,
                         gradient_checkpointing: bool = False):
    """HF causal LM in train mode, wrapped with LoRA adapters when ``lora.enabled``."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model.train()


def build_engine(model, train: TrainSpec, total_steps: int, bf16: bool):
    """``deepspeed.initialize`` with AdamW over the trainable parameters and the LR schedule.

    Returns the engine; ``engine.module`` is the (possibly peft-wrapped) model,
    ``engine.lr_scheduler`` is stepped by DeepSpeed at every accumulation boundary.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":  # plain SGD: the update is -lr x the gradient (exactness tests)
        opt = torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas),
                                weight_decay=train.weight_decay)
    sched = lambda_lr(opt, train.warmup_steps, total_steps, train.schedule, train.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(train, bf16))
    return engine


def _full_state_dict(engine, prefix: str = "model.") -> dict | None:
    """Full HF weights on rank 0 (ZeRO-3 gathers them: a collective, every rank must call
    this). ``prefix`` strips the :class:`~effsft.train.loop.LossModule` wrapper's name."""
    if engine.zero_optimization_stage() != 3:
        return None  # stages 0-2 keep full parameters on every rank
    state = engine._zero3_consolidated_16bit_state_dict() or {}
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def save_hf_model(engine, tokenizer, out_dir: str | Path, rank: int, lora: LoraSpec) -> None:
    """Rank 0 writes an HF directory (safetensors) + tokenizer; call on every rank.

    LoRA: ``model/`` holds the merged full model (loads with ``from_pretrained`` like any
    model) and ``model/adapter/`` the adapter alone, unless ``lora.merge_on_save`` is off.
    """
    state = _full_state_dict(engine)
    if rank != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = engine.module.model  # unwrap LossModule
    if lora.enabled:
        model.save_pretrained(out / "adapter", safe_serialization=True)
        if lora.merge_on_save:
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(out)
