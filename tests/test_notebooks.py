"""Every notebook runs top to bottom in fast mode, and is committed without outputs."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))
EXPORTS = {'quickstart.ipynb': 'student', 'offline_teacher.ipynb': 'offline_student',
           'ensembles_and_rounds.ipynb': 'ensemble_student'}  # what each one exports


def test_every_notebook_is_checked() -> None:
    assert sorted(EXPORTS) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, f'{path.name}: strip outputs before committing'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_quickstart: Path) -> None:
    # The notebooks start from a finished fast quickstart (theirs skips every stage); a copy, as they write to it.
    shutil.copytree(fast_quickstart, tmp_path / 'quickstart', symlinks=True)
    monkeypatch.setenv('COMPOSER_KD_FAST', '1')
    monkeypatch.setenv('QUICKSTART_OUT', str(tmp_path / 'quickstart'))
    monkeypatch.setenv('NOTEBOOK_OUT', str(tmp_path / 'notebook'))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    assert (tmp_path / 'notebook' / EXPORTS[path.name] / 'config.json').is_file()
