"""Every notebook runs top to bottom in fast mode, and is committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, f'{path.name}: strip outputs before committing'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('COMPOSER_KD_FAST', '1')
    monkeypatch.setenv('QUICKSTART_OUT', str(tmp_path / 'quickstart'))
    monkeypatch.setenv('NOTEBOOK_OUT', str(tmp_path / 'notebook'))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    assert (tmp_path / 'notebook' / 'student' / 'config.json').is_file()
    assert os.path.isfile(tmp_path / 'quickstart' / 'results.json')
