"""Execute every notebook under notebooks/ top to bottom (nbclient), so they never rot.

Each runs in a temp working dir, with $JAXMOE_CACHE_DIR in a temp dir, on a python3 kernel of
the interpreter running the tests (checked by an injected first cell). Any cell error fails.
The committed .ipynb files carry no outputs and match `notebooks/build.py`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_architecture.ipynb", "03_benchmarks.ipynb"]


def test_committed_notebooks_have_no_outputs_and_match_build_py():
    spec = importlib.util.spec_from_file_location("_nb_build", NB_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs committed"
        expected = build.build(build.NOTEBOOKS[path.name])
        assert [c.source for c in nb.cells] == [c.source for c in expected.cells], (
            f"{path.name} differs from notebooks/build.py: run `python notebooks/build.py`"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JAXMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXMOE_REPO", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # 03_benchmarks: run kernels and prefill live (--quick); e2e has its own quick test (tests/benchmarks).
    monkeypatch.setenv("JAXMOE_NB_BENCHES", "kernels,prefill")
    nb = nbformat.read(path, as_version=4)
    # The kernel must be this interpreter (jupyter_client maps a kernelspec's "python" to sys.executable).
    check = nbformat.v4.new_code_cell(
        f"import sys, os\nassert os.path.realpath(sys.prefix) == {os.path.realpath(sys.prefix)!r}, sys.prefix"
    )
    check["id"] = "test-kernel-check"
    nb.cells.insert(0, check)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
