"""``effsft <job> [CONFIG.yaml] [key=value ...] [--flag value ...]``

Every job takes a YAML config plus dotted ``key=value`` overrides; flags are shorthands for
keys (``--budget 0.1`` is ``budget=0.1``; a few aliases such as ``--model DIR`` ->
``model.path=DIR`` are listed per job). Exit codes: 0 success, 2 bad config or arguments
(the message names the key), 1 failure while running.
"""
from __future__ import annotations

import importlib
import json
import logging
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
    "select": Job("effsft.select.config:SelectConfig", "effsft.select.recipe:run_select",
                  {"input": "input.path", "model": "model.path"},
                  help="distributed, resumable data selection (random, length, ce, ifd, zip, km_*, ...)"),
    "sft": Job("effsft.sft.recipe:SFTConfig", "effsft.sft.recipe:run_sft",
                {"model": "model.path", "data": "data.path"},
                help="DeepSpeed SFT on Ray Train (Q-Tuning hook, LoRA, checkpoint/resume)"),
    "prune": Job("effsft.prune.config:PruneConfig", "effsft.prune.recipe:run_prune",
                  {"model": "model.path", "data": "prune.calib.data.path",
                   "eval_data": "prune.eval.data.path", "method": "prune.method",
                   "criterion": "prune.criterion", "sparsity": "prune.sparsity"},
                  help="DLP/OWL/uniform layerwise pruning (Wanda/SparseGPT/magnitude)"),
    "grpo": Job("effsft.grpo.config:GRPOConfig", "effsft.grpo.recipe:run_grpo",
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
    lines.append("run options (flags or key=value; not part of the config):")
    lines += [f"  --{k:<10} {v}" for k, v in RUN_OPTIONS.items()]
    lines.append("")
    lines.append("config keys (YAML or dotted key=value; --a.b value is a.b=value):")
    lines += config_reference(_load(job.config))
    return "\n".join(lines)


# Options of the run, not of the job's result (never in the config or the manifest):
# ``--wait`` (wait for another job writing the same output instead of exiting 2) and
# ``--log_level`` (``info``: one line per stage + progress bars; ``debug``: framework logs too).
RUN_OPTIONS = {"wait": "wait for another job holding the output's lock instead of exiting 2",
               "log_level": "console verbosity: info (default) | debug (framework logs on the console too) | warning"}


def split_run_options(overrides: list[str]) -> tuple[dict, list[str]]:
    """Take ``wait=...`` / ``log_level=...`` out of the overrides."""
    from effsft.config import parse_override

    opts, rest = {}, []
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("-")
        if key in RUN_OPTIONS:
            _, value = parse_override(item)
            opts[key] = value
        else:
            rest.append(item)
    if not isinstance(opts.get("wait", False), bool):
        raise ConfigError(f"wait: must be true or false (got {opts['wait']!r})")
    level = str(opts.get("log_level", "info")).lower()
    if level not in ("debug", "info", "warning"):
        raise ConfigError(f"log_level: must be debug, info or warning (got {opts['log_level']!r})")
    opts["log_level"] = level
    return opts, rest


def failure_message(e: BaseException) -> str:
    """One line for the console: a full disk or an unreadable file named plainly, else the
    innermost error."""
    import errno

    from effsft.corpus.readers import UnreadableFileError

    chain, cur, seen = [], e, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = (cur.cause if isinstance(getattr(cur, "cause", None), BaseException) else None) or cur.__cause__ or cur.__context__
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            where = f" while writing {c.filename}" if c.filename else ""
            return f"disk full{where}: {c.strerror or c}"
        if isinstance(c, UnreadableFileError):
            # Ray re-raises a task's error as a subclass of both RayTaskError and the original
            # type, whose text starts with the task header; the message is the line naming the file.
            lines = str(getattr(c, "cause", None) or c).splitlines()
            return next((ln.strip() for ln in lines if "unreadable corpus file" in ln), lines[-1] if lines else "")
    root = chain[-1]
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[-1] if text else ''}"


