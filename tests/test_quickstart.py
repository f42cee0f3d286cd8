"""``composer-kd quickstart --fast``: every stage, the report, reruns that skip, and its bad inputs.

``capfd`` rather than ``capsys``: Composer's progress bars need a real file descriptor behind stdout."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_cli_error
from transformers import AutoModelForCausalLM

from composer_kd.cli import main
from composer_kd.quickstart import pipeline as quickstart

pytestmark = pytest.mark.slow  # whole runs: the quickstart, the notebooks, the benchmarks


@pytest.fixture
def fast_run(fast_quickstart: Path) -> Path:
    return fast_quickstart


def test_fast_quickstart_reports_every_model(fast_run: Path) -> None:
    results = json.loads((fast_run / 'results.json').read_text())
    assert set(results['models']) == {'teacher', 'baseline', 'baseline_equal_time', 'distilled', 'distilled_offline',
                                      'baseline_equal_time_offline'}
    for name, model in results['models'].items():
        assert model['eval_ce'] > 0 and model['tokens_per_s'] > 0 and model['wall_s'] > 0
        assert (model['top1_agreement'] is None) == (name == 'teacher')
    steps = {name: model['steps'] for name, model in results['models'].items()}
    assert steps['baseline'] == steps['distilled'] == steps['distilled_offline'] == quickstart.FAST.student_steps
    ce = {k: m['eval_ce'] for k, m in results['models'].items()}
    for kind, student in (('online', 'distilled'), ('offline', 'distilled_offline')):
        gap = (ce['baseline'] - ce[student]) / (ce['baseline'] - ce['teacher'])
        assert results['gap_closed'][kind]['vs_baseline'] == pytest.approx(gap)
    assert (fast_run / 'eval_curves.png').stat().st_size > 1000
    AutoModelForCausalLM.from_pretrained(results['distilled_student'])
    AutoModelForCausalLM.from_pretrained(results['distilled_offline_student'])


def test_equal_cost_budgets_come_from_the_paired_measurement(fast_run: Path) -> None:
    # Not from the stages' wall times, which a busy machine skews: from interleaved steps in one process.
    results = json.loads((fast_run / 'results.json').read_text())
    costs = results['step_costs']
    assert costs['rounds'] == quickstart.FAST.cost_rounds and 'interleaved' in costs['method']
    assert set(costs['ratio']) == {'labels_only', 'online', 'offline', 'precompute'}
    assert costs['ratio']['labels_only'] == 1.0 and costs['ratio']['online'] > 1.0
    for kind, stage in (('online', 'baseline_equal_time'), ('offline', 'baseline_equal_time_offline')):
        want = max(1, round(quickstart.FAST.student_steps * costs['ratio'][kind]))
        assert results['models'][stage]['steps'] == results['equal_cost_steps'][kind] == want
    precompute = results['precompute']
    assert precompute['top_k'] == quickstart.FAST.top_k and precompute['logprobs'] == 'uint8'
    assert precompute['cost_label_steps'] == pytest.approx(
        precompute['samples'] / costs['batch_size'] * costs['ratio']['precompute'])
    amortised = precompute['offline_run_cost_amortised']
    assert amortised['1'] > amortised['3'] > amortised['10'] > results['models']['distilled_offline']['steps']


def test_rerun_skips_complete_stages(capfd, fast_run: Path) -> None:
    before = json.loads((fast_run / 'results.json').read_text())
    assert main(['quickstart', '--fast', '--out', str(fast_run)]) == 0
    out = capfd.readouterr().out
    for stage in quickstart.STAGES:
        assert f'[{stage}] complete from an earlier run, skipped' in out
    after = json.loads((fast_run / 'results.json').read_text())
    assert after['models'] == before['models']


def test_interrupted_stage_restarts_and_complete_stages_stay(capfd, tmp_path: Path, fast_run: Path) -> None:
    out = tmp_path / 'out'
    shutil.copytree(fast_run, out, symlinks=True)
    shutil.rmtree(out / 'baseline_equal_time')
    (out / '.baseline_equal_time.partial-x1y2').mkdir()  # what a killed run leaves behind
    teacher_marker = (out / 'teacher' / 'done.json').stat().st_mtime_ns
    assert main(['quickstart', '--fast', '--out', str(out)]) == 0
    printed = capfd.readouterr().out
    assert 'removing the interrupted stage .baseline_equal_time.partial-x1y2' in printed
    assert '[baseline_equal_time] ...' in printed and (out / 'baseline_equal_time' / 'done.json').is_file()
    assert (out / 'teacher' / 'done.json').stat().st_mtime_ns == teacher_marker


def _fails(capfd: pytest.CaptureFixture, args: list[str], match: str) -> None:
    assert_cli_error(capfd, ['quickstart', '--fast', *args], match)


def test_bad_inputs(capfd, tmp_path: Path, fast_run: Path) -> None:
    (tmp_path / 'a-file').write_text('x')
    _fails(capfd, ['--out', str(tmp_path / 'a-file' / 'out')], 'cannot write to')
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'thesis.tex').write_text('x')
    _fails(capfd, ['--out', str(tmp_path / 'busy')], "holds 'thesis.tex', which is not from a quickstart run")
    _fails(capfd, ['--out', str(tmp_path / 'new'), '--corpus', str(tmp_path / 'nowhere')],
           'point --corpus at a folder')
    # The sizes of --fast made the shared stages: the default sizes need another folder (a seed does not).
    assert_cli_error(capfd, ['quickstart', '--out', str(fast_run)], 'holds a quickstart run with other settings (')


def test_disk_full_keeps_complete_stages(capfd, monkeypatch, tmp_path: Path, fast_run: Path) -> None:
    out = tmp_path / 'out'
    shutil.copytree(fast_run, out, symlinks=True)
    shutil.rmtree(out / 'data')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(quickstart, 'prepare_data', full)  # the disk, not the code, is what fails here
    _fails(capfd, ['--out', str(out)], '[data] no space left on the device')
    assert (out / 'tokenizer' / 'done.json').is_file() and not (out / 'data').exists()
    assert not list(out.glob('.data.partial-*'))


def test_a_sweep_reuses_the_shared_stages(capfd, tmp_path: Path, fast_run: Path) -> None:
    out = tmp_path / 'out'
    shutil.copytree(fast_run, out, symlinks=True)
    before = (out / 'results.json').read_text()
    assert main(['quickstart', '--fast', '--out', str(out), '--seed', '18', '--temperature', '2']) == 0
    printed = capfd.readouterr().out
    for stage in quickstart.SHARED_STAGES:
        assert f'[{stage}] complete from an earlier run, skipped' in printed
    assert '[teacher_topk] ...' in printed  # the setting's own samples, at its temperature
    variant = out / quickstart.setting_folder(18, 0.1, 2.0, 'forward_kl')
    assert variant == out / 'variants' / 'seed18-alpha0.1-T2-forward_kl'
    results = json.loads((variant / 'results.json').read_text())
    assert results['settings']['seed'] == 18 and results['settings']['temperature'] == 2.0
    assert results['distilled_student'] == str(variant / 'distilled' / 'model')
    assert (out / 'results.json').read_text() == before  # the default setting's report is untouched
    meta = json.loads((variant / 'teacher_topk' / 'data' / 'train' / 'teacher_topk.json').read_text())
    assert 2.0 in meta['temperatures']


def test_the_teacher_is_precomputed_over_exactly_what_the_offline_student_reads(fast_run: Path) -> None:
    # The offline run reads its precomputed train split unshuffled; it must hold the samples the online run reads
    # from the whole corpus, shuffled, in the same order — and nothing else.
    import torch
    from omegaconf import OmegaConf
    from streaming import StreamingDataset

    from composer_kd.data.tokens import build_token_dataloader
    recipe = OmegaConf.load(Path(quickstart.__file__).parents[1] / 'yamls' / 'quickstart' / 'student.yaml')
    assert (recipe.global_train_batch_size, recipe.eval_subset_num_batches, recipe.device_eval_batch_size) == (
        quickstart.STUDENT_BATCH, quickstart.EVAL_BATCHES, quickstart.EVAL_BATCH)
    steps = quickstart.FAST.student_steps
    loader = build_token_dataloader({'local': str(fast_run / 'data' / 'mds'), 'split': 'train', 'shuffle': True,
                                     'shuffle_seed': 17, 'max_seq_len': quickstart.FAST.max_seq_len},
                                    quickstart.STUDENT_BATCH, 0).dataloader
    read = [row for batch, _ in zip(loader, range(steps)) for row in batch['input_ids']]
    subset = StreamingDataset(local=str(fast_run / 'offline_samples' / 'train'), shuffle=False)
    assert len(subset) == len(read) == steps * quickstart.STUDENT_BATCH
    for i, row in enumerate(read):
        tokens = torch.as_tensor(subset[i]['tokens'].astype('int64'))
        assert torch.equal(row[:len(tokens)], tokens), i
    results = json.loads((fast_run / 'results.json').read_text())
    assert results['precompute']['samples'] == len(read) + json.loads(
        (fast_run / 'offline_samples' / 'done.json').read_text())['samples']['val']
