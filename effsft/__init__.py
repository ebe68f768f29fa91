"""effsft: efficient LLM fine-tuning at cluster scale (select, sft, grpo, prune, eval) on Ray."""

__version__ = "0.1.0"
