"""``effsft <job> [CONFIG.yaml] [key=value ...] [--flag value ...]``

Every job takes a YAML config plus dotted ``key=value`` overrides; flags are shorthands for
keys (``--budget 0.1`` is ``budget=0.1``; a few aliases such as ``--model DIR`` ->
``model.path=DIR`` are listed per job). Exit codes: 0 success, 2 bad config or arguments
(the message names the key), 1 failure while running.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from effsft.config import ConfigError, load_config


@dataclass(frozen=True)
class Job:
    config: str                     # "module:ConfigClass"
    run: str                        # "module:function"
    aliases: dict = field(default_factory=dict)
    help: str = ""


JOBS: dict[str, Job] = {
    "synth": Job("effsft.corpus.jobs:SynthConfig", "effsft.corpus.jobs:run_synth",
                 help="synthetic instruction corpus with labelled noise"),
    "prepare": Job("effsft.corpus.jobs:PrepareConfig", "effsft.corpus.jobs:run_prepare",
                   {"input": "input.path"}, help="normalise a corpus into canonical shards + rejects"),
    "tiny-model": Job("effsft.models.jobs:TinyModelConfig", "effsft.models.jobs:run_tiny_model",
                      help="tiny Llama/Qwen2 model + offline tokenizer as an HF directory"),
    "import-gguf": Job("effsft.models.gguf:ImportGGUFConfig", "effsft.models.gguf:run_import_gguf",
                       help="a GGUF file -> an HF safetensors directory (dequantised, chat template kept)"),
    "eval": Job("effsft.eval.recipe:EvalConfig", "effsft.eval.recipe:run_eval",
                {"model": "model.path", "data": "data.path"},
                help="perplexity + exact-match accuracy"),
    "select": Job("effsft.select.recipe:SelectConfig", "effsft.select.recipe:run_select",
                  {"input": "input.path", "model": "model.path"},
                  help="distributed, resumable data selection (random, length, ce, ifd, zip, km_*, ...)"),
    "sft": Job("effsft.sft.recipe:SFTConfig", "effsft.sft.recipe:run_sft",
                {"model": "model.path", "data": "data.path"},
                help="DeepSpeed SFT on Ray Train (Q-Tuning hook, LoRA, checkpoint/resume)"),
    "prune": Job("effsft.prune.recipe:PruneConfig", "effsft.prune.recipe:run_prune",
                  {"model": "model.path", "data": "prune.calib.data.path",
                   "eval_data": "prune.eval.data.path", "method": "prune.method",
                   "criterion": "prune.criterion", "sparsity": "prune.sparsity"},
                  help="DLP/OWL/uniform layerwise pruning (Wanda/SparseGPT/magnitude)"),
    "grpo": Job("effsft.grpo.recipe:GRPOConfig", "effsft.grpo.recipe:run_grpo",
                {"model": "model.path", "data": "data.path"},
                help="GRPO: rollout actors + DeepSpeed on Ray Train, shared-prefix forward"),
    "demo": Job("effsft.demo:DemoConfig", "effsft.demo:run_demo",
                help="the whole pipeline on an embedded local Ray with a tiny model"),
}


def _load(ref: str):
    mod, name = ref.split(":")
    return getattr(importlib.import_module(mod), name)


def parse_job_args(args: list[str], aliases: dict) -> tuple[str | None, list[str]]:
    """Split job arguments into (config path, overrides)."""
    path, overrides, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or nxt.startswith("--"):
                    val = "true"
                else:
                    val, i = nxt, i + 1
            key = aliases.get(key, key.replace("-", "_"))
            overrides.append(f"{key}={val}")
        elif "=" in a:
            overrides.append(a)
        elif path is None and a.endswith((".yaml", ".yml")):
            path = a
        else:
            raise ConfigError(f"unexpected argument {a!r} (use key=value or --key value)")
        i += 1
    return path, overrides


def usage() -> str:
    lines = ["usage: effsft <job> [CONFIG.yaml] [key=value ...] [--key value ...]", "", "jobs:"]
    lines += [f"  {name:<11} {job.help}" for name, job in JOBS.items()]
    return "\n".join(lines)


def job_usage(name: str) -> str:
    """``effsft <job> --help``: the command line, the flag aliases and every config key."""
    from effsft.config import config_reference

    job = JOBS[name]
    lines = [f"usage: effsft {name} [CONFIG.yaml] [key=value ...] [--key value ...]", "",
             f"{name}: {job.help}", ""]
    if job.aliases:
        lines.append("flag aliases:")
        lines += [f"  --{flag:<10} {key}" for flag, key in job.aliases.items()]
        lines.append("")
    lines.append("config keys (YAML or dotted key=value; --a.b value is a.b=value):")
    lines += config_reference(_load(job.config))
    return "\n".join(lines)


def _fresh_work_dir(cfg) -> Path | None:
    """The job's ``<output>.partial`` work dir if it does not exist yet (this run would make it)."""
    from effsft.runtime import OutputDir

    output = getattr(cfg, "output", None)
    if not isinstance(output, str):
        return None
    work = OutputDir(output).work
    return None if work.exists() else work


def main(argv: list[str] | None = None) -> int:
    from effsft.runtime import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"effsft: unknown job {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    job = JOBS[name]
    if any(a in ("-h", "--help") for a in rest):
        print(job_usage(name))
        return 0
    setup_logging()
    try:
        path, overrides = parse_job_args(rest, job.aliases)
        cfg = load_config(_load(job.config), path, overrides)
    except ConfigError as e:
        print(f"effsft {name}: config error: {e}", file=sys.stderr)
        return 2
    from effsft.runtime import OutputExists

    fresh = _fresh_work_dir(cfg)
    try:
        result = _load(job.run)(cfg)
    except (ConfigError, OutputExists) as e:
        # A bad input found while setting up (no usable rows, a missing column) leaves nothing
        # behind: the work dir goes if this run made it (a crashed run's dir is kept to resume).
        if fresh is not None and fresh.exists():
            shutil.rmtree(fresh, ignore_errors=True)
        print(f"effsft {name}: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"effsft {name}: failed", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
