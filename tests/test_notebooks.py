"""Every notebook runs top to bottom in fast mode, and is committed without outputs."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))
EXPORTS = {'quickstart.ipynb': 'student', 'offline_teacher.ipynb': 'offline_student',
           'ensembles_and_rounds.ipynb': 'ensemble_student', 'pruned_students.ipynb': 'pruned_student',
           'on_policy.ipynb': 'on_policy_student'}  # exports


def test_every_notebook_is_checked() -> None:
    assert sorted(EXPORTS) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == 'code':
            assert not cell.outputs and cell.execution_count is None, f'{path.name}: strip outputs before committing'


@pytest.mark.slow
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


def test_notebooks_find_the_quickstart_wherever_jupyter_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from composer_kd.quickstart import notebook_folders
    repo = tmp_path / 'clone'
    (repo / 'notebooks').mkdir(parents=True)
    (repo / 'pyproject.toml').write_text('[project]\nname = "composer-kd"\n')
    monkeypatch.delenv('QUICKSTART_OUT', raising=False)
    monkeypatch.delenv('NOTEBOOK_OUT', raising=False)
    # Jupyter started in notebooks/: the repository root, not a second quickstart under notebooks/.
    assert notebook_folders(fast=True, start=repo / 'notebooks') == (repo / 'quickstart-out-fast',
                                                                   repo / 'notebook-out')
    # Started anywhere below an existing quickstart output: that one.
    (tmp_path / 'work' / 'quickstart-out').mkdir(parents=True)
    (tmp_path / 'work' / 'a' / 'b').mkdir(parents=True)
    assert notebook_folders(start=tmp_path / 'work' / 'a' / 'b')[0] == tmp_path / 'work' / 'quickstart-out'
    # Nothing found: the current folder.
    (tmp_path / 'elsewhere').mkdir()
    assert notebook_folders(start=tmp_path / 'elsewhere')[0] == tmp_path / 'elsewhere' / 'quickstart-out'
    # The environment, then the parameters cell, win.
    monkeypatch.setenv('QUICKSTART_OUT', str(tmp_path / 'env'))
    assert notebook_folders(start=repo / 'notebooks')[0] == tmp_path / 'env'
    assert notebook_folders(str(tmp_path / 'cell'), start=repo / 'notebooks')[0] == tmp_path / 'cell'


def test_notebooks_take_a_parameters_cell() -> None:
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        first_code = next(c for c in cells if c.cell_type == 'code')
        assert 'parameters' in first_code.metadata.get('tags', []), path.name
        assert 'QUICKSTART_OUT = None' in first_code.source, path.name
