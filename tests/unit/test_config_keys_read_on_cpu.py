"""No dead config keys: every field of every config section (a ``Strict`` model) is read as an
attribute somewhere in effsft (a key that nothing reads is a promise the job does not keep)."""
import ast
import importlib
import inspect
import pathlib
import pkgutil

import effsft
from effsft.config import Strict

PKG = pathlib.Path(effsft.__file__).parent


def _sections() -> set[type]:
    out = set()
    for m in pkgutil.walk_packages(effsft.__path__, "effsft."):
        if m.name.endswith("__main__"):
            continue
        mod = importlib.import_module(m.name)
        out |= {c for _, c in inspect.getmembers(mod, inspect.isclass) if issubclass(c, Strict) and c is not Strict}
    return out


def test_every_config_key_is_read():
    read = {n.attr for p in PKG.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Attribute)}
    sections = _sections()
    assert len(sections) > 20  # the walk found the recipes' sections
    dead = {f"{c.__module__}.{c.__name__}.{f}" for c in sections for f in c.model_fields
            if f in vars(c).get("__annotations__", {}) and f not in read}
    assert not dead, f"config keys that no code reads: {sorted(dead)}"
