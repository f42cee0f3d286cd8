"""``composer-kd rounds``: round N+1 distils from round N's exported student, a rerun skips complete rounds and
finishes an interrupted one from its checkpoint, and every round's config is checked before any round trains."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_cli_error, rounds_config

from composer_kd.cli import main
from composer_kd.run.evaluate import evaluate_student


def _record(folder: Path, r: int) -> dict:
    return json.loads((folder / f'round-{r}' / 'metrics.json').read_text())


def test_two_rounds_chain_skip_and_resume(capsys, tmp_path: Path, tiny_assets: Path) -> None:
    config = rounds_config(tmp_path, tiny_assets)
    assert main(['rounds', str(config)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / 'rounds'
    first, second = _record(folder, 1), _record(folder, 2)
    assert first['teacher'] == str(tiny_assets / 'teacher') and first['steps'] == 4
    assert second['teacher'] == str(folder / 'round-1' / 'student') and second['steps'] == 4
    assert json.loads((folder / 'rounds.json').read_text()) == [first, second]
    assert out.strip().splitlines()[-1].startswith('| 2 | 4 | ')  # the summary table, one row a round
    # Round 2 really distilled from round 1's student: its teacher metric, recomputed independently.
    independent = evaluate_student(str(folder / 'round-2' / 'student'), str(tiny_assets / 'tokenizer'),
                                   str(tmp_path / 'data'), 128, teacher_dir=str(folder / 'round-1' / 'student'),
                                   batch_size=8, max_samples=8)
    for name in ('LanguageCrossEntropy', 'TeacherDivergenceLoss', 'TeacherTop1Agreement'):
        assert second['eval'][name] == pytest.approx(independent[name], rel=1e-4, abs=1e-6), name

    # A rerun skips both rounds and trains nothing.
    assert main(['rounds', str(config)]) == 0
    assert capsys.readouterr().out.count('is complete') == 2
    assert _record(folder, 2) == second

    # Round 2 interrupted after its last checkpoint but before its export: the rerun autoresumes at batch 4 and
    # only evaluates and exports (the same weights give the same metrics).
    shutil.rmtree(folder / 'round-2' / 'student')
    (folder / 'round-2' / 'metrics.json').unlink()
    assert main(['rounds', str(config)]) == 0
    again = _record(folder, 2)
    assert again['steps'] == 4 and again['eval'] == second['eval']
    assert (folder / 'round-2' / 'student' / 'config.json').is_file()


@pytest.mark.parametrize('rounds,overrides,match', [
    ([], (), 'rounds must be a non-empty list'),
    ([['max_duration=4ba'], 'max_duration=4ba'], (), 'rounds.1 must be a list of key=value overrides'),
    ([['max_duration=4ba'], ['model.distillation.alfa=0.2']], (), 'rounds.1: unknown key model.distillation.alfa'),
    ([['max_duration=4ba'], ['model.distillation.alpha=3']], (), 'rounds.1: model.distillation.alpha must be'),
    (None, ('run_name=null',), 'rounds need a run_name'),
])
def test_bad_rounds_are_refused_before_any_round_trains(capsys, tmp_path: Path, tiny_assets: Path, rounds, overrides,
                                                         match) -> None:
    config = rounds_config(tmp_path, tiny_assets, rounds)
    assert_cli_error(capsys, ['rounds', str(config), *overrides], match)
    assert not (tmp_path / 'rounds').exists()


def test_train_refuses_a_rounds_config(capsys, tmp_path: Path, tiny_assets: Path) -> None:
    assert_cli_error(capsys, ['train', str(rounds_config(tmp_path, tiny_assets))], 'run it with `composer-kd rounds`')
