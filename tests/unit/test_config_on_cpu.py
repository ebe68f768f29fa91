from typing import Optional

import pytest
from pydantic import Field

from effsft.cli import main, parse_job_args
from effsft.config import ConfigError, ExistingPath, Strict, apply_overrides, build_config, load_config


class Inner(Strict):
    ratio: float = Field(0.5, ge=0, le=1)
    mode: str = "a"


class Outer(Strict):
    path: ExistingPath
    n: int = 3
    inner: Inner = Inner()
    maybe: Optional[int] = None


def test_overrides_nested_and_typed(tmp_path):
    cfg = load_config(Outer, None, [f"path={tmp_path}", "inner.ratio=0.25", "n=7", "maybe=null"])
    assert cfg.inner.ratio == 0.25 and cfg.n == 7 and cfg.maybe is None


def test_yaml_plus_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"path: {tmp_path}\ninner:\n  mode: b\n")
    cfg = load_config(Outer, y, ["inner.ratio=1"])
    assert cfg.inner.mode == "b" and cfg.inner.ratio == 1.0


@pytest.mark.parametrize("overrides,key", [
    (["inner.ratoi=0.1"], "inner.ratoi: unknown key"),
    (["nn=1"], "nn: unknown key"),
    (["n=abc"], "n: "),
    (["inner.ratio=2"], "inner.ratio: "),
])
def test_errors_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, [f"path={tmp_path}"] + overrides)
    assert key in str(e.value)


def test_missing_path_names_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, [f"path={tmp_path}/nope"])
    assert "path: " in str(e.value) and "does not exist" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(Outer, {})
    assert "path: required key is missing" in str(e.value)


def test_frozen(tmp_path):
    cfg = load_config(Outer, None, [f"path={tmp_path}"])
    with pytest.raises(Exception):
        cfg.n = 4


def test_override_into_value_is_an_error():
    with pytest.raises(ConfigError, match="n: is a value"):
        apply_overrides({"n": 1}, ["n.x=2"])


def test_cli_flag_parsing():
    path, ov = parse_job_args(["job.yaml", "a.b=1", "--budget", "0.1", "--model", "m", "--overwrite"],
                              {"model": "model.path"})
    assert path == "job.yaml"
    assert ov == ["a.b=1", "budget=0.1", "model.path=m", "overwrite=true"]


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["synth", "--output", str(out), "--rows", "10", "--noisee", "0.1"])
    assert rc == 2
    assert "noisee: unknown key" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert main(["synth", "--output", str(out), "--noise", "1.5"]) == 2
    assert main(["no-such-job"]) == 2


def test_every_job_config_class_forbids_unknown_keys():
    from effsft.cli import JOBS, _load

    for name, job in JOBS.items():
        cls = _load(job.config)
        assert cls.model_config.get("extra") == "forbid", name
