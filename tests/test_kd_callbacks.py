"""``kd_schedule`` (alpha and temperature over training) and ``kd_monitor`` (train-batch statistics): values
against plain-Python references, the loss reading the scheduled alpha, resume, exact sums under microbatching."""

import math
import re

import pytest
import torch
from composer.loggers import InMemoryLogger
from helpers import assert_cli_error, tiny_gpt2
from reference import softmax

from composer_kd import DistillationModel
from composer_kd.callbacks.kd_schedule import parse_schedule, scheduled_value
from composer_kd.data.tokens import collate_tokens
from composer_kd.losses.stats import distillation_stat_sums
from composer_kd.config.run_config import load_config
from composer_kd.run.train import train


def test_schedules_between_two_values() -> None:
    assert [scheduled_value('linear', 1.0, 0.0, f) for f in (0, 0.25, 1, 3)] == [1.0, 0.75, 0.0, 0.0]
    assert scheduled_value('cosine', 4.0, 1.0, 0.5) == pytest.approx(2.5)
    assert scheduled_value('cosine', 4.0, 1.0, 1 / 3) == pytest.approx(1 + 3 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert scheduled_value('constant', 0.3, 0.9, 0.7) == 0.3
    assert parse_schedule('alpha', {'start': 0.5}).end == 0.5
    for spec, match in (({'start': 1.5}, 'alpha.start must be a number in [0, 1]'),
                        ({'start': 0.5, 'schedule': 'step'}, "alpha.schedule='step'"),
                        ({'start': 0.5, 'duration': 'soon'}, "alpha.duration='soon'"),
                        ({'start': 0.5, 'stop': 1}, 'unknown key alpha.stop')):
        with pytest.raises(ValueError, match=re.escape(match)):
            parse_schedule('alpha', spec)
    with pytest.raises(ValueError, match=r'temperature.end must be a number in \(0, inf\]'):
        parse_schedule('temperature', {'start': 2.0, 'end': 0})


def _logged(trainer, name: str) -> dict[int, float]:
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return {int(ts.batch): float(v) for ts, v in memory.data.get(name, [])}


def test_the_loss_follows_the_scheduled_alpha_and_resumes_on_schedule(tmp_path, write_config) -> None:
    schedule = {'alpha': {'schedule': 'linear', 'start': 1.0, 'end': 0.0, 'duration': '4ba'},
                'temperature': {'schedule': 'constant', 'start': 2.0}}
    config = write_config(max_duration='3ba', save_interval='3ba', autoresume=True, eval_interval='6ba',
                          eval_subset_num_batches=1, loggers={'inmemory': {}}, callbacks={'kd_schedule': schedule})
    trainer = train(load_config(str(config)))
    alphas = _logged(trainer, 'kd/alpha')
    assert [alphas[b] for b in range(3)] == [1.0, 0.75, 0.5]
    total, ce, kd = (_logged(trainer, f'loss/train/{k}') for k in ('total', 'ce', 'kd'))
    for b in range(3):  # total = alpha·CE + (1 − alpha)·T²·KD with this batch's alpha and T = 2
        assert total[b] == pytest.approx(alphas[b] * ce[b] + (1 - alphas[b]) * 4 * kd[b], rel=1e-5)
    trainer.close()
    # Autoresumed at batch 3: the schedule goes on from there (0.25, then held at 0), and the eval metric uses T = 2.
    trainer = train(load_config(str(config), ['max_duration=6ba']))
    alphas = _logged(trainer, 'kd/alpha')
    assert [alphas[b] for b in (3, 4, 5)] == [0.25, 0.0, 0.0]
    assert trainer.state.eval_metrics['eval']['TeacherDivergenceLoss'].loss_kwargs['temperature'] == 2.0
    trainer.close()


@pytest.mark.parametrize('chunk_elements', [None, 14])  # 14: two rows a chunk, so chunks cut across samples
def test_stat_sums_against_plain_python(chunk_elements) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g) * 2, torch.randn(2, 5, 7, generator=g) * 2
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    sums = distillation_stat_sums(student, teacher, labels, chunk_elements=chunk_elements)
    want = {'tokens': 0, 'student_entropy': 0.0, 'teacher_entropy': 0.0, 'top1_agreement': 0}
    for i in range(2):
        for t in range(4):  # position t is scored against labels[:, t+1]
            if labels[i, t + 1] == -100:
                continue
            q, p = softmax(student[i, t].tolist(), 1.0), softmax(teacher[i, t].tolist(), 1.0)
            want['tokens'] += 1
            want['student_entropy'] -= sum(x * math.log(x) for x in q)
            want['teacher_entropy'] -= sum(x * math.log(x) for x in p)
            want['top1_agreement'] += int(max(range(7), key=q.__getitem__) == max(range(7), key=p.__getitem__))
    assert want['tokens'] == 6
    for name, value in want.items():
        assert sums[name].item() == pytest.approx(value, rel=1e-6), name


