"""One config system for every job: typed, frozen pydantic models loaded from YAML plus
dotted ``key=value`` overrides.

The YAML *is* the schema: every model forbids unknown keys, so a typo fails before any work
starts, and every error names the dotted key it is about (``sft.qtuning.sample_ratio: ...``).

    cfg = load_config(SelectConfig, "jobs/select.yaml", ["budget=0.1", "scorer.batch_size=16"])
"""
from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from typing_extensions import Annotated


class ConfigError(ValueError):
    """A bad configuration. The message names the offending key(s)."""


class Strict(BaseModel):
    """Base for every config section: unknown keys and silent coercions are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


def _must_exist(p: str) -> str:
    if "://" in p:
        raise ValueError(f"{p}: needs a local or mounted path (object-store URIs are read for "
                         "corpora only: input.path / data.path)")
    if not os.path.exists(p):
        raise ValueError(f"path does not exist: {p}")
    return p


def _local_output(p: str) -> str:
    if "://" in p:
        raise ValueError(f"{p}: outputs need a local or mounted path (they appear by an atomic "
                         "rename, which object stores do not have); sync them to a bucket afterwards")
    return p


def _input_exists(p: str) -> str:
    from effsft.storage import check_exists

    check_exists(p)  # a typo'd bucket or key fails here, in the driver, within seconds
    return p


ExistingPath = Annotated[str, AfterValidator(_must_exist)]
"""A local (or mounted) path that must exist when the config is loaded: models, eval splits."""

OutputPath = Annotated[str, AfterValidator(_local_output)]
"""Where a job writes: a local or mounted path (POSIX rename), never a URI."""

InputPath = Annotated[str, AfterValidator(_input_exists)]
"""A corpus location that must exist when the config is loaded: a local path, or a pyarrow
filesystem URI (``s3://``, ``gs://``, ``hdfs://`` ...; see :mod:`effsft.storage`)."""

C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is parsed as a YAML scalar/flow value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{shown}")
    return "; ".join(lines)


def build_config(cls: type[C], data: Mapping[str, Any]) -> C:
    """Validate a plain dict into ``cls``; errors become a ConfigError naming the keys."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"invalid {cls.__name__}: {_format_errors(e)}") from None


def _type_name(annotation: Any) -> str:
    """``Optional[int]`` -> ``int | None``; ``Literal['a', 'b']`` -> ``'a' | 'b'``; classes by name."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The config-section class behind ``Section`` or ``Optional[Section]``, else None."""
    if typing.get_origin(annotation) in (list, tuple, dict):
        return None
    for c in (annotation, *typing.get_args(annotation)):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def config_reference(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config class with its type and default (``effsft <job> --help``)."""
    lines = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{info.alias or name}"  # YAML spells aliases
        section = _section_of(info.annotation)
        if section is not None:
            if not info.is_required() and info.default is None:  # an optional section, off by default
                lines.append(f"  {key}: {section.__name__} | None = None")
            lines += config_reference(section, f"{key}.")
        else:
            if info.is_required():
                default = "(required)"
            else:
                value = info.get_default(call_default_factory=True)
                if isinstance(value, list):
                    value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
                default = f"= {value!r}"
            lines.append(f"  {key}: {_type_name(info.annotation)} {default}")
            item = _section_of(typing.get_args(info.annotation)[0]) if (
                typing.get_origin(info.annotation) is list) else None
            if item is not None:  # a list of sections: the keys of one item
                lines += config_reference(item, f"{key}[].")
    return lines


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys")
    return data


def load_config(cls: type[C], path: str | os.PathLike | None = None,
                overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None) -> C:
    """YAML file (optional) + dotted overrides -> a validated, frozen ``cls``."""
    data: dict = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    data = apply_overrides(data, overrides)
    return build_config(cls, data)


def to_dict(cfg: BaseModel) -> dict:
    """JSON-ready resolved config (for manifests)."""
    return cfg.model_dump(mode="json")


# ---- sections shared by several jobs -------------------------------------------------------
from typing import Literal, Optional  # noqa: E402

from pydantic import Field  # noqa: E402


class ModelSpec(Strict):
    """A local HF causal-LM directory, and how conversations are rendered for it."""

    path: ExistingPath
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    # auto: the tokenizer's chat template when it has one, else the documented default
    # (Human:/Assistant:); chat: require the tokenizer's; default: always the documented one.
    # One rule for select's scorers, sft, eval, grpo prompts and prune calibration.
    template: Literal["auto", "chat", "default"] = "auto"


class CorpusSpec(Strict):
    """A corpus: JSONL/Parquet/Arrow file, a directory of shards, or an HF save_to_disk dir,
    on a local/mounted path or behind a URI (``s3://bucket/corpus``)."""

    path: InputPath
    split: str = "train"
    max_row_bytes: int = Field(1 << 20, gt=0)
    id_field: str = "id"
    shard_rows: int = Field(50_000, gt=0)
    # A file that cannot be read (truncated, bad footer, corrupt compressed stream): "reject"
    # = one unreadable_file row in rejects.parquet (rows before the damage kept), the job goes
    # on and its manifest lists the file; "fail" = the job exits 1 naming the file.
    on_unreadable: Literal["reject", "fail"] = "reject"


class TokenizeSpec(Strict):
    max_len: int = Field(1024, gt=8)
    train_on: Literal["all", "last"] = "all"
    truncation: Literal["left", "drop"] = "left"
