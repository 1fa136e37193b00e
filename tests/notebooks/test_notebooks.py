"""Execute every notebook under notebooks/ top to bottom (nbclient), so they never rot.

The notebooks are jupytext percent-format scripts (`notebooks/NN_name.py`: `# %%` code cells,
`# %% [markdown]` cells); no .ipynb is committed. Each is read with `jupytext.read` and run in
a temp working dir, with $JAXMOE_CACHE_DIR in a temp dir, on a python3 kernel of the
interpreter running the tests (checked by an injected first cell). Any cell error fails.
To open one in Jupyter: `jupytext --to ipynb notebooks/01_quickstart.py` (or the jupytext
Jupyter extension, which opens the .py directly).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.py", "02_architecture.py", "03_benchmarks.py"]
    # The .py files are the source; a generated .ipynb next to them would go stale.
    assert not sorted(p.name for p in NB_DIR.glob("*.ipynb")), "notebooks/*.ipynb are generated: do not commit them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_jupytext_percent(path):
    nb = jupytext.read(path)
    nbformat.validate(nb)
    assert nb.metadata["jupytext"]["text_representation"]["format_name"] == "percent", path.name
    assert nb.metadata["kernelspec"]["name"] == "python3", path.name
    kinds = {c.cell_type for c in nb.cells}
    assert kinds == {"code", "markdown"}, f"{path.name}: cells {kinds}"
    assert nb.cells[0].cell_type == "markdown", f"{path.name} should open with a markdown title cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JAXMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXMOE_REPO", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # 03_benchmarks: run prefill live (--quick); e2e and kernels have their own quick tests (tests/benchmarks).
    monkeypatch.setenv("JAXMOE_NB_BENCHES", "prefill")
    monkeypatch.setenv("JAXMOE_NB_PREFILL_LENGTHS", "64")  # one prompt length: 25 s instead of 43
    nb = jupytext.read(path)  # an nbformat v4 notebook, without outputs
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