def test_model_stat_sums_do_not_depend_on_the_microbatch_split() -> None:
    g = torch.Generator().manual_seed(5)
    samples = [{'input_ids': torch.randint(0, 48, (n,), generator=g)} for n in (9, 4, 6, 7)]
    model = DistillationModel(tiny_gpt2(seed=1), tiny_gpt2(seed=2, n_layer=2), alpha=0.5)
    model.train()
    results = []
    for split in ([samples], [samples[:1], samples[1:]]):
        model.stat_sums = {}
        for part in split:
            batch = collate_tokens(part)
            model.loss(model(batch), batch)
        results.append({k: v.item() for k, v in model.stat_sums.items()})
    assert set(results[0]) == {'tokens', 'ce', 'kd', 'student_entropy', 'teacher_entropy', 'top1_agreement'}
    for name, value in results[0].items():
        assert results[1][name] == pytest.approx(value, rel=1e-5), name


def test_kd_monitor_logs_every_interval(write_config) -> None:
    config = write_config(max_duration='5ba', save_folder=None, eval_loader=None, loggers={'inmemory': {}},
                          callbacks={'kd_monitor': {'interval': 2}})
    trainer = train(load_config(str(config)))
    for name in ('ce', 'kd', 'student_entropy', 'teacher_entropy', 'top1_agreement'):
        assert sorted(_logged(trainer, f'kd/train/{name}')) == [0, 2, 4], name
    ce, logged_ce = _logged(trainer, 'kd/train/ce'), _logged(trainer, 'loss/train/ce')
    assert ce[0] == pytest.approx(logged_ce[0], rel=1e-5)  # one process: the token-weighted mean is the batch CE
    assert 0 < _logged(trainer, 'kd/train/teacher_entropy')[0] <= math.log(1024)
    trainer.close()


@pytest.mark.parametrize('overrides,match', [
    (['callbacks={kd_monitor: {interval: 0}}'], 'callbacks.kd_monitor.interval must be a positive integer'),
    (['callbacks={kd_schedule: {alpha: {start: 2}}}'], 'callbacks.kd_schedule.alpha.start must be a number in'),
    (['callbacks={kd_schedule: {}}'], 'callbacks.kd_schedule.alpha, temperature: give at least one schedule'),
    (['callbacks={kd_schedule: {alpha: {start: 0.5}}}', 'model.teacher=null', 'model.distillation.alpha=1'],
     'callbacks.kd_schedule.alpha: there is no teacher'),
])
def test_bad_kd_callbacks_are_refused(capsys, write_config, overrides, match) -> None:
    assert_cli_error(capsys, ['train', str(write_config()), *overrides], match)


def test_csv_logger_keeps_every_batch_once_across_an_autoresume(tmp_path, write_config) -> None:
    import csv
    path = tmp_path / 'metrics.csv'
    config = write_config(max_duration='4ba', save_interval='2ba', autoresume=True, eval_interval='2ba',
                          eval_subset_num_batches=1, loggers={'csv': {'filename': str(path)}})
    train(load_config(str(config))).close()
    train(load_config(str(config), ['max_duration=6ba'])).close()  # resumes at batch 4
    rows = list(csv.DictReader(path.open()))
    assert rows and set(rows[0]) == {'batch', 'epoch', 'sample', 'token', 'name', 'value'}
    losses = [int(r['batch']) for r in rows if r['name'] == 'loss/train/total']
    evals = [int(r['batch']) for r in rows if r['name'] == 'metrics/eval/LanguageCrossEntropy']
    assert losses == list(range(6)) and evals == [2, 4, 6]
