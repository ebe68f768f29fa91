"""docker/: what the Dockerfiles COPY exists and survives .dockerignore; both images share Ray
and Python; torch comes before the project; the build settings match the Makefile/pyproject."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]


def _text(rel: str) -> str:
    return (ROOT / rel).read_text()


def _instructions(rel: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in _text(rel).splitlines():
        s = raw.strip()
        if not s or (s.startswith("#") and not buf):
            continue
        buf += " " + s.rstrip("\\").strip() if buf else s.rstrip("\\").strip()
        if not s.endswith("\\"):
            op, _, rest = buf.partition(" ")
            lines.append((op.upper(), rest.strip()))
            buf = ""
    return lines


def _arg(rel: str, name: str) -> str:
    for op, rest in _instructions(rel):
        if op == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"{rel}: no ARG {name}")


def _dockerignore_allows(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    allowed = True
    for raw in _text(".dockerignore").splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = Path(rel).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            allowed = neg
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_files_exist_and_reach_the_build_context(dockerfile):
    copies = [rest for op, rest in _instructions(dockerfile) if op in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}: no such file"
            assert _dockerignore_allows(src), f"{dockerfile}: {src} is excluded by .dockerignore"
    # the build needs the package metadata and the code
    sources = " ".join(copies)
    for needed in ("pyproject.toml", "README.md", "effsft", "jobs"):
        assert needed in sources, f"{dockerfile} does not COPY {needed}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_image_and_versions(dockerfile):
    frm = [rest for op, rest in _instructions(dockerfile) if op == "FROM"]
    assert len(frm) == 1 and frm[0].startswith("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-")
    flavour = frm[0].rsplit("-", 1)[1]
    assert flavour == ("cpu" if dockerfile.endswith("cpu") else "${CUDA_TAG}")
    # pyproject's Ray range admits the image's Ray
    deps = tomllib.loads(_text("pyproject.toml"))["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", ray_dep).groups()
    v = tuple(int(x) for x in _arg(dockerfile, "RAY_VERSION").split("."))
    assert tuple(int(x) for x in lo.split(".")) <= v < tuple(int(x) for x in hi.split("."))


def test_both_images_share_ray_python_torch_deepspeed():
    for name in ("RAY_VERSION", "PYTHON_TAG", "TORCH_SPEC", "DEEPSPEED_SPEC"):
        assert _arg(DOCKERFILES[0], name) == _arg(DOCKERFILES[1], name), name
    make = re.search(r"^TORCH_SPEC \?= (\S+)", _text("Makefile"), re.M).group(1)
    assert _arg(DOCKERFILES[0], "TORCH_SPEC") == make


@pytest.mark.parametrize("dockerfile,index,extra", [
    ("docker/Dockerfile.cpu", "whl/cpu", ".[cpu]"), ("docker/Dockerfile.cuda", "whl/cu", ".[gpu]")])
def test_torch_first_then_project(dockerfile, index, extra):
    runs = [rest for op, rest in _instructions(dockerfile) if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    project_at = next(i for i, r in enumerate(runs) if f'"{extra}"' in r)
    ds_at = next(i for i, r in enumerate(runs) if "${DEEPSPEED_SPEC}" in r)
    assert torch_at < ds_at < project_at          # ops compile against the installed torch
    assert index in _arg(dockerfile, "TORCH_INDEX_URL")
    extras = tomllib.loads(_text("pyproject.toml"))["project"]["optional-dependencies"]
    assert extra[2:-1] in extras


def test_cuda_image_prebuilds_deepspeed_ops_and_faiss_gpu():
    runs = " ".join(rest for op, rest in _instructions("docker/Dockerfile.cuda") if op == "RUN")
    for flag in ("DS_BUILD_OPS=0", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_BUILD_UTILS=1"):
        assert flag in runs, flag
    assert "ds_report" in runs and "--no-build-isolation" in runs
    extras = tomllib.loads(_text("pyproject.toml"))["project"]["optional-dependencies"]
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    cpu_runs = " ".join(rest for op, rest in _instructions("docker/Dockerfile.cpu") if op == "RUN")
    assert "DS_BUILD_CPU_ADAM=1" in cpu_runs and "DS_ACCELERATOR=cpu" in cpu_runs


def test_readme_builds_both_images_from_the_repo_root():
    text = _text("docker/README.md")
    for df in DOCKERFILES:
        assert re.search(rf"docker build -f {re.escape(df)} .*-t \S+ \.$", text, re.M), df
