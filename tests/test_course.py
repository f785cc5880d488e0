"""The course notebook: docs/course.ipynb runs top to bottom in a real Jupyter kernel (FAST mode: fewer steps, prompts
and seeds), and docs/course.py, the jupytext percent-format file beside it, holds the same cells."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK, PAIRED = ROOT / "docs" / "course.ipynb", ROOT / "docs" / "course.py"


def hidden(cells) -> list:
    """Indices of the cells whose source is collapsed (the exercises' worked answers)."""
    return [i for i, c in enumerate(cells) if c.metadata.get("jupyter", {}).get("source_hidden")]


def test_notebook_and_its_percent_file_hold_the_same_cells():
    import jupytext
    import nbformat

    nb, py = nbformat.read(NOTEBOOK, as_version=4), jupytext.read(PAIRED)
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in py.cells], \
        "docs/course.py and docs/course.ipynb differ: run `jupytext --sync docs/course.py`"
    assert hidden(nb.cells) == hidden(py.cells) and len(hidden(nb.cells)) >= 3  # the worked answers, collapsed in both
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert not [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)], \
        "the committed notebook carries no outputs"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every cell, in order, in a python3 kernel started from docs/ as Jupyter starts it; a cell that raises fails
    the test (nbclient's CellExecutionError names it). FAST=1, one thread; its files go to a temporary folder."""
    import nbclient
    import nbformat

    monkeypatch.setenv("FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp() folder, removed with tmp_path
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for o in cell.outputs)

    out = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "FAST mode: True" in out and "1 CPU thread(s)" in out
    assert "NewMove trains 570,882,176 of the 1.7B UNet's 1,411,233,860 parameters" in out  # on the meta device
    diff = re.search(r"max pixel difference (\d+)", out)
    assert diff and int(diff[1]) <= 1  # the prompt-switch sampler, never switched, gives sample.generate's video
    assert re.search(r"\| novel-motion accuracy \(moves in a circle\) \| 0% \| \d+% \|", out)
    images = sum(o.output_type == "display_data" and "image/png" in o.data for c in nb.cells
                 if c.cell_type == "code" for o in c.outputs)
    assert images >= 5  # p(t), the prompt switch, two loss curves, the ablation table
    assert "this notebook ran in" in out
