"""The layout's import direction, from the source: each part of `jaxmoe/` imports only the parts
below it (the rules each package's `__init__` docstring states), `planning/` imports no JAX,
and nothing in `jaxmoe/` or `benchmarks/` imports in a circle."""

from __future__ import annotations

import pytest

from .imports import cycles, import_graph, module_files, third_party_imports

BASE = {"config", "quant", "quant_int4", "step_shapes"}
# part of jaxmoe -> the parts it may import (a part is a subpackage or a top-level module)
ALLOWED = {
    "config": set(),
    "quant": set(),
    "quant_int4": {"quant"},
    "step_shapes": {"config"},
    "tokenizer": set(),
    "model": BASE,
    "loading": BASE | {"model", "tokenizer"},  # tokenizer_data: the synthetic tokenizer's markers
    "layers": BASE | {"model"},  # blocks shared by the model families
    "models": BASE | {"model", "layers", "loading"},  # one package per model family: config, forward, checkpoint map
    "cpu": BASE | {"model", "loading"},
    "planning": {"config", "step_shapes"},
    "streaming": BASE | {"model", "planning"},
    "serving": BASE | {"model", "models", "loading", "cpu", "planning", "streaming"},  # models: the family registry
    "loaded_model": BASE | {"model", "models", "loading", "cpu", "planning", "serving", "tokenizer"},
    "generate": BASE | {"loaded_model", "serving", "tokenizer"},
    "server": BASE | {"model", "loading", "cpu", "planning", "serving", "tokenizer", "loaded_model", "generate"},
    # cpu: `jaxmoe cache`; models: configs and synthetic checkpoints of every family
    "cli": BASE | {"__init__", "models", "loading", "cpu", "loaded_model", "generate", "tokenizer", "server"},
    "__init__": {"config", "generate", "tokenizer"},
}
NO_JAX = ("planning", "step_shapes", "config")  # pure arithmetic on configs


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph():
    return import_graph("jaxmoe", "benchmarks")[0]


def test_every_part_has_a_rule():
    parts = {_part(m) for m in module_files("jaxmoe")}
    assert parts == set(ALLOWED), f"parts without an import rule: {sorted(parts - set(ALLOWED))}"


def test_imports_run_downward(graph):
    bad = [f"{m} imports {t} (line {line}): {_part(m)} may import only {sorted(ALLOWED[_part(m)])}"
           for m, deps in graph.items() if m.startswith("jaxmoe")
           for t, line in deps.items()
           if t.startswith("jaxmoe") and _part(t) != _part(m) and _part(t) not in ALLOWED[_part(m)]]
    assert not bad, "\n".join(bad)


def test_jaxmoe_never_imports_benchmarks(graph):
    bad = [f"{m} imports {t}" for m, deps in graph.items() if m.startswith("jaxmoe") for t in deps
           if t.startswith("benchmarks")]
    assert not bad, bad


def test_no_import_cycles(graph):
    assert cycles(graph) == []


@pytest.mark.parametrize("part", NO_JAX)
def test_planning_imports_no_jax(part):
    files = [p for m, p in module_files("jaxmoe").items() if _part(m) == part]
    assert files
    for path in files:
        assert not third_party_imports(path) & {"jax", "jaxlib", "flax"}, path


def test_the_cycle_finder_on_a_made_up_graph():
    """A cycle is found, a chain is not."""
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []
