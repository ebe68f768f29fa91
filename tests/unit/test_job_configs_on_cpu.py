"""Every shipped job config (jobs/*.yaml) validates against its job's config class.

Paths: the examples name absolute paths on shared storage (/mnt/effsft/...) that do not exist
here. Each key typed ``ExistingPath`` (found by walking the config class, not by a list kept
by hand) is redirected to a directory created under tmp_path; every other key is validated as
written, so an unknown key, a wrong type or a bad value still fails.
"""
from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from effsft.cli import JOBS
from effsft.config import ConfigError, _input_exists, _must_exist, build_config, load_yaml

ROOT = Path(__file__).resolve().parents[2]
JOB_DIR = ROOT / "jobs"


def yaml_for(job: str) -> Path:
    return JOB_DIR / f"{job.replace('-', '_')}.yaml"


def config_class(job: str) -> type[BaseModel]:
    mod, name = JOBS[job].config.split(":")
    return getattr(importlib.import_module(mod), name)


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _walk(ann, metadata, key: tuple):
    """Dotted keys (tuples) below one annotation whose value must be an existing path."""
    if any(getattr(m, "func", None) in (_must_exist, _input_exists) for m in metadata):
        yield key
    elif typing.get_origin(ann) is typing.Annotated:
        inner, *meta = typing.get_args(ann)
        yield from _walk(inner, meta, key)
    elif _is_model(ann):
        yield from existing_path_keys(ann, key)
    else:  # Optional[...], Union[...]: look inside
        for arg in typing.get_args(ann):
            yield from _walk(arg, (), key)


def existing_path_keys(cls: type[BaseModel], prefix: tuple = ()) -> set[tuple]:
    out = set()
    for name, f in cls.model_fields.items():
        out.update(_walk(f.annotation, f.metadata, prefix + (name,)))
    return out


def _get(data: dict, key: tuple):
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data: dict, key: tuple, value) -> None:
    for part in key[:-1]:
        data = data[part]
    data[key[-1]] = value


def with_local_paths(cls, data: dict, tmp: Path) -> dict:
    """A deep copy of ``data`` whose existing-path values point to fresh local directories."""
    data = yaml.safe_load(yaml.safe_dump(data))
    for key in existing_path_keys(cls):
        value = _get(data, key)
        if value is None:
            continue
        made = tmp.joinpath(*key)
        made.mkdir(parents=True, exist_ok=True)
        _set(data, key, [str(made)] * len(value) if isinstance(value, list) else str(made))
    return data


def _model_sections(cls: type[BaseModel], data: dict, prefix: str = ""):
    """(dotted prefix, config class, YAML mapping) for the config and every nested section."""
    yield prefix, cls, data
    for name, f in cls.model_fields.items():
        sub = data.get(name)
        if not isinstance(sub, dict):
            continue
        for arg in (f.annotation, *typing.get_args(f.annotation)):
            if _is_model(arg):
                yield from _model_sections(arg, sub, f"{prefix}{name}.")
                break


def _shipped():
    return sorted(JOB_DIR.glob("*.yaml"))


# ---- coverage ----------------------------------------------------------------------------

def test_every_job_has_a_yaml():
    missing = [job for job in JOBS if not yaml_for(job).is_file()]
    assert not missing, f"jobs without an example config in jobs/: {missing}"


def test_every_yaml_belongs_to_a_job():
    names = {yaml_for(job).name for job in JOBS}
    orphans = [p.name for p in _shipped() if p.name not in names]
    assert not orphans, f"jobs/*.yaml with no job in effsft.cli.JOBS: {orphans}"


# ---- each shipped config -----------------------------------------------------------------

@pytest.mark.parametrize("job", sorted(JOBS))
def test_yaml_validates(job, tmp_path):
    cls = config_class(job)
    raw = load_yaml(yaml_for(job))
    cfg = build_config(cls, with_local_paths(cls, raw, tmp_path))
    assert isinstance(cfg, cls)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_yaml_lists_every_key(job):
    """The YAML is the schema (STYLE.md): every key of every section present is written out."""
    cls = config_class(job)
    for prefix, section, data in _model_sections(cls, load_yaml(yaml_for(job))):
        keys = {f.alias or name for name, f in section.model_fields.items()}  # YAML spells aliases
        missing = keys - set(data)
        assert not missing, f"{yaml_for(job).name}: {prefix or '<top>'} lacks {sorted(missing)}"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_yaml_paths_are_cluster_paths(job):
    """Outputs and inputs are absolute (or URIs): a relative path would resolve inside the
    job's temporary working directory on whatever node ran the driver."""
    cls = config_class(job)
    raw = load_yaml(yaml_for(job))
    keys = existing_path_keys(cls) | {("output",)}
    for key in keys:
        value = _get(raw, key)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                assert v.startswith("/") or "://" in v, f"{job}: {'.'.join(key)}={v!r} is relative"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_yaml_documents_its_submit_command(job):
    text = yaml_for(job).read_text()
    cmd = rf"python -m effsft {re.escape(job)} jobs/{re.escape(yaml_for(job).name)}"
    assert re.search(cmd, text), f"{yaml_for(job).name}: no `ray job submit ... {cmd}` example"
    assert "ray job submit" in text


# ---- the relaxed path check still rejects bad configs --------------------------------------

@pytest.mark.parametrize("job", sorted(JOBS))
def test_unknown_key_and_wrong_type_fail(job, tmp_path):
    cls = config_class(job)
    good = with_local_paths(cls, load_yaml(yaml_for(job)), tmp_path)
    with pytest.raises(ConfigError, match="outputz: unknown key"):
        build_config(cls, {**good, "outputz": "/x"})
    # a mapping where a scalar belongs is the wrong type for every scalar key
    scalar = next(k for k, v in good.items() if isinstance(v, (str, int, float)))
    with pytest.raises(ConfigError, match=rf"{scalar}:"):
        build_config(cls, {**good, scalar: {"not": "a scalar"}})


def test_missing_existing_path_still_fails(tmp_path):
    """Without the redirection, a shipped example with an input path fails on that path."""
    cls = config_class("prepare")
    with pytest.raises(ConfigError, match="input.path: .*does not exist"):
        build_config(cls, load_yaml(yaml_for("prepare")))


def test_existing_path_walker_finds_nested_and_optional_keys():
    assert existing_path_keys(config_class("eval")) == {("model", "path"), ("data", "path"),
                                                        ("eval_split",)}
    assert existing_path_keys(config_class("prepare")) == {("input", "path")}
    assert existing_path_keys(config_class("tiny-model")) == {("corpus",)}


def _leaf_keys(data: dict, prefix: str = ""):
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_lists_every_key(job, capsys):
    """``effsft <job> --help`` exits 0 and names every key the shipped YAML writes out."""
    from effsft.cli import main

    assert main([job, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: effsft {job} ")
    listed = {line.split(":", 1)[0].strip() for line in out.splitlines() if line.startswith("  ")}
    # a mapping- or list-valued key (synth's task_mix, grpo's reward_funcs) is listed by its name
    missing = [k for k in _leaf_keys(load_yaml(yaml_for(job)))
               if not any(k == key or k.startswith(f"{key}.") for key in listed)]
    assert not missing, f"effsft {job} --help does not list {missing}"
    assert main([job, "-h", "budget=3"]) == 0  # -h wins over anything else on the line
