"""writer.py: lazily made tensor groups to sharded safetensors + index + config, atomically; and
the loading package's import graph (no module imports one that imports it back)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import jaxmoe
from jaxmoe.loading.safetensors_index import INDEX_NAME, SafetensorsCheckpoint
from jaxmoe.loading.writer import TensorGroup, write_tensor_groups


def _group(name: str, a: np.ndarray, made: list[str] | None = None) -> TensorGroup:
    def make():
        if made is not None:
            made.append(name)
        return {name: a}

    return TensorGroup([(name, a.dtype, a.shape)], make)


def test_shards_index_extra_and_lazy_order(tmp_path):
    a = np.arange(600, dtype=np.float32).reshape(20, 30)
    b = np.arange(100, dtype=np.uint8)
    made: list[str] = []
    groups = [_group("a", a, made), _group("b", b, made), _group("c", a * 2, made)]

    def extra(tmp: Path) -> dict:
        (tmp / "note.txt").write_text("hi")
        return {"added": 1}

    path = write_tensor_groups(tmp_path / "ck", {"k": "v"}, groups, max_shard_bytes=3000, extra=extra)
    assert made == ["a", "b", "c"]
    assert json.loads((path / "config.json").read_text()) == {"k": "v", "added": 1}
    assert (path / "note.txt").read_text() == "hi"
    index = json.loads((path / INDEX_NAME).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 2 * a.nbytes + b.nbytes
    st = SafetensorsCheckpoint(path)
    try:
        for name, want in (("a", a), ("b", b), ("c", a * 2)):
            np.testing.assert_array_equal(st.array(name), want)
    finally:
        st.close()


def test_errors_leave_nothing_behind(tmp_path):
    bad = TensorGroup([("x", np.dtype(np.float32), (2, 2))], lambda: {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"x: made float32 \(2, 3\), planned float32 \(2, 2\)"):
        write_tensor_groups(tmp_path / "ck", {}, [_group("ok", np.ones(4, np.float32)), bad])
    assert list(tmp_path.iterdir()) == []
    path = write_tensor_groups(tmp_path / "ck", {}, [_group("ok", np.ones(4, np.float32))])
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_tensor_groups(path, {}, [])
    write_tensor_groups(path, {"v": 2}, [_group("ok", np.ones(4, np.float32))], overwrite=True)
    assert json.loads((path / "config.json").read_text()) == {"v": 2}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ck"]


def _imports(pkg_root: Path) -> dict[str, set[str]]:
    """Module -> the jaxmoe.loading / jaxmoe.quant* modules it imports (any statement, any depth)."""
    files = [*pkg_root.joinpath("loading").glob("*.py"), *pkg_root.glob("quant*.py")]
    mods = {".".join(p.relative_to(pkg_root.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                            for a in node.names)
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_no_import_cycles_in_loading_and_quant():
    graph = _imports(Path(jaxmoe.__file__).parent)
    assert "jaxmoe.loading.convert" not in graph["jaxmoe.loading.loader"]
    assert not any(d.startswith("jaxmoe.loading") for q in ("jaxmoe.quant", "jaxmoe.quant_int4") for d in graph[q])
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        for d in graph[m]:
            assert d not in path, f"import cycle: {' -> '.join(path[path.index(d):] + [d])}"
            if d not in done:
                visit(d, [*path, d])
        done.add(m)

    for m in graph:
        visit(m, [m])
