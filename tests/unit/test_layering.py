"""The package layering, read from the imports of every module under effsft/ (issue 16).

ground   storage, runtime, config, console, interrupts, outputlock (and the package itself)
1        corpus, models, report
2        train
3        the recipes: select, sft, grpo, prune, eval (never each other)
4        cli, demo (and __main__)

A module may import its own package and any lower layer; never a higher layer, never a sibling
recipe. The pure algorithm modules never import ray.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "effsft"
LAYER = {"storage": 0, "runtime": 0, "config": 0, "console": 0, "interrupts": 0, "outputlock": 0, "": 0,
         "corpus": 1, "models": 1, "report": 1,
         "train": 2,
         "select": 3, "sft": 3, "grpo": 3, "prune": 3, "eval": 3,
         "cli": 4, "demo": 4, "__main__": 4}
RECIPES = {u for u, n in LAYER.items() if n == 3}
PURE = ["grpo/loss.py", "grpo/prefix_grouper.py", "grpo/group_plan.py", "grpo/attention.py",
        "sft/qtuning.py", "sft/qtuning_scores.py", "sft/qtuning_samples.py", "sft/qtuning_loss.py", "sft/qtuning_config.py",
        "prune/criteria.py", "prune/allocate.py",
        "prune/config.py", "prune/calibration.py", "prune/blocks.py", "prune/streaming.py",
        "select/ranking.py", "select/zip.py", "select/kcenter.py",
        "select/less/features.py", "select/less/gradients.py", "select/less/warmup.py"]


def _module(path: pathlib.Path) -> str:
    parts = ["effsft", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module named by an import anywhere in the file (function-level imports too)."""
    me = _module(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = sorted(PKG.rglob("*.py"))


def test_every_package_has_a_layer():
    units = {_unit(_module(p)) for p in MODULES}
    assert units <= set(LAYER), f"give these a layer in the test and docs: {sorted(units - set(LAYER))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers(path):
    me = _unit(_module(path))
    bad = []
    for m in sorted(_imports(path)):
        if m != "effsft" and not m.startswith("effsft."):
            continue
        to = _unit(m)
        if to == me:
            continue
        if LAYER[to] > LAYER[me] or (me in RECIPES and to in RECIPES):
            bad.append(f"{m} ({to}, layer {LAYER[to]})")
    assert not bad, f"{path.relative_to(PKG)} ({me}, layer {LAYER[me]}) imports upward or across recipes: {bad}"


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for p in MODULES:
        me = _unit(_module(p))
        edges.setdefault(me, set()).update(
            _unit(m) for m in _imports(p) if m.startswith("effsft.") and _unit(m) != me)
    state: dict[str, int] = {}

    def visit(u, trail):
        state[u] = 1
        for v in edges.get(u, ()):
            assert state.get(v) != 1, f"import cycle between packages: {' -> '.join([*trail, u, v])}"
            if v not in state:
                visit(v, [*trail, u])
        state[u] = 2

    for u in edges:
        if u not in state:
            visit(u, [])


@pytest.mark.parametrize("rel", PURE)
def test_pure_algorithm_modules_do_not_import_ray(rel):
    path = PKG / rel
    assert path.exists(), rel
    ray = sorted(m for m in _imports(path) if m == "ray" or m.startswith("ray."))
    effsft_ray = sorted(m for m in _imports(path)
                        if m.startswith("effsft.") and _unit(m) in ("runtime",))
    assert not ray and not effsft_ray, f"{rel} imports {ray + effsft_ray}"


def _minus_100s(path: pathlib.Path) -> list[int]:
    """Lines with the literal -100 in code (docstrings and comments aside)."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub)
            and isinstance(n.operand, ast.Constant) and n.operand.value == 100]


def test_the_ignore_index_has_one_home():
    home = PKG / "corpus" / "tokenize.py"
    defined = [p for p in MODULES
               if any(isinstance(n, (ast.Assign, ast.AnnAssign)) and "IGNORE_INDEX" in ast.unparse(n).split("=")[0]
                      for n in ast.parse(p.read_text()).body)]
    assert defined == [home], f"IGNORE_INDEX is defined in {defined}; its home is corpus/tokenize.py"
    literal = {str(p.relative_to(PKG)): _minus_100s(p) for p in MODULES if p != home and _minus_100s(p)}
    assert not literal, f"use corpus.tokenize.IGNORE_INDEX instead of -100 at {literal}"


MAX_MODULE_LINES, MAX_RECIPE_LINES = 450, 350


def test_modules_stay_small_and_recipes_read_top_to_bottom():
    """No module over 450 lines, no recipe.py over 350: a module that grows past them is split
    along a seam (docs/ARCHITECTURE.md), not allowed to sprawl."""
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in MODULES}
    big = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    recipes = {m: n for m, n in sizes.items() if m.endswith("recipe.py") and n > MAX_RECIPE_LINES}
    assert not recipes, f"recipes over {MAX_RECIPE_LINES} lines: {recipes}"
