"""Execute every course notebook from top to bottom, as a student would (they must run on a CPU
in about a minute each, on the bundled shapes model or tiny configs, with no download)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # Run inside a scratch folder so nothing the notebook writes lands in the repository. The
    # notebooks address the shapes model as a student's Jupyter would, from notebooks/ as
    # "../weights/shapes"; the scratch folder gets the same layout with weights/ linked in.
    (tmp_path / "weights").symlink_to(path.parent.parent / "weights", target_is_directory=True)
    (tmp_path / "notebooks").mkdir()
    workdir = tmp_path / "notebooks"
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
