"""Executes every notebook in notebooks/ top to bottom; any error in any cell fails the test.

The committed notebooks are read into memory and executed there, so the files on disk (and their stored
outputs) are never modified. The kernel is this interpreter's own ipykernel (not whatever `python3`
kernelspec is installed for the user), so the notebooks run against the environment the tests run in.

To refresh the stored outputs after a change: `python tests/test_notebooks.py [notebooks/NAME.ipynb ...]`.
"""

import pathlib
import time

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = (
  "01_batchnorm_from_scratch",
  "02_state_and_devices",
  "03_small_batches",
  "04_weights_and_constraints",
  "05_training_to_deployment",
)
CELL_TIMEOUT_S = 120  # each notebook is meant to run in well under a minute on a 2-core CPU


def test_all_notebooks_are_collected():
  """Guards against an empty parametrization, which pytest would report as a silent skip."""
  assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)


def _client(notebook) -> nbclient.NotebookClient:
  """A client on this interpreter's own kernel, cwd notebooks/, failing on the first cell error."""
  # With no kernel directories, jupyter_client falls back to the native kernel of sys.executable.
  kernel = KernelManager(
    kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
  )
  return nbclient.NotebookClient(
    notebook,
    km=kernel,
    timeout=CELL_TIMEOUT_S,
    allow_errors=False,
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
  notebook = nbformat.read(
    path, as_version=4
  )  # an in-memory copy: the committed file is not touched
  client = _client(notebook)
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  elapsed = time.perf_counter() - start
  print(f"{path.name}: {elapsed:.1f} s")
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
      assert not errors, f"{path.name} cell {index} raised {errors[0].get('ename')}"


def execute_in_place(path: pathlib.Path) -> float:
  """Re-executes a notebook and stores its new outputs in the file; returns the seconds it took."""
  notebook = nbformat.read(path, as_version=4)
  client = _client(notebook)
  start = time.perf_counter()
  client.execute()
  for cell in notebook.cells:  # keep diffs small: no per-cell timing metadata
    if cell.cell_type == "code":
      cell.metadata.pop("execution", None)
  nbformat.write(notebook, path)
  return time.perf_counter() - start


if __name__ == "__main__":
  # Refresh the committed outputs: python tests/test_notebooks.py [notebooks/NAME.ipynb ...]
  import sys

  for name in sys.argv[1:] or NOTEBOOKS:
    print(f"{name}: {execute_in_place(pathlib.Path(name)):.1f} s")
