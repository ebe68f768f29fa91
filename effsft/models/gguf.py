"""Recipe ``effsft import-gguf``: a GGUF file -> an ordinary HF safetensors directory.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=NAME)`` with the ``gguf``
package installed): weights come back dequantised to the requested dtype, and the tokenizer
with the chat template stored in the file. What is left to do here is what a plain
``save_pretrained`` gets wrong: the loaded model still carries the GGUF quantizer state
(``hf_quantizer``, ``config.quantization_config``), so the saved directory would claim to be
quantised and every later load would look for a GGUF file. We clear it, save safetensors and
check that the directory loads back as a plain model.

The values are those of the quantised model (e.g. Q4_1), not of the original checkpoint.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from effsft.config import ConfigError, ExistingPath, OutputPath, Strict, to_dict
from effsft.runtime import OutputDir

GGUF_MAGIC = b"GGUF"


class ImportGGUFConfig(Strict):
    """``effsft import-gguf``: ``gguf`` is a ``.gguf`` file or a directory holding exactly one."""

    gguf: ExistingPath
    output: OutputPath
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    overwrite: bool = False


def find_gguf(path: str | Path) -> Path:
    """The GGUF file named by ``path`` (a file, or a directory with exactly one ``*.gguf``).

    Raises:
        ConfigError: no such file, several candidates, or not a GGUF file (bad magic bytes).
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(p.rglob("*.gguf"))
        if not found:
            raise ConfigError(f"gguf: no *.gguf file under {p}")
        if len(found) > 1:
            raise ConfigError(f"gguf: {len(found)} *.gguf files under {p} ({', '.join(f.name for f in found)}); "
                              "name one")
        p = found[0]
    if not p.is_file():
        raise ConfigError(f"gguf: not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"gguf: {p} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return p.resolve()


def load_gguf(path: Path, dtype: str = "float32"):
    """(model, tokenizer) read from a GGUF file by transformers; the model is dequantised.

    Raises:
        ConfigError: the ``gguf`` package is missing or the file cannot be read (truncated, an
            architecture transformers does not know).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise ConfigError("gguf: reading GGUF needs the `gguf` package (pip install gguf)")
    torch_dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    except (ValueError, OSError, KeyError, IndexError, EOFError, RuntimeError) as e:
        raise ConfigError(f"gguf: cannot read {path}: {type(e).__name__}: {e}") from None
    return model, tok


def strip_quantization(model) -> None:
    """Forget the GGUF quantizer so ``save_pretrained`` writes a plain (dequantised) model."""
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    # GGUF files store a name like "Smollm2 135M 8k Lc100K Mix1 Ep2" that is not a path.
    model.config._name_or_path = ""
    if hasattr(model.config, "_model_name_or_path"):
        model.config._model_name_or_path = ""


def run_import_gguf(cfg: ImportGGUFConfig) -> dict:
    """Convert, save (safetensors), reload as a plain HF model to check, commit."""
    import json

    from effsft.models.loading import count_params, load_model
    from effsft.report.manifest import fingerprint, write_manifest

    src = find_gguf(cfg.gguf)
    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    model, tok = load_gguf(src, cfg.dtype)
    strip_quantization(model)
    model.save_pretrained(work, safe_serialization=True)
    tok.save_pretrained(work)
    saved = json.loads((work / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError(f"{work}/config.json still has a quantization_config")
    n = count_params(load_model(work, dtype=cfg.dtype))  # loads back as a plain model
    write_manifest(work, "import-gguf", to_dict(cfg), counts={"parameters": n},
                   inputs={"gguf": {"path": str(src), "fingerprint": fingerprint(str(src))}},
                   metrics={"architecture": saved.get("architectures"), "has_chat_template":
                            bool(getattr(tok, "chat_template", None))})
    out.commit()
    return {"output": str(out.final), "parameters": n, "gguf": str(src)}