def main(argv: list[str] | None = None) -> int:
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
    from effsft import console

    try:
        path, overrides = parse_job_args(rest, job.aliases)
        run_opts, overrides = split_run_options(overrides)
        console.setup(run_opts["log_level"])
        cfg = load_config(_load(job.config), path, overrides)
    except ConfigError as e:
        print(f"effsft {name}: config error: {e}", file=sys.stderr)
        return 2
    from effsft import interrupts, runtime
    from effsft.outputlock import OutputLocked

    runtime.RUN.wait, runtime.RUN.job = run_opts.get("wait", False), name
    runtime.RUN.argv = [sys.argv[0], *argv] if sys.argv else list(argv)
    runtime.RUN.handle_signals = True
    output = getattr(cfg, "output", None)
    runtime.RUN.output = Path(output).resolve() if isinstance(output, str) else None
    if name == "demo" and runtime.RUN.output is not None:  # the demo's stages share its logs/
        console.log_to(runtime.RUN.output / "logs")
    def interrupted(what: str, held: list[str]) -> None:
        kept = f"; work kept in {', '.join(held)}: run the same command again to resume" if held else ""
        print(f"effsft {name}: interrupted ({what}), workers stopped{kept}", file=sys.stderr, flush=True)

    def on_stuck(what: str) -> None:  # the watcher thread: the driver is blocked inside Ray
        held = [str(o.work) for o in runtime._OPEN if o.work.exists()]
        runtime.release_outputs()
        interrupted(what, held)
        sys.stderr.flush()
        interrupts.stop_workers()  # then os._exit (interrupts._watch)

    interrupts.install(on_stuck)
    try:
        result = _load(job.run)(cfg)
    except (ConfigError, runtime.OutputExists, OutputLocked) as e:
        # A bad input found while setting up (no usable rows, a missing column) leaves nothing
        # behind: the work dir goes if this run made it (a crashed run's dir is kept to resume).
        runtime.release_outputs(remove_fresh_work=True)
        print(f"effsft {name}: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        return _stop(e, interrupted)
    except Exception as e:
        if interrupts.received():  # the signal's exception came back wrapped (e.g. by Ray Train)
            return _stop(None, interrupted)
        trace = traceback.format_exc()
        console.log_exception(trace)
        if not console.quiet() or console.S.file is None:
            print(trace, file=sys.stderr, end="")
        runtime.release_outputs()
        where = f" (traceback in {console.S.log_dir / console.LOG_FILE})" if console.S.file is not None else ""
        print(f"effsft {name}: failed: {failure_message(e)}{where}", file=sys.stderr)
        return 1
    finally:
        runtime.release_outputs()
        console.detach()
    print(format_result(result))
    return 0


def _stop(e, interrupted) -> int:
    """The main thread's clean stop after SIGTERM/SIGINT: locks released, the message, exit.

    The workers are stopped (:func:`effsft.interrupts.stop_workers`) and the process ends here
    with ``os._exit``: Ray's own shutdown from an interrupted driver can race its background
    threads into a C++ exit with status 1, and nothing is left to do.
    """
    import os

    from effsft import interrupts, runtime

    interrupts.HANDLING.set()
    held = [str(o.work) for o in runtime._OPEN if o.work.exists()]
    runtime.release_outputs()
    what = "SIGTERM" if isinstance(e, interrupts.Terminated) or (
        e is None and interrupts.received() == "SIGTERM") else "SIGINT"
    interrupted(what, held)
    code = interrupts.exit_code(e)
    if runtime.RUN.handle_signals and interrupts.EXIT_ON_STOP:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        interrupts.stop_workers()
        os._exit(code)
    interrupts.HANDLED.set()
    return code


def format_result(result) -> str:
    """The job's result as JSON, one line per top-level key (a long demo summary stays short)."""
    if not isinstance(result, dict) or not result:
        return json.dumps(result, default=str)
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in result.items())
    return "{\n" + body + "\n}"


if __name__ == "__main__":
    sys.exit(main())
